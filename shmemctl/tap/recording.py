"""A recording of what a tap relayed, and reading one back.

One JSON object per line, in the order the tap relayed (and judged) what it records:

* `{"type": "start", "version": 1, "time": T, "shmem_bit": 22, "front": ..., "back": ...}`
  when a tap begins writing (a tap appends: one file can hold several runs);
* `{"type": "attached", "time": T, "connection": N}` and
  `{"type": "detached", "time": T, "connection": N, "reason": ...}` around each pair of
  connections;
* `{"type": "message", "time": T, "connection": N, "link": L, "channel": "main",
  "from": "front-end", "data": BASE64, "fds": [FD...], "decoded": {...} | null,
  "problem": "...", "framed": true}` for each unit relayed: the exact bytes, what each fd
  was (`{"kind": "memfd", "dev": "00:01", "ino": 7, "size": 4096, "file": "/memfd:..."}`),
  the decoded form for people and other tools. `link` tells a connection's channels
  apart (0: main; 1, 2, ...: each backend channel in the order it was handed over).
  `"answers_in_flight": true` marks a front-end's request the tap judged knowing an
  answer of the front-end's might be on its way on a backend channel
  (`Observer.message`), so that judging the file again judges it alike.

`replay` reads a recording back and frames each recorded unit again with the tap's own
framer, so what it yields is decoded by the codec, not taken on trust from `decoded`.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple, TextIO, TypedDict

from ..channel import SCM_MAX_FD
from ..events import Event, qmp_timestamp
from ..session.observer import BACKEND, FRONTEND
from ..shmem.mapping import FileFacts, dev_number, dev_text
from ..wire.constants import MAX_PAYLOAD, ChannelKind, request_name
from ..wire.messages import summarize
from .framer import RAW_CHUNK, Framer, Unit, replies_from
from .truth import describe_fd

VERSION = 1

#: The longest line a recording may hold: a unit is at most a header and the payload
#: ceiling, or one raw chunk once framing is lost, in base64, with its fds and decoded
#: form. A longer line is not a recording's: refused before it is read whole.
MAX_LINE = 4 * (RAW_CHUNK + MAX_PAYLOAD) + 64 * 1024


class FdJSON(TypedDict):
    kind: str
    dev: str
    ino: int
    size: int
    file: str


def fd_json(fd: int) -> FdJSON:
    described = describe_fd(fd)
    if described is None:
        return {"kind": "unknown", "dev": "00:00", "ino": 0, "size": 0, "file": ""}
    facts, kind = described
    return {"kind": kind, "dev": dev_text(facts.dev), "ino": facts.ino, "size": facts.size,
            "file": facts.file}  # fmt: skip


class Recorder:
    """Writes a recording, a line at a time, flushed at once: a recording must hold
    everything up to the moment a pair (or the tap) died."""

    def __init__(self, path: str, *, shmem_bit: int, front: str, back: str) -> None:
        self._file: TextIO = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self._lock = threading.Lock()
        self._write({"type": "start", "version": VERSION, "time": time.time(),
                     "shmem_bit": shmem_bit, "front": front, "back": back})  # fmt: skip

    def attached(self, connection: int) -> None:
        self._write({"type": "attached", "time": time.time(), "connection": connection})

    def detached(self, connection: int, reason: str) -> None:
        self._write({"type": "detached", "time": time.time(), "connection": connection,
                     "reason": reason})  # fmt: skip

    def unit(
        self,
        connection: int,
        link: int,
        kind: ChannelKind,
        sender: str,
        unit: Unit,
        *,
        answers_in_flight: bool = False,
    ) -> None:
        """One unit as it is about to be sent on; its fds are still open.
        `answers_in_flight`: what the tap knew when it judged it (`Observer.message`)."""
        record: dict[str, Any] = {
            "type": "message",
            "time": time.time(),
            "connection": connection,
            "link": link,
            "channel": kind.value,
            "from": sender,
            "data": base64.b64encode(unit.data).decode("ascii"),
            "fds": [fd_json(fd) for fd in unit.fds],
            "decoded": None if unit.message is None else summarize(unit.message),
            "problem": unit.problem,
            "framed": unit.framed,
        }
        if answers_in_flight:
            record["answers_in_flight"] = True
        self._write(record)

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def _write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock:
            if not self._file.closed:
                self._file.write(line)


# ------------------------------------------------------------------ reading back


class RecordingError(Exception):
    """A file that is not a recording, or a line of one that cannot be read: the message
    names the file, the line and what would be right."""


class Recorded(NamedTuple):
    """One line of a recording. For a message, `units` are what the tap's framer makes of
    the recorded bytes (one, unless the file was edited), and `files` what each fd was."""

    line: int
    type: str
    time: float
    connection: int
    shmem_bit: int
    channel: ChannelKind | None = None
    sender: str | None = None
    units: tuple[Unit, ...] = ()
    files: tuple[FdJSON, ...] = ()
    reason: str = ""
    #: whether the framing of the message's direction still held after it
    decoding: bool = True
    #: the tap could not rule out that the front-end had answered already (see
    #: `Observer.message`)
    answers_in_flight: bool = False

    def file_facts(self) -> FileFacts | None:
        """What the one fd of this message was, as a FileFacts; None without exactly one
        fd whose device and inode were known."""
        if len(self.files) != 1 or not self.files[0]["ino"]:
            return None
        fd = self.files[0]
        return FileFacts(dev_number(fd["dev"]), fd["ino"], fd["file"], fd["size"])


_TYPES = ("start", "attached", "detached", "message")
_SIDES = (FRONTEND, BACKEND)


def _field(record: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = record.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RecordingError(f"{where}: {key!r} must be {names}, not {value!r}")
    return value


def _fds(record: dict[str, Any], where: str, size: int) -> tuple[FdJSON, ...]:
    """The fds of a unit of `size` bytes: each read that brought some of its bytes brings
    at most SCM_MAX_FD fds, and a read brings a byte at least."""
    fds = _field(record, "fds", list, where)
    most = SCM_MAX_FD * max(1, size)
    if len(fds) > most:
        raise RecordingError(f"{where}: {len(fds)} fds on {size} bytes; at most {SCM_MAX_FD} "
                             f"fds come with each byte read, so at most {most}")  # fmt: skip
    out = []
    for n, fd in enumerate(fds):
        at = f"{where}, fd {n}"
        if not isinstance(fd, dict):
            raise RecordingError(f"{at}: must be an object with kind, dev, ino, size, file")
        dev = _field(fd, "dev", str, at)
        try:
            dev_number(dev)
        except ValueError:
            raise RecordingError(f"{at}: dev {dev!r} must read like 00:01") from None
        out.append(
            FdJSON(
                kind=_field(fd, "kind", str, at),
                dev=dev,
                ino=_field(fd, "ino", int, at),
                size=_field(fd, "size", int, at),
                file=_field(fd, "file", str, at),
            )
        )
    return tuple(out)


def replay(path: str | Path) -> Iterator[Recorded]:
    """Every line of the recording at `path`, in order. RecordingError on the first line
    that is not what a tap writes (OSError if the file cannot be read)."""
    shmem_bit: int | None = None
    framers: dict[tuple[int, int, str], Framer] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        number = 0
        while True:
            text = f.readline(MAX_LINE + 1)
            if not text:
                return
            number += 1
            where = f"{path}, line {number}"
            if len(text) > MAX_LINE:
                raise RecordingError(f"{where}: longer than {MAX_LINE} characters; "
                                     "a tap never writes such a line")  # fmt: skip
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise RecordingError(
                    f"{where}: not JSON ({exc.msg} at column {exc.colno}); "
                    "each line of a recording is one JSON object"
                ) from None
            if not isinstance(record, dict) or record.get("type") not in _TYPES:
                raise RecordingError(f"{where}: not a line a tap writes: an object whose "
                                     f"type is one of {', '.join(_TYPES)}")  # fmt: skip
            kind = record["type"]
            when = float(_field(record, "time", (int, float), where))
            if kind == "start":
                version = _field(record, "version", int, where)
                if version != VERSION:
                    raise RecordingError(f"{where}: recording version {version}; this shmemctl "
                                         f"reads version {VERSION}")  # fmt: skip
                shmem_bit = _field(record, "shmem_bit", int, where)
                framers.clear()
                yield Recorded(number, kind, when, 0, shmem_bit)
                continue
            if shmem_bit is None:
                raise RecordingError(f"{where}: a {kind} line before any start line: "
                                     "this is not the beginning of a recording")  # fmt: skip
            connection = _field(record, "connection", int, where)
            if kind != "message":
                reason = record.get("reason", "")
                yield Recorded(number, kind, when, connection, shmem_bit,
                               reason=reason if isinstance(reason, str) else "")  # fmt: skip
                continue
            yield _message(record, where, number, when, connection, shmem_bit, framers)


def _message(
    record: dict[str, Any],
    where: str,
    number: int,
    when: float,
    connection: int,
    shmem_bit: int,
    framers: dict[tuple[int, int, str], Framer],
) -> Recorded:
    link = _field(record, "link", int, where)
    try:
        channel = ChannelKind(record.get("channel"))
    except ValueError:
        raise RecordingError(f"{where}: channel must be main or backend, "
                             f"not {record.get('channel')!r}") from None  # fmt: skip
    sender = record.get("from")
    if sender not in _SIDES:
        raise RecordingError(f"{where}: from must be {' or '.join(_SIDES)}, not {sender!r}")
    try:
        data = base64.b64decode(_field(record, "data", str, where), validate=True)
    except binascii.Error:
        raise RecordingError(f"{where}: data must be the bytes in base64") from None
    files = _fds(record, where, len(data))
    key = (connection, link, sender)
    framer = framers.get(key)
    if framer is None or framer.channel is not channel:
        framer = framers[key] = Framer(channel, replies=replies_from(channel, sender))
    # the fds themselves are gone: -1 stands for each, where it came (the first byte)
    fds: tuple[int, ...] = (-1,) * len(files)
    units: list[Unit] = []
    at = 0
    while at < len(data):
        size = max(1, framer.wanted)
        unit = framer.feed(data[at : at + size], fds)
        fds = ()
        at += size
        if unit is not None:
            units.append(unit)
    if not data and (end := framer.end()) is not None:
        units.append(end)
    in_flight = record.get("answers_in_flight", False) is True
    return Recorded(number, "message", when, connection, shmem_bit, channel, sender,
                    tuple(units), files, decoding=framer.decoding,
                    answers_in_flight=in_flight)  # fmt: skip


def trace_record(unit: Unit, channel: ChannelKind, sender: str) -> dict[str, Any]:
    """A replayed unit as the live trace shows a message the tap sent on (a
    TraceRecord), or, for bytes that are not a message, what could be told of them
    (marked a reply when they came from the side that answers on `channel`, so that
    they are shown going the way they went)."""
    if unit.message is not None:
        data = summarize(unit.message)
    else:
        request = unit.request
        data = {
            "channel": channel.value,
            "request": "raw bytes" if request is None else request_name(channel, request),
            "id": request,
            "flags": 0,
            "reply": replies_from(channel, sender),
            "need_reply": False,
            "payload": unit.data.hex(),
            "fds": len(unit.fds),
        }
    if unit.problem:
        data["undecodable"] = unit.problem
    data["role"] = "tap"
    data["direction"] = "out"
    return data


def replay_events(path: str | Path) -> Iterator[dict[str, Any]]:
    """A recording's messages as the live trace's `message` events (from the tap), in
    order, each decoded again from its recorded bytes."""
    for record in replay(path):
        if record.channel is None or record.sender is None:
            continue
        for unit in record.units:
            yield {"event": Event.MESSAGE.value,
                   "data": trace_record(unit, record.channel, record.sender),
                   "timestamp": qmp_timestamp(record.time), "source": "tap"}  # fmt: skip
