"""The codec on bytes alone: schema vs hot-path twins, round trips, every header fault."""

from __future__ import annotations

import contextlib
import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmemctl.wire import (
    BackendReq,
    ChannelKind,
    FrontendReq,
    MessageReader,
    ShmemConfig,
    ShmemMap,
    WireError,
    WireFault,
    decode_body,
    decode_header,
    describe_result,
    encode,
    encode_shmem_request,
    encode_u64_reply,
    feature_names,
    result_from_errno,
)
from shmemctl.wire import structs as S
from shmemctl.wire.constants import SHMEM_BIT, ProtocolFeature, check_shmem_bit
from shmemctl.wire.messages import (
    DeviceConfig,
    MemoryRegion,
    MemoryTable,
    Raw,
    SingleMemoryRegion,
    VringAddr,
    VringState,
)

u8 = st.integers(0, 0xFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, (1 << 64) - 1)


def test_shmem_is_bit_22_in_one_constant() -> None:
    assert SHMEM_BIT == 22
    assert ProtocolFeature.SHMEM == 0x40_0000
    assert ProtocolFeature.GPA_ADDRESSES == 1 << 21
    assert feature_names(1 << 22) == ["SHMEM"]
    assert feature_names(1 << 21) == ["GPA_ADDRESSES"]
    assert feature_names(1 << 21, shmem_bit=21) == ["SHMEM@21"]
    assert check_shmem_bit(21) == 21
    with pytest.raises(ValueError, match="20 is not accepted"):
        check_shmem_bit(20)


def test_payload_sizes_are_byte_exact() -> None:
    assert S.VhostUserMMap.sizeof() == S.MMAP_STRUCT.size == 40
    assert S.VhostUserShMemConfig.sizeof() == S.SHMEM_CONFIG_STRUCT.size == 2056
    assert S.Header.sizeof() == S.HEADER.size == 12
    assert S.SingleMemoryRegion.sizeof() == 40


@pytest.mark.parametrize("name", sorted(S.TWINS))
@settings(max_examples=50)
@given(data=st.data())
def test_struct_twins_agree_with_the_construct_schema(name: str, data: st.DataObject) -> None:
    schema, twin = S.TWINS[name]
    raw = data.draw(st.binary(min_size=twin.size, max_size=twin.size))
    parsed = schema.parse(raw)
    assert tuple(_flat(parsed)) == twin.unpack(raw)
    # and building from the parsed values gives the same bytes, pad bytes zeroed
    rebuilt = schema.build(parsed)
    assert rebuilt == twin.pack(*twin.unpack(raw))


def _flat(value: object) -> list[int]:
    """A parsed construct value as the flat sequence struct gives."""
    if isinstance(value, dict):
        return [x for k, v in value.items() if not k.startswith("_") for x in _flat(v)]
    if isinstance(value, list):
        return [x for v in value for x in _flat(v)]
    return [value]  # type: ignore[list-item]


def test_a_layout_whose_size_depends_on_its_data_has_no_struct_twin() -> None:
    with pytest.raises(TypeError, match="no fixed struct form"):
        S.fixed(S.DeviceConfig)
    assert S.fixed(S.Header, S.U64).format == S.REPLY_U64.format


@given(shmid=u8, fd_offset=u64, shm_offset=u64, length=u64, flags=u64, need=st.booleans())
def test_shmem_request_round_trip(
    shmid: int, fd_offset: int, shm_offset: int, length: int, flags: int, need: bool
) -> None:
    m = ShmemMap(shmid, shm_offset, length, fd_offset, flags)
    raw = encode_shmem_request(BackendReq.SHMEM_MAP, m, need_reply=need)
    assert raw == encode(ChannelKind.BACKEND, BackendReq.SHMEM_MAP, m, need_reply=need)
    header = decode_header(raw[:12], replies=False)
    msg = decode_body(ChannelKind.BACKEND, header, raw[12:], (7,))
    assert msg.payload == m and msg.need_reply is need and msg.fds == (7,)


def test_pad_bytes_are_ignored_on_receive() -> None:
    raw = bytearray(S.MMAP_STRUCT.pack(3, 0, 0x1000, 0x2000, 1))
    raw[1:8] = b"\xff" * 7
    header = decode_header(S.HEADER.pack(9, 1, 40), replies=False)
    assert decode_body(ChannelKind.BACKEND, header, bytes(raw)).payload == ShmemMap(
        3, 0x1000, 0x2000, 0, 1
    )


PAYLOADS = [
    (FrontendReq.SET_FEATURES, 1 << 30),
    (FrontendReq.SET_VRING_NUM, VringState(1, 256)),
    (FrontendReq.SET_VRING_ADDR, VringAddr(0, 0, 1, 2, 3, 4)),
    (FrontendReq.SET_MEM_TABLE, MemoryTable((MemoryRegion(0, 4096, 0x7F00, 0),))),
    (FrontendReq.ADD_MEM_REG, SingleMemoryRegion(MemoryRegion(1, 2, 3, 4))),
    (FrontendReq.GET_CONFIG, DeviceConfig(0, 4, 0, b"abcd")),
    (FrontendReq.GET_FEATURES, None),
    (FrontendReq.SEND_RARP, Raw(b"\x01\x02\x03\x04\x05\x06\x00\x00")),
]


@pytest.mark.parametrize(("req", "payload"), PAYLOADS, ids=lambda x: getattr(x, "name", ""))
def test_main_channel_requests_round_trip(req: FrontendReq, payload: object) -> None:
    reader = MessageReader(ChannelKind.MAIN, replies=False)
    reader.feed(encode(ChannelKind.MAIN, req, payload))  # type: ignore[arg-type]
    (msg,) = list(reader)
    assert msg.request == req and msg.payload == payload


@given(sizes=st.dictionaries(st.integers(0, 255), st.integers(1, 1 << 40).map(lambda x: x << 12)))
def test_shmem_config_round_trip(sizes: dict[int, int]) -> None:
    config = ShmemConfig.from_regions(sizes)
    raw = encode(ChannelKind.MAIN, FrontendReq.GET_SHMEM_CONFIG, config, reply=True)
    assert len(raw) == 12 + 2056
    reader = MessageReader(ChannelKind.MAIN, replies=True)
    reader.feed(raw)
    (msg,) = list(reader)
    assert msg.payload == config
    assert msg.payload.regions() == sizes
    assert msg.payload.nregions == len(sizes)


def _header(request: int, flags: int, size: int) -> bytes:
    return struct.pack("<III", request, flags, size)


@pytest.mark.parametrize(
    ("raw", "replies", "fault"),
    [
        (_header(1, 0x0, 0), False, WireFault.BAD_VERSION),
        (_header(1, 0x2, 0), False, WireFault.BAD_VERSION),
        (_header(1, 0x11, 0), False, WireFault.RESERVED_FLAGS),
        (_header(1, 0x8000_0001, 0), False, WireFault.RESERVED_FLAGS),
        (_header(1, 0x1, 4097), False, WireFault.OVERSIZED),
        (_header(1, 0x1, 0xFFFF_FFFF), False, WireFault.OVERSIZED),
        (_header(9, 0x5, 8), False, WireFault.UNEXPECTED_REPLY),
        (_header(9, 0x1, 8), True, WireFault.UNEXPECTED_REQUEST),
        (_header(9, 0xD, 8), True, WireFault.NEED_REPLY_ON_REPLY),
    ],
)
def test_header_faults(raw: bytes, replies: bool, fault: WireFault) -> None:
    with pytest.raises(WireError) as info:
        decode_header(raw, replies=replies)
    assert info.value.fault is fault


@pytest.mark.parametrize(
    ("channel", "req", "size"),
    [
        (ChannelKind.BACKEND, BackendReq.SHMEM_MAP, 39),
        (ChannelKind.BACKEND, BackendReq.SHMEM_MAP, 48),
        (ChannelKind.BACKEND, BackendReq.SHMEM_UNMAP, 0),
        (ChannelKind.MAIN, FrontendReq.GET_FEATURES, 8),
        (ChannelKind.MAIN, FrontendReq.SET_FEATURES, 4),
        (ChannelKind.MAIN, FrontendReq.SET_MEM_TABLE, 8 + 31),
    ],
)
def test_wrong_payload_size_for_the_id(channel: ChannelKind, req: int, size: int) -> None:
    header = decode_header(_header(req, 1, size), replies=False)
    with pytest.raises(WireError) as info:
        decode_body(channel, header, bytes(size))
    assert info.value.fault is WireFault.BAD_PAYLOAD_SIZE


def test_shmem_config_with_nregions_over_256_is_a_protocol_error() -> None:
    raw = S.SHMEM_CONFIG_STRUCT.pack(257, 0, *([0] * 256))
    header = decode_header(_header(44, 0x5, len(raw)), replies=True)
    with pytest.raises(WireError) as info:
        decode_body(ChannelKind.MAIN, header, raw)
    assert info.value.fault is WireFault.BAD_FIELD


def test_fds_where_none_belong_are_surplus() -> None:
    header = decode_header(_header(FrontendReq.GET_FEATURES, 1, 0), replies=False)
    msg = decode_body(ChannelKind.MAIN, header, b"", (5, 6))
    assert msg.fds == () and msg.surplus_fds == (5, 6)
    header = decode_header(_header(BackendReq.SHMEM_UNMAP, 1, 40), replies=False)
    msg = decode_body(ChannelKind.BACKEND, header, bytes(40), (9,))
    assert msg.fds == () and msg.surplus_fds == (9,)
    header = decode_header(_header(BackendReq.SHMEM_MAP, 1, 40), replies=False)
    msg = decode_body(ChannelKind.BACKEND, header, bytes(40), tuple(range(10)))
    assert msg.fds == tuple(range(8)) and msg.surplus_fds == (8, 9)
    # a reply never carries fds
    header = decode_header(_header(BackendReq.SHMEM_MAP, 5, 8), replies=True)
    msg = decode_body(ChannelKind.BACKEND, header, bytes(8), (3,))
    assert msg.surplus_fds == (3,)


@settings(max_examples=100)
@given(
    count=st.integers(1, 6),
    cuts=st.lists(st.integers(0, 400), max_size=8),
)
def test_reader_reassembles_any_split_and_attaches_fds(count: int, cuts: list[int]) -> None:
    """fds ride on the first byte of a header, wherever the stream was cut."""
    messages = [
        encode_shmem_request(BackendReq.SHMEM_MAP, ShmemMap(i, i << 12, 4096), need_reply=True)
        for i in range(count)
    ]
    stream = b"".join(messages)
    reader = MessageReader(ChannelKind.BACKEND, replies=False)
    # Cut so that every message start begins a chunk (that is how the kernel delivers fds).
    points = sorted({*(c % len(stream) for c in cuts), *(52 * i for i in range(count))})
    points = [p for p in points if p < len(stream)] + [len(stream)]
    out = []
    for a, b in itertools.pairwise(points):
        fds = (100 + a // 52,) if a % 52 == 0 else ()
        reader.feed(stream[a:b], fds)
        out.extend(reader)
    reader.close()
    assert [m.payload.shmid for m in out] == list(range(count))
    assert [m.fds for m in out] == [(100 + i,) for i in range(count)]


@settings(max_examples=100)
@given(
    carries=st.lists(st.booleans(), min_size=1, max_size=8),
    cuts=st.lists(st.integers(0, 500), max_size=8),
)
def test_reader_gives_fds_to_the_message_holding_the_last_byte(
    carries: list[bool], cuts: list[int]
) -> None:
    """Read ahead, a chunk may hold several messages: a Unix stream socket ends a read
    with the first piece that carried fds, so a chunk's fds are those of the message
    its last byte is in, however many fd-less messages came before it."""
    messages = [
        encode_shmem_request(
            BackendReq.SHMEM_MAP if fd else BackendReq.SHMEM_UNMAP,
            ShmemMap(i, i << 12, 4096), need_reply=False,
        )
        for i, fd in enumerate(carries)
    ]  # fmt: skip
    stream = b"".join(messages)
    ends = list(itertools.accumulate(len(m) for m in messages))
    # the kernel's cuts: anywhere, but always at the end of a message that carried fds
    points = sorted({0, *(c % len(stream) for c in cuts), *(e for e, fd in zip(ends, carries,
                     strict=True) if fd)})  # fmt: skip
    points = [p for p in points if p < len(stream)] + [len(stream)]
    reader = MessageReader(ChannelKind.BACKEND, replies=False)
    out = []
    for a, b in itertools.pairwise(points):
        owner = next(i for i, e in enumerate(ends) if b <= e)  # holds byte b - 1
        start = ends[owner - 1] if owner else 0
        # the fds come with the first piece of their message that is read
        fds = (100 + owner,) if carries[owner] and a <= start else ()
        reader.feed(stream[a:b], fds)
        out.extend(reader)
    reader.close()
    assert [m.payload.shmid for m in out] == list(range(len(carries)))
    assert [m.fds for m in out] == [(100 + i,) if fd else () for i, fd in enumerate(carries)]


def test_reader_discards_fds_that_end_inside_a_refused_message() -> None:
    """A chunk whose last byte is in a refused message's discarded payload gives its
    fds to nobody: they wait in `discarded` for the caller to close."""
    reader = MessageReader(ChannelKind.BACKEND, replies=False)
    bad = struct.pack("<III", 9, 0x2, 40)  # a MAP header of version 2: refused
    with pytest.raises(WireError):
        reader.feed(bad)
        list(reader)
    reader.feed(bytes(40), (7,))  # the payload it announced, carrying an fd
    assert reader.discarded == [7]
    good = encode_shmem_request(BackendReq.SHMEM_UNMAP, ShmemMap(0, 0, 4096), need_reply=False)
    reader.feed(good)
    assert [m.fds for m in reader] == [()]


def test_reader_close_inside_a_message_is_truncation() -> None:
    reader = MessageReader(ChannelKind.BACKEND, replies=False)
    reader.feed(
        encode_shmem_request(BackendReq.SHMEM_UNMAP, ShmemMap(0, 0, 4096), need_reply=False)[:30]
    )
    assert reader.next_message() is None
    with pytest.raises(WireError) as info:
        reader.close()
    assert info.value.fault is WireFault.TRUNCATED


@settings(max_examples=300)
@given(st.binary(max_size=600), st.booleans())
def test_garbage_gives_messages_or_a_wire_error_never_anything_else(
    raw: bytes, replies: bool
) -> None:
    for channel in ChannelKind:
        reader = MessageReader(channel, replies=replies)
        reader.feed(raw)
        with contextlib.suppress(WireError):
            list(reader)


def test_replies_are_explicit_u64s() -> None:
    assert encode_u64_reply(9, 0) == struct.pack("<IIIQ", 9, 0x5, 8, 0)
    assert encode_u64_reply(9, result_from_errno(17)) == struct.pack("<IIIQ", 9, 5, 8, 2**64 - 17)
    assert describe_result(0) == "ok"
    assert describe_result(result_from_errno(17)).startswith("EEXIST (-17")
    assert describe_result(1) == "failed (reply value 1)"


def test_the_reader_says_how_much_to_read_next() -> None:
    data = encode_shmem_request(BackendReq.SHMEM_MAP, ShmemMap(0, 0, 4096), need_reply=True)
    reader = MessageReader(ChannelKind.BACKEND, replies=False)
    assert reader.wanted == 12
    assert reader.receive(data[:5], (7,)) is None and reader.wanted == 7
    assert reader.receive(data[5:12]) is None and reader.wanted == 40
    assert reader.receive(data[12:30]) is None and reader.wanted == 22
    msg = reader.receive(data[30:])
    assert msg is not None and msg.fds == (7,) and reader.wanted == 12


def test_a_refused_header_is_dropped_with_its_payload_and_its_fds() -> None:
    bad = struct.pack("<III", BackendReq.SHMEM_MAP, 0x3 << 8 | 0x1, 8) + bytes(8)  # reserved bits
    good = encode_shmem_request(BackendReq.SHMEM_UNMAP, ShmemMap(0, 0, 4096), need_reply=False)
    reader = MessageReader(ChannelKind.BACKEND, replies=False)
    reader.feed(bad[:12], (5,))
    with pytest.raises(WireError) as info:
        reader.next_message()
    assert info.value.fault is WireFault.RESERVED_FLAGS and info.value.fds == (5,)
    assert reader.discarding == 8 and reader.wanted == 8
    reader.feed(bad[12:], (6,))  # fds on the refused payload are the caller's to close
    assert reader.discarded == [6] and reader.discarding == 0 and reader.wanted == 12
    msg = reader.receive(good)
    assert msg is not None and msg.name == "SHMEM_UNMAP" and msg.fds == ()


@pytest.mark.parametrize("fds", [(9,), ()], ids=["with-an-fd", "without-fds"])
def test_a_refused_payload_hands_back_its_fds_header_and_payload(fds: tuple[int, ...]) -> None:
    short = struct.pack("<III", BackendReq.SHMEM_MAP, 0x1, 8) + bytes(8)  # MMAP needs 40
    reader = MessageReader(ChannelKind.BACKEND, replies=False)
    reader.feed(short, fds)
    with pytest.raises(WireError) as info:
        reader.next_message()
    assert info.value.fault is WireFault.BAD_PAYLOAD_SIZE
    assert info.value.fds == fds and info.value.payload == bytes(8)
    header = info.value.header
    assert header is not None and (header.request, header.size) == (BackendReq.SHMEM_MAP, 8)
    assert reader.pending_fds() == () and reader.wanted == 12
