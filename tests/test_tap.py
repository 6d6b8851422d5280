"""The tap's framer: what a relay forwards as one piece, checked in memory."""

from __future__ import annotations

from shmemctl.tap.framer import RAW_CHUNK, Framer
from shmemctl.wire import BackendReq, ChannelKind, FrontendReq, ShmemMap, encode
from shmemctl.wire.messages import encode_shmem_request, encode_u64_reply

from .conftest import MiB

# ------------------------------------------------------------------ the framer, in memory


def feed_all(framer: Framer, data: bytes, fds_at: dict[int, list[int]] | None = None) -> list:
    """Feed `data` as a relay reads it (`wanted` bytes at a time); the units out."""
    fds_at = fds_at or {}
    units, offset = [], 0
    while offset < len(data):
        n = min(framer.wanted, len(data) - offset)
        unit = framer.feed(data[offset : offset + n], fds_at.get(offset, []))
        offset += n
        if unit is not None:
            units.append(unit)
    return units


def test_the_framer_cuts_messages_exactly_and_keeps_fds_with_theirs() -> None:
    m = ShmemMap(0, 0, MiB, 0, 1)
    first = encode_shmem_request(BackendReq.SHMEM_MAP, m, need_reply=True)
    second = encode_shmem_request(BackendReq.SHMEM_UNMAP, m._replace(flags=0), need_reply=False)
    framer = Framer(ChannelKind.BACKEND, replies=False)
    units = feed_all(framer, first + second, {0: [101]})
    assert [u.data for u in units] == [first, second]
    assert [u.fds for u in units] == [(101,), ()]
    assert [u.message.name for u in units] == ["SHMEM_MAP", "SHMEM_UNMAP"]
    assert all(u.framed and not u.problem for u in units)


def test_a_payload_the_codec_refuses_is_still_one_unit_and_decoding_goes_on() -> None:
    short = encode(ChannelKind.MAIN, FrontendReq.GET_FEATURES, None, reply=True)[: -0 or None]
    wrong = short[:8] + (4).to_bytes(4, "little") + b"\x01\x02\x03\x04"  # 4 bytes, not 8
    good = encode_u64_reply(FrontendReq.GET_FEATURES, 1 << 30)
    framer = Framer(ChannelKind.MAIN, replies=True)
    bad_unit, good_unit = feed_all(framer, wrong + good)
    assert bad_unit.data == wrong and bad_unit.framed
    assert "wrong payload size" in bad_unit.problem and bad_unit.request == 1
    assert bad_unit.message is not None and bad_unit.message.is_reply  # what is owed stays right
    assert good_unit.data == good and good_unit.message.payload == 1 << 30
    assert framer.decoding


def test_a_reply_with_need_reply_keeps_its_framing_and_reaches_the_observer() -> None:
    echoed = bytearray(encode_u64_reply(FrontendReq.GET_FEATURES, 5))
    echoed[4] = 0xD  # libvhost-user's echo of NEED_REPLY into a getter's reply
    framer = Framer(ChannelKind.MAIN, replies=True)
    (unit,) = feed_all(framer, bytes(echoed))
    assert unit.data == echoed and "NEED_REPLY flag on a reply" in unit.problem
    assert unit.message is not None and unit.message.payload == 5
    assert framer.decoding


def test_an_unknown_id_is_forwarded_whole_and_named() -> None:
    odd = encode(ChannelKind.MAIN, 99, None) + b""
    framer = Framer(ChannelKind.MAIN, replies=False)
    (unit,) = feed_all(framer, odd)
    assert unit.data == odd and unit.problem == "unknown main-channel request id 99"


def test_garbage_loses_the_framing_and_then_every_chunk_goes_as_it_came() -> None:
    framer = Framer(ChannelKind.MAIN, replies=False)
    garbage = b"\xde\xad\xbe\xef" * 3
    (unit,) = feed_all(framer, garbage, {0: [7, 8]})
    assert unit.data == garbage and unit.fds == (7, 8) and not unit.framed
    assert "the framing is lost" in unit.problem and not framer.decoding
    assert framer.wanted == RAW_CHUNK
    rest = framer.feed(b"anything at all", [9])
    assert rest is not None and (rest.data, rest.fds, rest.problem) == (
        b"anything at all",
        (9,),
        "",
    )


def test_a_stream_that_ends_inside_a_message_gives_back_what_came() -> None:
    framer = Framer(ChannelKind.MAIN, replies=False)
    whole = encode(ChannelKind.MAIN, FrontendReq.SET_FEATURES, 1)
    assert feed_all(framer, whole[:15], {0: [5]}) == []
    assert framer.held_fds == (5,)
    unit = framer.end()
    assert unit is not None and (unit.data, unit.fds, unit.framed) == (whole[:15], (5,), False)
    assert "ended inside a message" in unit.problem and framer.end() is None
