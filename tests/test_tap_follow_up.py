"""reply-before-follow-up on a live tap: a front-end that asks the back-end something
(QEMU's ADD_MEM_REG after a map) before answering the map is caught; one that answers
first and asks at once is never accused, however the tap's two threads interleave the
two channels. This test plays both peers, byte by byte."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from shmemctl.conformance.recording import check_recording
from shmemctl.conformance.report import FAIL, PASS
from shmemctl.events import Event
from shmemctl.session.common import Rule
from shmemctl.wire import BackendReq, ChannelKind, FrontendReq, ShmemMap, encode
from shmemctl.wire.constants import ProtocolFeature
from shmemctl.wire.messages import (
    MemoryRegion,
    SingleMemoryRegion,
    encode_shmem_request,
    encode_u64_reply,
)

from .conftest import PAGE, memfd
from .test_events import wait_event
from .test_tap import RawPeers, hand_over_backend_channel, raw_pair, recv_exactly, send_with

MAIN = ChannelKind.MAIN
NEGOTIATED = ProtocolFeature.REPLY_ACK | ProtocolFeature.BACKEND_REQ | (1 << 22)


def through(src: socket.socket, dst: socket.socket, data: bytes, fds: list[int] | None = None):
    """Send `data` (with `fds`) on `src`; take it off `dst` as the tap relayed it."""
    if fds:
        send_with(src, data, fds)
    else:
        src.sendall(data)
    got, passed = recv_exactly(dst, len(data))
    assert got == data
    for fd in passed:
        os.close(fd)


@pytest.fixture
def negotiated(spawn, tmp_path) -> Iterator[tuple[RawPeers, socket.socket, socket.socket]]:
    """The tap between this test's two peers, SHMEM and REPLY_ACK acked, the backend
    channel open: (the peers, the front-end's end of the backend channel, the
    back-end's)."""
    peers = raw_pair(spawn, tmp_path, "--record", str(tmp_path / "rec.jsonl"))
    front, back = peers[0], peers[1]
    try:
        through(front, back, encode(MAIN, FrontendReq.SET_PROTOCOL_FEATURES, int(NEGOTIATED)))
        ours, given = hand_over_backend_channel(front, back)
        yield peers, ours, given
        ours.close()
        given.close()
    finally:
        front.close()
        back.close()


def announce(shm_offset: int) -> bytes:
    region = SingleMemoryRegion(MemoryRegion(0x1_0000_0000 + shm_offset, PAGE, 0, 0))
    return encode(MAIN, FrontendReq.ADD_MEM_REG, region, need_reply=True)  # type: ignore[arg-type]


def recorded_verdict(tmp_path) -> str:
    report = check_recording(tmp_path / "rec.jsonl", reply_deadline=None)
    return report.verdicts[Rule.REPLY_BEFORE_FOLLOW_UP.label]


def test_asking_before_answering_a_map_is_caught(negotiated, tmp_path) -> None:
    (front, back, tap, _proc), ours, given = negotiated
    buffer = memfd(PAGE)
    try:
        m = ShmemMap(0, 0, PAGE, 0, 1)
        through(given, ours, encode_shmem_request(BackendReq.SHMEM_MAP, m, need_reply=True),
                [buffer])  # fmt: skip
        # the front-end asks first, and waits for the answer before answering the map
        through(front, back, announce(0), [buffer])
        through(back, front, encode_u64_reply(FrontendReq.ADD_MEM_REG, 0))
        through(ours, given, encode_u64_reply(BackendReq.SHMEM_MAP, 0))
        violation = tap.events[wait_event(tap, Event.VIOLATION)]["data"]
        assert (violation["by"], violation["rule"], violation["request"]) == (
            "front-end", "reply-before-follow-up", "ADD_MEM_REG")
        assert "owes one to SHMEM_MAP shmid 0 [0x0, 0x1000)" in violation["detail"]
        assert tap.execute("query-status")["violations"] == {"reply-before-follow-up": 1}
        # and anyone judging the recording afterwards finds the same
        assert recorded_verdict(tmp_path) == FAIL
    finally:
        os.close(buffer)


def test_answering_first_and_asking_at_once_is_never_accused(negotiated, tmp_path) -> None:
    """The answer and the question leave back to back on two sockets; the tap's backend
    channel thread may read the answer after its main channel thread read the question.
    Two hundred times, in every interleaving the machine gives (without the tap's guard
    this fails at once)."""
    (front, back, tap, _proc), ours, given = negotiated
    buffer = memfd(PAGE)
    try:
        for n in range(200):
            m = ShmemMap(0, 0, n * PAGE, PAGE, 1)
            request = encode_shmem_request(BackendReq.SHMEM_MAP, m, need_reply=True)
            through(given, ours, request, [buffer])
            answer = encode_u64_reply(BackendReq.SHMEM_MAP, 0)
            ours.sendall(answer)
            question = announce(n * PAGE)
            send_with(front, question, [buffer])
            # the back-end reads both, in whichever order they come
            assert recv_exactly(given, len(answer))[0] == answer
            got, fds = recv_exactly(back, len(question))
            assert got == question
            for fd in fds:
                os.close(fd)
            through(back, front, encode_u64_reply(FrontendReq.ADD_MEM_REG, 0))
        status = tap.execute("query-status")
        assert status["violations"] == {}
        assert status["counters"]["main"]["front-end"]["messages"] == 202
        assert all(e["event"] != Event.VIOLATION for e in tap.events)
        # the recording keeps what the tap knew: judged again, nobody is accused either
        assert recorded_verdict(tmp_path) == PASS
    finally:
        os.close(buffer)


def test_half_a_message_on_one_side_holds_nothing_up_on_the_other(negotiated) -> None:
    """One thread relays both directions of a channel: half an answer from the front-end
    waits for its rest while the back-end's next request still goes through, and the
    answer goes on whole once its rest comes."""
    (_front, _back, tap, _proc), ours, given = negotiated
    buffer = memfd(PAGE)
    try:
        first = encode_shmem_request(BackendReq.SHMEM_MAP, ShmemMap(0, 0, PAGE), need_reply=True)
        through(given, ours, first, [buffer])
        answer = encode_u64_reply(BackendReq.SHMEM_MAP, 0)
        ours.sendall(answer[:5])
        then = encode_shmem_request(BackendReq.SHMEM_UNMAP, ShmemMap(0, 0, PAGE), need_reply=False)
        through(given, ours, then)  # relayed while half the answer waits in the tap
        ours.sendall(answer[5:])
        assert recv_exactly(given, len(answer)) == (answer, [])
        counters = tap.execute("query-status")["counters"]["backend"]
        assert counters["back-end"]["messages"] == 2 and counters["front-end"]["messages"] == 1
    finally:
        os.close(buffer)
