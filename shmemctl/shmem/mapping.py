"""A mapping: one record, and one JSON form, for everyone who holds or shows one.

The front-end's engine holds mappings, backend_sim believes in them, `/proc`
checks compare against them, the control sockets list them and the console
draws them; all of them use `Mapping`, and every JSON document that carries a
mapping (a status answer, a `mapped`/`unmapped` event) carries `MappingJSON`.
What a request asks for is the wire payload, `ShmemMap`; a `Mapping` is what
exists (or is believed to) once it was granted.
"""

# No `from __future__ import annotations`: Python 3.11's TypedDict takes a NotRequired
# key for a required one when its annotation is a string.
import os
from typing import NamedTuple, NotRequired, TypedDict

from ..wire.messages import MMAP_FLAG_WRITE, ShmemMap


def dev_text(dev: int) -> str:
    """A device number as /proc/PID/maps prints it (`00:01`)."""
    return f"{os.major(dev):02x}:{os.minor(dev):02x}"


def dev_number(text: str) -> int:
    """`dev_text` read back."""
    major, _, minor = text.partition(":")
    return os.makedev(int(major, 16), int(minor, 16))


class FileFacts(NamedTuple):
    """What the file an fd named is, learnt while the fd was open (fstat, /proc/self/fd),
    kept so the file can be found again once the fd is closed."""

    dev: int
    ino: int
    #: the name /proc/self/fd gives it (`/memfd:NAME (deleted)`, a path)
    file: str
    size: int


class RangeJSON(TypedDict):
    """A range of a region: what an UNMAP names."""

    shmid: int
    shm_offset: int
    len: int


class MappingJSON(RangeJSON):
    """A mapping as JSON. The optional keys are there when their holder knows them."""

    fd_offset: int
    writable: bool
    #: the file behind it, as /proc names it (`memfd:NAME (deleted)`, a path)
    file: NotRequired[str]
    #: the file's identity, as /proc/PID/maps shows it: device (`MAJOR:MINOR`) and inode
    dev: NotRequired[str]
    ino: NotRequired[int]
    #: seconds since it was mapped, as of the document that carries it
    age: NotRequired[float]
    #: backend_sim's: the buffer it mapped
    buffer: NotRequired[int]
    #: backend_sim's: False when the front-end's answer never came or made no sense
    confirmed: NotRequired[bool]


class Mapping(NamedTuple):
    """A file mapped into a shared memory region (offsets relative to the region).

    A NamedTuple: the engine makes one per SHMEM_MAP on the hot path. The fields
    after `writable` are facts only some holders know; each keeps its default
    where it does not apply."""

    shmid: int
    shm_offset: int
    len: int
    fd_offset: int = 0
    writable: bool = True
    #: the file behind the fd, for people; empty where nobody named it
    file: str = ""
    #: the file's identity: the engine closes the fd once mapped (the mapping holds the
    #: file, so fd usage stays flat) and keeps what /proc/PID/maps shows of it
    dev: int = 0
    ino: int = 0
    #: time.time() when it was mapped; 0 when unknown
    created: float = 0.0
    #: backend_sim: the buffer it mapped, and whether an answer confirmed it
    buffer: int = 0
    confirmed: bool = True

    @property
    def end(self) -> int:
        return self.shm_offset + self.len

    @classmethod
    def granted(
        cls, m: ShmemMap, *, file: str = "", dev: int = 0, ino: int = 0, created: float = 0.0,
        buffer: int = 0, confirmed: bool = True,
    ) -> "Mapping":  # fmt: skip
        """The mapping a SHMEM_MAP asked for, with what else its holder knows."""
        return cls(
            m.shmid, m.shm_offset, m.len, m.fd_offset, bool(m.flags & MMAP_FLAG_WRITE), file,
            dev, ino, created, buffer, confirmed,
        )  # fmt: skip

    def request(self) -> ShmemMap:
        """The SHMEM_MAP that makes this mapping."""
        return ShmemMap(
            self.shmid, self.shm_offset, self.len, self.fd_offset,
            MMAP_FLAG_WRITE if self.writable else 0,
        )  # fmt: skip

    def to_json(self, now: float | None = None) -> MappingJSON:
        """The JSON form; `age` when `now` is given and the creation time is known."""
        out: MappingJSON = {
            "shmid": self.shmid, "shm_offset": self.shm_offset, "len": self.len,
            "fd_offset": self.fd_offset, "writable": self.writable,
        }  # fmt: skip
        if self.file:
            out["file"] = self.file
        if self.ino:
            out["dev"], out["ino"] = dev_text(self.dev), self.ino
        if now is not None and self.created:
            out["age"] = round(now - self.created, 3)
        if self.buffer:
            out["buffer"] = self.buffer
            out["confirmed"] = self.confirmed
        return out

    @classmethod
    def from_json(cls, data: MappingJSON, now: float) -> "Mapping":
        """Read the JSON form back; `now` is when the document was made (its `age` is
        relative to it)."""
        return cls(
            data["shmid"], data["shm_offset"], data["len"], data["fd_offset"], data["writable"],
            file=data.get("file", ""),
            dev=dev_number(data["dev"]) if "dev" in data else 0,
            ino=data.get("ino", 0),
            created=now - data["age"] if "age" in data else now,
            buffer=data.get("buffer", 0),
            confirmed=data.get("confirmed", True),
        )  # fmt: skip
