"""Typed vhost-user messages and a sans-I/O codec: bytes (and fd numbers) in, messages out.

Nothing here touches a socket or closes an fd. A decoded `Message` keeps the
fds that belong to it and lists the surplus separately; closing both is the
caller's job (see `shmemctl.channel`).
"""

from __future__ import annotations

import enum
import errno
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from . import structs as S
from .constants import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    KNOWN_FLAGS,
    MAX_BACKEND_FDS,
    MAX_FDS,
    MAX_PAYLOAD,
    SHMEM_SLOTS,
    VERSION,
    VERSION_MASK,
    BackendReq,
    ChannelKind,
    FrontendReq,
    request_name,
)

U64_MASK = (1 << 64) - 1
#: VhostUserMMap.flags bit 0: map read-write; every other bit is invalid.
MMAP_FLAG_WRITE = 0x1


class WireFault(enum.Enum):
    BAD_VERSION = "bad version bits"
    RESERVED_FLAGS = "reserved flag bits set"
    OVERSIZED = "payload larger than 4096 bytes"
    BAD_PAYLOAD_SIZE = "wrong payload size for this message"
    UNEXPECTED_REPLY = "REPLY flag on a message that must be a request"
    UNEXPECTED_REQUEST = "request where only replies belong"
    NEED_REPLY_ON_REPLY = "NEED_REPLY flag on a reply"
    BAD_FIELD = "field out of range"
    TRUNCATED = "stream ended inside a message"


class WireError(Exception):
    """A protocol error in the bytes: the connection cannot be trusted past it."""

    def __init__(self, fault: WireFault, detail: str) -> None:
        super().__init__(f"{fault.value}: {detail}")
        self.fault = fault
        self.detail = detail
        #: the fds the refused message brought (the caller closes them); and, when its
        #: header was sound but its payload was refused, that header and payload
        self.header: Header | None = None
        self.payload = b""
        self.fds: tuple[int, ...] = ()


# ---------------------------------------------------------------- payloads


class ShmemMap(NamedTuple):
    """VhostUserMMap: the payload of SHMEM_MAP and SHMEM_UNMAP.

    A NamedTuple, not a frozen dataclass, like every record built once per
    message: it constructs in a quarter of the time (`shmemctl bench --codec`)."""

    shmid: int
    shm_offset: int
    len: int
    fd_offset: int = 0
    flags: int = MMAP_FLAG_WRITE

    @property
    def writable(self) -> bool:
        return bool(self.flags & MMAP_FLAG_WRITE)


@dataclass(frozen=True, slots=True)
class ShmemConfig:
    """VhostUserShMemConfig: 256 region sizes indexed by shmid, plus nregions."""

    sizes: tuple[int, ...]
    nregions: int

    @classmethod
    def from_regions(cls, regions: dict[int, int]) -> ShmemConfig:
        sizes = [0] * SHMEM_SLOTS
        for shmid, size in regions.items():
            sizes[shmid] = size
        return cls(tuple(sizes), sum(1 for s in sizes if s))

    def regions(self) -> dict[int, int]:
        """shmid -> size for every region in use (the array is the truth, docs/protocol.md §6.3)."""
        return {shmid: size for shmid, size in enumerate(self.sizes) if size}


@dataclass(frozen=True, slots=True)
class VringState:
    index: int
    num: int


@dataclass(frozen=True, slots=True)
class VringAddr:
    index: int
    flags: int
    descriptor: int
    used: int
    available: int
    log: int


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    offset: int
    size: int
    flags: int
    data: bytes


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass(frozen=True, slots=True)
class MemoryTable:
    regions: tuple[MemoryRegion, ...]


@dataclass(frozen=True, slots=True)
class SingleMemoryRegion:
    region: MemoryRegion


@dataclass(frozen=True, slots=True)
class Raw:
    """A payload this codec does not interpret (an id we do not implement)."""

    data: bytes


Payload = (
    None
    | int
    | ShmemMap
    | ShmemConfig
    | VringState
    | VringAddr
    | DeviceConfig
    | MemoryTable
    | SingleMemoryRegion
    | Raw
)


class Kind(enum.Enum):
    EMPTY = "empty"
    U64 = "u64"
    VRING_STATE = "vring state"
    VRING_ADDR = "vring addr"
    MMAP = "VhostUserMMap"
    SHMEM_CONFIG = "VhostUserShMemConfig"
    DEVICE_CONFIG = "device config"
    MEM_TABLE = "memory table"
    SINGLE_REGION = "single memory region"
    RAW = "raw"


def _need(kind: Kind, data: bytes, size: int) -> None:
    if len(data) != size:
        raise WireError(
            WireFault.BAD_PAYLOAD_SIZE, f"{kind.value} is {size} bytes, got {len(data)}"
        )


def _decode_empty(data: bytes) -> None:
    _need(Kind.EMPTY, data, 0)


def _decode_u64(data: bytes) -> int:
    _need(Kind.U64, data, 8)
    value: int = S.U64_STRUCT.unpack(data)[0]
    return value


def _decode_vring_state(data: bytes) -> VringState:
    _need(Kind.VRING_STATE, data, 8)
    return VringState(*S.VRING_STATE_STRUCT.unpack(data))


def _decode_vring_addr(data: bytes) -> VringAddr:
    _need(Kind.VRING_ADDR, data, S.VRING_ADDR_STRUCT.size)
    return VringAddr(*S.VRING_ADDR_STRUCT.unpack(data))


def _decode_mmap(data: bytes) -> ShmemMap:
    _need(Kind.MMAP, data, 40)
    shmid, fd_offset, shm_offset, length, flags = S.MMAP_STRUCT.unpack(data)
    return ShmemMap(shmid, shm_offset, length, fd_offset, flags)


def _decode_shmem_config(data: bytes) -> ShmemConfig:
    _need(Kind.SHMEM_CONFIG, data, S.SHMEM_CONFIG_STRUCT.size)
    nregions, _pad, *sizes = S.SHMEM_CONFIG_STRUCT.unpack(data)
    if nregions > SHMEM_SLOTS:
        raise WireError(WireFault.BAD_FIELD, f"nregions {nregions} > {SHMEM_SLOTS}")
    return ShmemConfig(tuple(sizes), nregions)


def _decode_device_config(data: bytes) -> DeviceConfig:
    head = S.DEVICE_CONFIG_HEADER_STRUCT.size
    if len(data) < head:
        raise WireError(
            WireFault.BAD_PAYLOAD_SIZE, f"device config needs {head} bytes, got {len(data)}"
        )
    offset, size, flags = S.DEVICE_CONFIG_HEADER_STRUCT.unpack_from(data)
    _need(Kind.DEVICE_CONFIG, data, head + size)
    return DeviceConfig(offset, size, flags, bytes(data[head:]))


def _decode_mem_table(data: bytes) -> MemoryTable:
    head = S.MEMORY_TABLE_HEADER_STRUCT.size
    if len(data) < head:
        raise WireError(
            WireFault.BAD_PAYLOAD_SIZE, f"memory table needs {head} bytes, got {len(data)}"
        )
    nregions, _pad = S.MEMORY_TABLE_HEADER_STRUCT.unpack_from(data)
    if nregions > MAX_FDS:
        raise WireError(WireFault.BAD_FIELD, f"memory table nregions {nregions} > {MAX_FDS}")
    _need(Kind.MEM_TABLE, data, head + nregions * S.MEMORY_REGION_STRUCT.size)
    regions = tuple(
        MemoryRegion(*S.MEMORY_REGION_STRUCT.unpack_from(data, head + 32 * i))
        for i in range(nregions)
    )
    return MemoryTable(regions)


def _decode_single_region(data: bytes) -> SingleMemoryRegion:
    _need(Kind.SINGLE_REGION, data, 40)
    return SingleMemoryRegion(MemoryRegion(*S.MEMORY_REGION_STRUCT.unpack_from(data, 8)))


def _decode_raw(data: bytes) -> Raw:
    return Raw(bytes(data))


_DECODERS = {
    Kind.EMPTY: _decode_empty,
    Kind.U64: _decode_u64,
    Kind.VRING_STATE: _decode_vring_state,
    Kind.VRING_ADDR: _decode_vring_addr,
    Kind.MMAP: _decode_mmap,
    Kind.SHMEM_CONFIG: _decode_shmem_config,
    Kind.DEVICE_CONFIG: _decode_device_config,
    Kind.MEM_TABLE: _decode_mem_table,
    Kind.SINGLE_REGION: _decode_single_region,
    Kind.RAW: _decode_raw,
}


def encode_payload(payload: Payload) -> bytes:
    match payload:
        case None:
            return b""
        case bool():
            raise TypeError("a u64 payload must be an int, not a bool")
        case int():
            return S.U64_STRUCT.pack(payload & U64_MASK)
        case ShmemMap():
            return S.MMAP_STRUCT.pack(
                payload.shmid, payload.fd_offset, payload.shm_offset, payload.len, payload.flags
            )
        case ShmemConfig():
            return S.SHMEM_CONFIG_STRUCT.pack(payload.nregions, 0, *payload.sizes)
        case VringState():
            return S.VRING_STATE_STRUCT.pack(payload.index, payload.num)
        case VringAddr():
            return S.VRING_ADDR_STRUCT.pack(
                payload.index,
                payload.flags,
                payload.descriptor,
                payload.used,
                payload.available,
                payload.log,
            )
        case DeviceConfig():
            head = S.DEVICE_CONFIG_HEADER_STRUCT.pack(payload.offset, payload.size, payload.flags)
            return head + payload.data
        case MemoryTable():
            parts = [S.MEMORY_TABLE_HEADER_STRUCT.pack(len(payload.regions), 0)]
            parts += [_pack_region(r) for r in payload.regions]
            return b"".join(parts)
        case SingleMemoryRegion():
            return S.U64_STRUCT.pack(0) + _pack_region(payload.region)
        case Raw():
            return payload.data
    raise TypeError(f"cannot encode payload {payload!r}")


def _pack_region(r: MemoryRegion) -> bytes:
    return S.MEMORY_REGION_STRUCT.pack(
        r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset
    )


# ------------------------------------------------------- what each id carries


@dataclass(frozen=True, slots=True)
class Spec:
    """What a request carries, what its reply carries, and how many fds it may bring."""

    request: Kind
    reply: Kind = Kind.U64
    max_fds: int = 0
    #: the request has a reply of its own; otherwise only an ack, when asked
    own_reply: bool = False


_MAIN: dict[int, Spec] = {
    FrontendReq.GET_FEATURES: Spec(Kind.EMPTY, own_reply=True),
    FrontendReq.SET_FEATURES: Spec(Kind.U64),
    FrontendReq.SET_OWNER: Spec(Kind.EMPTY),
    FrontendReq.RESET_OWNER: Spec(Kind.EMPTY),
    FrontendReq.SET_MEM_TABLE: Spec(Kind.MEM_TABLE, max_fds=MAX_FDS),
    FrontendReq.SET_VRING_NUM: Spec(Kind.VRING_STATE),
    FrontendReq.SET_VRING_ADDR: Spec(Kind.VRING_ADDR),
    FrontendReq.SET_VRING_BASE: Spec(Kind.VRING_STATE),
    FrontendReq.GET_VRING_BASE: Spec(Kind.VRING_STATE, Kind.VRING_STATE, own_reply=True),
    FrontendReq.SET_VRING_KICK: Spec(Kind.U64, max_fds=1),
    FrontendReq.SET_VRING_CALL: Spec(Kind.U64, max_fds=1),
    FrontendReq.SET_VRING_ERR: Spec(Kind.U64, max_fds=1),
    FrontendReq.GET_PROTOCOL_FEATURES: Spec(Kind.EMPTY, own_reply=True),
    FrontendReq.SET_PROTOCOL_FEATURES: Spec(Kind.U64),
    FrontendReq.GET_QUEUE_NUM: Spec(Kind.EMPTY, own_reply=True),
    FrontendReq.SET_VRING_ENABLE: Spec(Kind.VRING_STATE),
    FrontendReq.SET_BACKEND_REQ_FD: Spec(Kind.EMPTY, max_fds=1),
    FrontendReq.GET_CONFIG: Spec(Kind.DEVICE_CONFIG, Kind.DEVICE_CONFIG, own_reply=True),
    FrontendReq.SET_CONFIG: Spec(Kind.DEVICE_CONFIG),
    FrontendReq.RESET_DEVICE: Spec(Kind.EMPTY),
    FrontendReq.GET_MAX_MEM_SLOTS: Spec(Kind.EMPTY, own_reply=True),
    FrontendReq.ADD_MEM_REG: Spec(Kind.SINGLE_REGION, max_fds=1),
    FrontendReq.REM_MEM_REG: Spec(Kind.SINGLE_REGION),
    FrontendReq.SET_STATUS: Spec(Kind.U64),
    FrontendReq.GET_STATUS: Spec(Kind.EMPTY, own_reply=True),
    FrontendReq.GET_SHMEM_CONFIG: Spec(Kind.EMPTY, Kind.SHMEM_CONFIG, own_reply=True),
    # Requests this project does not implement but whose replies are their own: a
    # device that cannot give one must hang up rather than ack (docs/protocol.md §3).
    FrontendReq.POSTCOPY_ADVISE: Spec(Kind.RAW, Kind.RAW, own_reply=True),
    FrontendReq.GET_INFLIGHT_FD: Spec(Kind.RAW, Kind.RAW, own_reply=True),
    FrontendReq.GET_SHARED_OBJECT: Spec(Kind.RAW, Kind.RAW, own_reply=True),
    FrontendReq.SET_DEVICE_STATE_FD: Spec(Kind.RAW, Kind.RAW, max_fds=1, own_reply=True),
    FrontendReq.CHECK_DEVICE_STATE: Spec(Kind.RAW, Kind.RAW, own_reply=True),
}
_BACKEND: dict[int, Spec] = {
    BackendReq.CONFIG_CHANGE_MSG: Spec(Kind.EMPTY),
    # Exactly one fd is a validation rule of the front-end (docs/protocol.md §5 step 2),
    # answered with a failure reply, not a protocol error.
    BackendReq.SHMEM_MAP: Spec(Kind.MMAP, max_fds=MAX_BACKEND_FDS),
    BackendReq.SHMEM_UNMAP: Spec(Kind.MMAP),
}
_UNKNOWN = Spec(Kind.RAW, Kind.RAW)
_SPECS = {ChannelKind.MAIN: _MAIN, ChannelKind.BACKEND: _BACKEND}


def spec_of(channel: ChannelKind, request: int) -> Spec:
    return _SPECS[channel].get(request, _UNKNOWN)


Decoder = Callable[[bytes], Payload]
# Per request id: (request decoder, reply decoder, fds the request may carry).
# Keyed by plain ints so decoding hashes no Enum (Enum.__hash__ runs in Python).
_Route = tuple[Decoder, Decoder, int]
_ROUTES: dict[ChannelKind, dict[int, _Route]] = {
    channel: {
        int(req): (_DECODERS[spec.request], _DECODERS[spec.reply], spec.max_fds)
        for req, spec in specs.items()
    }
    for channel, specs in _SPECS.items()
}
_MAIN_ROUTES = _ROUTES[ChannelKind.MAIN]
_BACKEND_ROUTES = _ROUTES[ChannelKind.BACKEND]
_UNKNOWN_ROUTE: _Route = (_decode_raw, _decode_raw, 0)
# Every reply on the backend channel is a u64, whatever the request was.
_UNKNOWN_BACKEND_ROUTE: _Route = (_decode_raw, _decode_u64, 0)


# ----------------------------------------------------------------- messages


class Message(NamedTuple):
    channel: ChannelKind
    request: int
    flags: int
    payload: Payload = None
    #: fds that belong to this message; whoever handles it closes them.
    fds: tuple[int, ...] = ()
    #: fds beyond what this message may carry; the receiver closes them at once.
    surplus_fds: tuple[int, ...] = ()

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def name(self) -> str:
        return request_name(self.channel, self.request)


_REPLY_FLAGS = VERSION | FLAG_REPLY
_NEED_REPLY_FLAGS = VERSION | FLAG_NEED_REPLY


class Header(NamedTuple):
    request: int
    flags: int
    size: int


def decode_header(data: bytes | bytearray, *, replies: bool) -> Header:
    """Check the 12-byte header at the start of `data`; `replies` says which kind the
    reader expects."""
    request, flags, size = S.HEADER.unpack_from(data)
    if (size <= MAX_PAYLOAD and flags == (_REPLY_FLAGS if replies else VERSION)) or (
        not replies and flags == _NEED_REPLY_FLAGS and size <= MAX_PAYLOAD
    ):
        return Header(request, flags, size)  # the common, well-formed cases
    if flags & VERSION_MASK != VERSION:
        raise WireError(
            WireFault.BAD_VERSION, f"flags 0x{flags:x}: version {flags & VERSION_MASK}, expected 1"
        )
    if flags & ~KNOWN_FLAGS:
        raise WireError(
            WireFault.RESERVED_FLAGS, f"flags 0x{flags:x} has bits 0x{flags & ~KNOWN_FLAGS:x}"
        )
    if size > MAX_PAYLOAD:
        raise WireError(WireFault.OVERSIZED, f"request {request} announces {size} bytes")
    if flags & FLAG_REPLY:
        if not replies:
            raise WireError(WireFault.UNEXPECTED_REPLY, f"request {request} with flags 0x{flags:x}")
        if flags & FLAG_NEED_REPLY:
            raise WireError(WireFault.NEED_REPLY_ON_REPLY, f"reply {request} flags 0x{flags:x}")
    elif replies:
        raise WireError(
            WireFault.UNEXPECTED_REQUEST, f"request {request} (flags 0x{flags:x}) on a reply stream"
        )
    return Header(request, flags, size)


def decode_body(
    channel: ChannelKind, header: Header, payload: bytes, fds: Sequence[int] = ()
) -> Message:
    """Decode the payload of a checked header. fds past the id's allowance go to surplus."""
    if channel is ChannelKind.MAIN:
        route = _MAIN_ROUTES.get(header.request, _UNKNOWN_ROUTE)
    else:
        route = _BACKEND_ROUTES.get(header.request, _UNKNOWN_BACKEND_ROUTE)
    decode_request, decode_reply, allowed = route
    if header.flags & FLAG_REPLY:
        value = decode_reply(payload)
        allowed = 0
    else:
        value = decode_request(payload)
    if not fds:
        return Message(channel, header.request, header.flags, value)
    fds = tuple(fds)
    return Message(channel, header.request, header.flags, value, fds[:allowed], fds[allowed:])


def encode(
    channel: ChannelKind,
    request: int,
    payload: Payload = None,
    *,
    reply: bool = False,
    need_reply: bool = False,
) -> bytes:
    """Header + payload bytes of one message (fds travel beside it, see channel)."""
    del channel  # the id spaces differ, the encoding does not
    body = encode_payload(payload)
    flags = VERSION | (FLAG_REPLY if reply else 0) | (FLAG_NEED_REPLY if need_reply else 0)
    return S.HEADER.pack(request, flags, len(body)) + body


def encode_u64_reply(request: int, value: int) -> bytes:
    """A u64 reply (acks, results): one pack, explicitly built (the seeds' stale-bytes bug)."""
    return S.REPLY_U64.pack(request, _REPLY_FLAGS, 8, value & U64_MASK)


def encode_shmem_request(request: int, m: ShmemMap, *, need_reply: bool) -> bytes:
    """SHMEM_MAP / SHMEM_UNMAP with its payload: the back-end's hot path in one pack."""
    flags = VERSION | FLAG_NEED_REPLY if need_reply else VERSION
    return S.REQUEST_MMAP.pack(
        request, flags, 40, m.shmid, m.fd_offset, m.shm_offset, m.len, m.flags
    )


# ------------------------------------------------------------ result values


def result_from_errno(err: int) -> int:
    """The u64 we reply for a failure: the negated errno (docs/protocol.md §6.7)."""
    return -err & U64_MASK


def errno_name(value: int) -> str | None:
    """The errno name a negated-errno reply carries, or None for 0 / other values."""
    if value >= 1 << 63:
        return errno.errorcode.get((1 << 64) - value)
    return None


def describe_reply(value: int | None) -> str:
    """Short form of a SHMEM answer: 'ok', 'EEXIST', 'refused (reply value 1)' for a
    refusal that carries no errno (QEMU's), or 'sent (no reply asked)'."""
    if value is None:
        return "sent (no reply asked)"
    if value == 0:
        return "ok"
    return errno_name(value) or f"refused (reply value {value})"


def describe_result(value: int) -> str:
    """Long form of a u64 reply: 'ok', 'EEXIST (-17: File exists)', or the raw value."""
    name = errno_name(value) if value else None
    if name:
        err = (1 << 64) - value
        return f"{name} (-{err}: {os.strerror(err)})"
    return "ok" if value == 0 else f"failed (reply value {value})"


# --------------------------------------------------------- sans-I/O reader


class MessageReader:
    """Feed bytes and fds as they arrive; take complete messages out. The channel reads
    through this, as the fuzzer does: `wanted` says how many bytes the next message
    still needs; a reader may read more (several messages in one read), and the reader
    keeps what follows for the next message.

    fds that arrive with a chunk belong to the message holding the chunk's last byte.
    A sender puts a message and its fds in one sendmsg, and a Unix stream socket ends a
    read with the first piece of data that carried fds, so the fds of a read are those
    of its last piece: the last message that starts in the chunk, or the one the chunk
    continues if none starts in it. A reader that never reads past what `wanted` asks
    for never lets a chunk span two messages, and then this is the message the chunk
    starts in.

    A message whose header is refused is discarded with its payload (when the size it
    announces is sane), so that whoever reports the fault can go on reading; the fds
    that came with discarded bytes wait in `discarded` for the caller to close. A
    message whose payload is refused is consumed, and the WireError carries its fds.
    """

    def __init__(self, channel: ChannelKind, *, replies: bool) -> None:
        self.channel = channel
        self.replies = replies
        #: bytes the next message (or the rest of a refused one) still needs; 0 when
        #: `next_message` has a message or an error to give
        self.wanted = HEADER_SIZE
        #: fds that came with discarded bytes; the caller takes and closes them
        self.discarded: list[int] = []
        self._buf = bytearray()
        self._consumed = 0  # stream offset of _buf[0]
        self._fds: deque[tuple[int, tuple[int, ...]]] = deque()
        self._header: Header | None = None  # of the message at _buf[0], once checked
        self._skip = 0  # payload bytes of a refused message still to discard

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if fds:
            if len(data) <= self._skip:
                self.discarded.extend(fds)  # the chunk ends inside the refused message
            else:  # at the stream offset of the chunk's last byte
                last = self._consumed + len(self._buf) + len(data) - 1
                self._fds.append((last, tuple(fds)))
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            self._consumed += dropped
            data = data[dropped:]
        self._buf += data
        self._want()

    def receive(self, data: bytes, fds: Sequence[int] = ()) -> Message | None:
        """`feed`, then `next_message`: what a channel does with each chunk it reads."""
        if not self._buf and not self._skip and not self._fds and len(data) > HEADER_SIZE:
            # reading ahead, a chunk is most often one whole message: decoded as it came
            try:
                header: Header | None = decode_header(data, replies=self.replies)
            except WireError:
                header = None  # the long way reports it, and discards what it must
            if header is not None and HEADER_SIZE + header.size == len(data):
                self._consumed += len(data)
                payload = data[HEADER_SIZE:]
                try:
                    return decode_body(self.channel, header, payload, fds)
                except WireError as exc:
                    exc.fds, exc.header, exc.payload = tuple(fds), header, payload
                    raise
        self.feed(data, fds)
        return None if self.wanted else self.next_message()

    def _want(self) -> None:
        if self._skip:
            self.wanted = self._skip
            return
        have = len(self._buf)
        header = self._header
        if header is not None:
            self.wanted = max(0, HEADER_SIZE + header.size - have)
        elif have < HEADER_SIZE:
            self.wanted = HEADER_SIZE - have
        else:
            self.wanted = 0  # a header to judge

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished message held."""
        return len(self._buf)

    @property
    def discarding(self) -> int:
        """Bytes of a refused message still to come and be dropped."""
        return self._skip

    def next_message(self) -> Message | None:
        buf = self._buf
        have = len(buf)
        header = self._header
        if header is None:
            if have < HEADER_SIZE:
                return None
            try:
                header = decode_header(buf, replies=self.replies)
            except WireError as exc:
                exc.fds = self._discard_refused()
                raise
            self._header = header
        end = HEADER_SIZE + header.size
        if have < end:
            self.wanted = end - have
            return None
        payload = bytes(buf[HEADER_SIZE:end])
        if have == end:
            buf.clear()  # the usual case: the channel reads one message at a time
        else:
            del buf[:end]
        limit = self._consumed = self._consumed + end
        self._header = None
        self._want()
        queued = self._fds
        fds: list[int] = []
        while queued and queued[0][0] < limit:
            fds.extend(queued.popleft()[1])
        try:
            return decode_body(self.channel, header, payload, fds)
        except WireError as exc:
            # what was refused, for whoever reports it (the trace, the tap)
            exc.fds, exc.header, exc.payload = tuple(fds), header, payload
            raise

    def _discard_refused(self) -> tuple[int, ...]:
        """Drop a refused header and, if its size is sane, the payload it announces;
        return the fds that came with them."""
        size = int.from_bytes(self._buf[8:12], "little")
        size = size if size <= MAX_PAYLOAD else 0
        gone = min(len(self._buf), HEADER_SIZE + size)
        del self._buf[:gone]
        self._consumed += gone
        self._skip = HEADER_SIZE + size - gone
        self._want()
        fds: list[int] = []
        while self._fds and self._fds[0][0] < self._consumed:
            fds.extend(self._fds.popleft()[1])
        return tuple(fds)

    def __iter__(self) -> Iterator[Message]:
        while (message := self.next_message()) is not None:
            yield message

    def pending_fds(self) -> tuple[int, ...]:
        """fds fed but not yet handed out in a message (the caller closes them at EOF)."""
        return tuple(fd for _, group in self._fds for fd in group)

    def take_pending_fds(self) -> tuple[int, ...]:
        """`pending_fds`, which from now on belong to the caller."""
        fds = self.pending_fds()
        self._fds.clear()
        return fds

    def close(self) -> None:
        """End of stream: a partial message left over is a protocol error."""
        if self._buf:
            raise WireError(WireFault.TRUNCATED, f"{len(self._buf)} bytes of an unfinished message")


# ------------------------------------------------------------ for people


def summarize(msg: Message) -> dict[str, object]:
    """A message as JSON-ready data: for traces, logs and conformance reports."""
    payload = msg.payload
    value: object
    if isinstance(payload, ShmemConfig):
        value = {"nregions": payload.nregions, "sizes": payload.regions()}
    elif isinstance(payload, ShmemMap):
        value = payload._asdict()
    elif isinstance(payload, Raw):
        value = payload.data.hex()
    elif isinstance(payload, MemoryTable):
        value = [_fields(r) for r in payload.regions]
    elif payload is None or isinstance(payload, int):
        value = payload
    else:
        value = _fields(payload)
    return {
        "channel": msg.channel.value,
        "request": msg.name,
        "id": msg.request,
        "flags": msg.flags,
        "reply": msg.is_reply,
        "need_reply": msg.need_reply,
        "payload": value,
        "fds": len(msg.fds),
    }


def _fields(obj: object) -> dict[str, object]:
    out: dict[str, object] = {}
    for name in getattr(obj, "__slots__", ()):
        v = getattr(obj, name)
        out[name] = (
            v.hex() if isinstance(v, bytes) else _fields(v) if hasattr(v, "__slots__") else v
        )
    return out
