"""`shmemctl tap` between a real front-end and a real device: every topology carries the
pair, every byte and fd crosses once, what passes is judged by the observer, and the
tap keeps no fd and never decides a pair's fate. The kernel's view (/proc/PID/maps,
/proc/PID/fd) is the truth; the framer's decisions are also checked in memory."""

from __future__ import annotations

import array
import contextlib
import dataclasses
import mmap
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shmemctl.channel import close_fds
from shmemctl.events import Event
from shmemctl.session.observer import BACKEND
from shmemctl.shmem.mapping import Mapping
from shmemctl.shmem.procmaps import MapsLine, Segment, read_maps
from shmemctl.tap import Endpoint, Framer
from shmemctl.tap.framer import RAW_CHUNK
from shmemctl.tap.link import Link
from shmemctl.tap.tap import Tap, TapOptions
from shmemctl.tap.truth import AGREE, DISAGREE, UNKNOWN, Peer, Placement, check, compare
from shmemctl.wire import BackendReq, ChannelKind, FrontendReq, ShmemMap, encode
from shmemctl.wire.messages import encode_shmem_request, encode_u64_reply

from .conftest import PAGE, PATIENCE, MiB, Proc, fd_count, memfd, region_bases, segments, wait_until
from .test_events import fits, wait_event
from .test_real_peers import Monitor

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


def test_after_a_sound_header_the_relay_may_read_its_payload_at_once() -> None:
    m = ShmemMap(0, 0, MiB, 0, 1)
    whole = encode_shmem_request(BackendReq.SHMEM_MAP, m, need_reply=True)
    header = whole[:12]
    framer = Framer(ChannelKind.BACKEND, replies=False)
    assert framer.payload_after(header) == len(whole) - 12
    # read in two and fed as one chunk, it is the unit the framer cuts from two
    unit = framer.feed(whole, [101])
    assert unit is not None and (unit.data, unit.fds) == (whole, (101,))
    assert unit.message is not None and unit.message.name == "SHMEM_MAP" and not unit.problem
    assert framer.payload_after(whole) == 0  # not a header alone
    assert framer.feed(header, [102]) is None
    assert framer.payload_after(header) == 0  # the framer holds a message: it says what next
    assert framer.wanted == len(whole) - 12
    # a header the codec refuses is fed as it came, and the framer judges it
    reply_on_request_stream = encode_u64_reply(FrontendReq.GET_FEATURES, 1)[:12]
    lost = Framer(ChannelKind.MAIN, replies=False)
    assert lost.payload_after(b"\xde\xad\xbe\xef" * 3) == 0
    assert lost.payload_after(reply_on_request_stream) == 0
    assert lost.feed(b"\xde\xad\xbe\xef" * 3) is not None and not lost.decoding
    assert lost.payload_after(header) == 0  # raw from now on: no boundary to read up to


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


def test_endpoints_say_what_would_be_right() -> None:
    assert Endpoint.parse("listen:/run/vm.sock") == Endpoint("listen", "/run/vm.sock")
    assert str(Endpoint.parse("connect:a:b")) == "connect:a:b"
    for wrong in ("/run/vm.sock", "bind:/x", "listen:"):
        with pytest.raises(ValueError, match="write listen:PATH or connect:PATH"):
            Endpoint.parse(wrong)


# ------------------------------------------------------------------ real pairs

REGIONS = "0=8M,2=64K"


@dataclass
class Pair:
    tap: Proc
    tap_ctl: str
    fe: Proc | None = None
    fe_ctl: str = ""
    be: Proc | None = None
    be_ctl: str = ""

    def monitor(self, which: str) -> Monitor:
        proc, path = {"tap": (self.tap, self.tap_ctl), "fe": (self.fe, self.fe_ctl),
                      "be": (self.be, self.be_ctl)}[which]  # fmt: skip
        assert proc is not None
        return Monitor.of(proc, path, PATIENCE)


def start_tap(spawn: Callable[..., Proc], tmp_path: Path, front: str, back: str,
              *extra: str) -> tuple[Proc, str]:  # fmt: skip
    if "--reply-deadline" not in extra:
        # a late reply on a busy machine must not be a finding of a test about something
        # else: only the test of the deadline sets one
        extra = (*extra, "--reply-deadline", "0")
    tap = spawn("tap", "--front", front, "--back", back,
                "--name", "t", *extra, name="tap")  # fmt: skip
    # its sockets to listen on are made before it waits for, or connects to, a side
    tap.wait_status(lambda s: s["state"] != "starting", "its sockets made")
    return tap, str(tap.control)


def start_pair(
    spawn: Callable[..., Proc],
    tmp_path: Path,
    front_mode: str,
    back_mode: str,
    *,
    be_args: tuple[str, ...] = (),
    fe_args: tuple[str, ...] = (),
    before_tap: Callable[[Pair], None] | None = None,
) -> Pair:
    """backend_sim and a front-end with the tap between them, in the order each topology
    needs (whoever listens is up before whoever connects)."""
    front_sock, back_sock = str(tmp_path / "front.sock"), str(tmp_path / "back.sock")
    fe_ctl, be_ctl = str(tmp_path / "fe.ctl"), str(tmp_path / "be.ctl")
    fe_all = ["--control", fe_ctl, *fe_args]
    be_all = ["--control", be_ctl, "--regions", REGIONS, "--reply-timeout", str(PATIENCE),
              *be_args]  # fmt: skip
    pair = Pair(tap=None, tap_ctl="")  # type: ignore[arg-type]
    if back_mode == "connect":
        pair.be = spawn("backend_sim", "--listen", back_sock, *be_all)
        pair.be.wait_state("listening")
    if front_mode == "connect":
        pair.fe = spawn("frontend", "--listen", front_sock, *fe_all)
        pair.fe.wait_listening()
    pair.fe_ctl, pair.be_ctl = fe_ctl, be_ctl
    if before_tap is not None:
        before_tap(pair)
    pair.tap, pair.tap_ctl = start_tap(spawn, tmp_path, f"{front_mode}:{front_sock}",
                                       f"{back_mode}:{back_sock}")  # fmt: skip
    if front_mode == "listen":
        pair.fe = spawn("frontend", "--connect", front_sock, *fe_all)
    if back_mode == "listen":
        pair.be = spawn("backend_sim", "--connect", back_sock, *be_all)
    assert pair.fe is not None
    pair.fe.wait_connected()
    return pair


def plain(mapping: dict[str, Any]) -> dict[str, Any]:
    """A mapping's JSON form without what only its holder knows (file, age; the tap's
    dev, ino and size of the file)."""
    return {k: v for k, v in mapping.items() if k not in ("file", "age", "dev", "ino", "size")}


def region_mappings(status: dict[str, Any], shmid: int) -> list[dict[str, Any]]:
    return next(r["mappings"] for r in status["regions"] if r["shmid"] == shmid)


TOPOLOGIES = [("listen", "connect"), ("listen", "listen"), ("connect", "connect"),
              ("connect", "listen")]  # fmt: skip


@pytest.mark.parametrize(("front_mode", "back_mode"), TOPOLOGIES)
def test_each_topology_carries_a_working_pair(spawn, tmp_path, front_mode, back_mode) -> None:
    pair = start_pair(spawn, tmp_path, front_mode, back_mode)
    assert pair.fe is not None
    device, front, tap = pair.monitor("be"), pair.monitor("fe"), pair.monitor("tap")
    assert "QMP" in tap.greeting and tap.execute("query-status")["role"] == "tap"
    offered = {c["name"] for c in tap.execute("query-commands")}
    assert {"query-status", "query-shmem-config"} <= offered
    device.execute("map", shmid=0, shm_offset=MiB, len=MiB)
    device.execute("map", shmid=2, shm_offset=0, len=64 << 10, ro=True)

    base = region_bases(pair.fe)[0]
    assert Segment(MiB, 2 * MiB, "rw") in [
        dataclasses.replace(s, inode=0, file_offset=0, dev=0)
        for s in segments(pair.fe.pid, base, 8 * MiB)
    ]
    seen = tap.execute("query-status")
    own = front.execute("query-status")
    for shmid in (0, 2):
        assert [plain(m) for m in region_mappings(seen, shmid)] == [
            plain(m) for m in region_mappings(own, shmid)
        ]
    assert [plain(m) for m in region_mappings(seen, 0)] == [
        {"shmid": 0, "shm_offset": MiB, "len": MiB, "fd_offset": 0, "writable": True}
    ]
    assert seen["state"] == "relaying" and seen["violations"] == {}
    assert seen["negotiated"]["shmem"] and seen["negotiated"]["backend_channel"]
    assert seen["negotiated"]["device_features"] == "0x140000000"  # VERSION_1, PROTOCOL_FEATURES
    assert {r["shmid"]: r["size"] for r in seen["regions"]} == {0: 8 * MiB, 2: 64 << 10}
    assert tap.execute("query-shmem-config")["sizes"] == {"0": 8 * MiB, "2": 64 << 10}
    assert seen["sides"]["front-end"]["mode"] == front_mode
    assert seen["sides"]["back-end"]["mode"] == back_mode


TRACE_KEYS = ("channel", "request", "id", "flags", "reply", "need_reply", "payload", "fds")


def carried(monitor: Monitor, role: str, *, direction: str | None = None) -> list[tuple]:
    return [
        tuple(e["data"][k] for k in TRACE_KEYS)
        for e in monitor.events
        if e["event"] == Event.MESSAGE and e["data"]["role"] == role
        and (direction is None or e["data"]["direction"] == direction)
    ]  # fmt: skip


def test_every_message_crosses_exactly_once_each_way(spawn, tmp_path) -> None:
    """The three traces, from before the first byte: what one side sent is what the tap
    forwarded and what the other side received, message for message."""
    watching: dict[str, Monitor] = {}

    def subscribe_peers(pair: Pair) -> None:
        for which in ("fe", "be"):
            watching[which] = pair.monitor(which)
            watching[which].execute("subscribe", events=[Event.MESSAGE])

    pair = start_pair(spawn, tmp_path, "connect", "connect", before_tap=subscribe_peers)
    front, device = watching["fe"], watching["be"]
    tap = pair.monitor("tap")  # subscribing now could miss the start: compare counters too
    device.execute("map", shmid=0, shm_offset=0, len=MiB)
    device.execute("unmap", shmid=0, shm_offset=0, len=MiB)
    front.execute("get-shmem-config")
    for monitor in (front, device):
        monitor.execute("query-status")  # a fence: every trace event published so far is in

    sent_by_fe = carried(front, "frontend", direction="out")
    got_by_be = carried(device, "backend", direction="in")
    sent_by_be = carried(device, "backend", direction="out")
    got_by_fe = carried(front, "frontend", direction="in")
    assert sent_by_fe == got_by_be and sent_by_be == got_by_fe
    counters = tap.execute("query-status")["counters"]
    for kind in ("main", "backend"):
        assert counters[kind]["front-end"]["messages"] == sum(1 for m in sent_by_fe if m[0] == kind)
        assert counters[kind]["back-end"]["messages"] == sum(1 for m in sent_by_be if m[0] == kind)
        assert counters[kind]["front-end"]["undecodable"] == 0

    # and the tap's own trace of what it forwards is the same, message for message
    tap.execute("subscribe", events=[Event.MESSAGE])
    before = (len(carried(front, "frontend")), len(carried(device, "backend")))
    device.execute("map", shmid=2, shm_offset=0, len=64 << 10)
    front.execute("get-shmem-config")
    for monitor in (front, device, tap):
        monitor.execute("query-status")
    fe_now = carried(front, "frontend")[before[0] :]
    via_tap = carried(tap, "tap")
    assert via_tap == fe_now  # everything the front-end saw went through the tap once
    directions = [e["data"]["direction"] for e in tap.events if e["event"] == Event.MESSAGE]
    assert directions == ["out"] * len(via_tap)


def test_a_broken_rule_is_an_event_with_its_label_and_passage_and_counted(spawn, tmp_path) -> None:
    pair = start_pair(
        spawn, tmp_path, "listen", "connect", be_args=("--fault", "map-out-of-bounds")
    )
    tap = pair.monitor("tap")
    tap.execute("subscribe", events=[Event.VIOLATION])
    device = pair.monitor("be")
    with pytest.raises(AssertionError, match=r"GenericError.*refused by the front-end: EINVAL"):
        device.execute("map", shmid=0, shm_offset=0, len=MiB)
    violation = tap.events[wait_event(tap, Event.VIOLATION)]["data"]
    assert fits(tap.events[0], "tap") == ""
    assert violation["by"] == "back-end" and violation["rule"] == "map-valid"
    assert violation["passage"] == "§5" and violation["request"] == "SHMEM_MAP"
    assert "shmid 0 [0x800000, 0x900000)" in violation["detail"]
    status = tap.execute("query-status")
    assert status["violations"] == {"map-valid": 1}
    assert region_mappings(status, 0) == []  # refused: nothing mapped


def test_a_front_end_that_leaves_takes_the_device_with_it_and_the_next_one_is_relayed(
    spawn, tmp_path
) -> None:
    pair = start_pair(spawn, tmp_path, "listen", "connect")
    assert pair.fe is not None and pair.be is not None
    tap, device = pair.monitor("tap"), pair.monitor("be")
    tap.execute("subscribe", events=[Event.ATTACHED, Event.DETACHED])
    device.execute("subscribe", events=[Event.DISCONNECTED, Event.CONNECTED])
    device.execute("map", shmid=0, shm_offset=0, len=MiB)
    baseline_mappings = tap.execute("query-status")["regions"][0]["count"]
    assert baseline_mappings == 1

    pair.fe.stop()
    wait_event(device, Event.DISCONNECTED)  # the device saw the VMM leave
    gone = wait_event(tap, Event.DETACHED)
    second = wait_event(tap, Event.DETACHED, gone + 1)
    detached = [tap.events[i]["data"] for i in (gone, second)]
    assert {d["side"] for d in detached} == {"front-end", "back-end"}
    assert all(d["connection"] == 1 for d in detached), detached
    assert detached[0]["reason"] == "front-end closed the main channel"
    status = tap.execute("query-status")
    assert status["regions"] == [] or all(r["count"] == 0 for r in status["regions"])

    fe2 = spawn("frontend", "--connect", str(tmp_path / "front.sock"), "--control",
                str(tmp_path / "fe2.ctl"), name="fe2")  # fmt: skip
    fe2.wait_connected()
    again = wait_event(tap, Event.ATTACHED, gone)
    assert tap.events[again]["data"]["connection"] == 2
    device.execute("map", shmid=0, shm_offset=0, len=MiB)
    base = region_bases(fe2)[0]
    assert segments(fe2.pid, base, 8 * MiB)[0].access == "rw"
    assert tap.execute("query-status")["connection"] == 2
    assert all(fits(e, "tap") == "" for e in tap.events)


def test_the_tap_keeps_no_fd_once_a_connection_is_over(spawn, tmp_path) -> None:
    """Its fds before any front-end came are its fds after each one left: every fd it
    forwarded, every backend channel and both main sockets are closed."""
    dev, front_sock = str(tmp_path / "dev.sock"), str(tmp_path / "front.sock")
    be = spawn("backend_sim", "--listen", dev, "--control", str(tmp_path / "be.ctl"),
               "--regions", REGIONS)  # fmt: skip
    be.wait_state("listening")
    proc, ctl = start_tap(spawn, tmp_path, f"listen:{front_sock}", f"connect:{dev}")
    tap, device = Monitor.of(proc, ctl, PATIENCE), Monitor.of(be, str(tmp_path / "be.ctl"))
    idle = fd_count(proc.pid)  # listener, control socket and this client: nothing relayed yet
    for round_ in (1, 2):
        fe = spawn("frontend", "--connect", front_sock, "--control",
                   str(tmp_path / f"fe{round_}.ctl"), name=f"fe{round_}")  # fmt: skip
        fe.wait_connected()
        for i in range(4):
            device.execute("map", shmid=0, shm_offset=i * MiB, len=MiB)
        device.execute("unmap", shmid=0, shm_offset=0, len=MiB)
        assert fd_count(proc.pid) > idle  # relaying: a socket per side of both channels
        fe.stop()
        wait_until(lambda: fd_count(proc.pid) == idle, what="the tap's fds back to idle")
    assert tap.execute("query-status")["counters"]["backend"]["back-end"]["fds"] == 8  # the maps'


# ------------------------------------------------------------------ the test as both peers


def send_with(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])


def recv_exactly(sock: socket.socket, n: int) -> tuple[bytes, list[int]]:
    data, fds = b"", []
    sock.settimeout(PATIENCE)
    while len(data) < n:
        chunk, ancdata, _, _ = sock.recvmsg(n - len(data), socket.CMSG_SPACE(64 * 4))
        assert chunk, f"EOF after {data!r}"
        data += chunk
        for _level, _kind, payload in ancdata:
            fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
    return data, fds


RawPeers = tuple[socket.socket, socket.socket, Monitor, Proc]


def raw_pair(spawn: Callable[..., Proc], tmp_path: Path, *extra: str) -> RawPeers:
    """The tap between two sockets of this test: (front-end's, back-end's, tap monitor,
    the tap)."""
    front_path, back_path = str(tmp_path / "front.sock"), str(tmp_path / "back.sock")
    proc, ctl = start_tap(spawn, tmp_path, f"listen:{front_path}", f"listen:{back_path}",
                          *extra)  # fmt: skip
    monitor = Monitor.of(proc, ctl, PATIENCE)
    monitor.execute("subscribe", events=[*Event])
    front = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    front.connect(front_path)
    back = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    back.connect(back_path)
    wait_event(monitor, Event.ATTACHED)
    return front, back, monitor, proc


@pytest.fixture
def raw_peers(spawn, tmp_path) -> Iterator[RawPeers]:
    peers = raw_pair(spawn, tmp_path)
    yield peers
    peers[0].close()
    peers[1].close()


def test_a_request_left_unanswered_past_the_deadline_is_the_owers_violation(
    spawn, tmp_path
) -> None:
    front, back, tap, _proc = raw_pair(spawn, tmp_path, "--reply-deadline", "0.2")
    try:
        asked = encode(ChannelKind.MAIN, FrontendReq.GET_FEATURES, None)
        front.sendall(asked)
        assert recv_exactly(back, len(asked))[0] == asked  # the back-end has it, and waits
        violation = tap.events[wait_event(tap, Event.VIOLATION)]["data"]
        assert (violation["by"], violation["rule"], violation["request"]) == (
            "back-end", "answered-in-time", "GET_FEATURES"
        )
        assert violation["detail"] == "GET_FEATURES not answered within 0.2s"
        # late is still an answer: it is the one owed, matched, and flagged no further
        reply = encode_u64_reply(FrontendReq.GET_FEATURES, 1 << 32)
        back.sendall(reply)
        assert recv_exactly(front, len(reply))[0] == reply
        status = tap.execute("query-status")
        assert status["violations"] == {"answered-in-time": 1}
        assert status["pending"]["main"] == []
    finally:
        front.close()
        back.close()


def hand_over_backend_channel(
    front: socket.socket, back: socket.socket
) -> tuple[socket.socket, socket.socket]:
    """As a front-end, send SET_BACKEND_REQ_FD with one end of a new socket pair; as the
    back-end, take what arrives. (the front-end's end, the socket the back-end got)"""
    ours, handed = socket.socketpair()
    try:
        request = encode(ChannelKind.MAIN, FrontendReq.SET_BACKEND_REQ_FD, None)
        send_with(front, request, [handed.fileno()])
        data, fds = recv_exactly(back, len(request))
    except BaseException:
        ours.close()
        raise
    finally:
        handed.close()
    assert data == request and len(fds) == 1
    return ours, socket.socket(fileno=fds[0])


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def test_garbage_is_forwarded_exactly_reported_and_the_pair_decides(raw_peers) -> None:
    front, back, tap, proc = raw_peers
    buffer = memfd(4096)
    try:
        # while the main channel is followed, a reply nobody asked for is the back-end's fault
        stray = encode_u64_reply(FrontendReq.GET_FEATURES, 3)
        back.sendall(stray)
        assert recv_exactly(front, len(stray))[0] == stray
        violation = tap.events[wait_event(tap, Event.VIOLATION)]["data"]
        assert (violation["by"], violation["rule"]) == ("back-end", "reply-owed")

        # a sound header with a payload of the wrong size, then a good message: both exact
        wrong = encode(ChannelKind.MAIN, FrontendReq.SET_FEATURES, None) + b"\x01\x02\x03"
        wrong = wrong[:8] + (3).to_bytes(4, "little") + wrong[12:]
        good = encode(ChannelKind.MAIN, FrontendReq.SET_FEATURES, 1 << 32)
        front.sendall(wrong + good)
        assert recv_exactly(back, len(wrong + good)) == (wrong + good, [])
        first = tap.events[wait_event(tap, Event.UNDECODABLE)]["data"]
        assert (first["side"], first["request"], first["decoding"]) == ("front-end", 2, True)
        assert "wrong payload size" in first["reason"]

        # garbage with an fd on it: the same bytes, the same file, then raw relaying
        garbage = b"\xde\xad\xbe\xef" * 5
        send_with(front, garbage, [buffer])
        data, fds = recv_exactly(back, len(garbage))
        assert data == garbage and len(fds) == 1 and same_file(fds[0], buffer)
        close_fds(fds)
        after = wait_event(tap, Event.UNDECODABLE)
        lost = tap.events[wait_event(tap, Event.UNDECODABLE, after + 1)]["data"]
        assert (
            lost["decoding"] is False and lost["fds"] == 1 and "framing is lost" in lost["reason"]
        )
        more = b"still carried, byte for byte"
        front.sendall(more)
        assert recv_exactly(back, len(more))[0] == more
        status = tap.execute("query-status")
        assert status["raw"] == ["main from front-end"] and status["unjudged"] == ["main"]
        assert status["counters"]["main"]["front-end"]["undecodable"] == 2

        # the other direction still decodes, and the tap hangs up on nobody; but what the
        # front-end asked is unknown now, so this reply is nobody's fault
        reply = encode_u64_reply(FrontendReq.GET_FEATURES, 7)
        back.sendall(reply)
        assert recv_exactly(front, len(reply))[0] == reply
        status = tap.execute("query-status")
        assert status["state"] == "relaying" and status["violations"] == {"reply-owed": 1}

        front.close()  # the front-end leaves: the device sees it leave too
        back.settimeout(PATIENCE)
        assert back.recv(1) == b""
        wait_event(tap, Event.DETACHED)
        assert sum(e["event"] == Event.VIOLATION for e in tap.events) == 1
        # every event the registry says the tap publishes, it published, in its record
        assert all(fits(e, "tap") == "" for e in tap.events)
        # (but reconnecting: both sides listen here; test_tap_lifecycle has a side to wait for)
        registered = {e.value for e in Event if "tap" in e.payloads} - {Event.RECONNECTING}
        assert registered <= {e["event"] for e in tap.events}
    finally:
        os.close(buffer)
    assert proc.alive()


def test_the_backend_channel_is_relayed_through_a_pair_of_the_taps_own(raw_peers) -> None:
    """SET_BACKEND_REQ_FD is the one message the tap changes: the back-end gets its
    socket, and what it sends there reaches the socket the front-end handed over."""
    front, back, _tap, _proc = raw_peers
    ours, given = hand_over_backend_channel(front, back)
    try:
        assert not same_file(given.fileno(), ours.fileno())
        m = ShmemMap(0, 0, MiB, 0, 1)
        unmap = encode_shmem_request(BackendReq.SHMEM_UNMAP, m._replace(flags=0), need_reply=True)
        given.sendall(unmap)
        assert recv_exactly(ours, len(unmap))[0] == unmap
        answer = encode_u64_reply(BackendReq.SHMEM_UNMAP, 0)
        ours.sendall(answer)
        assert recv_exactly(given, len(answer))[0] == answer
        ours.close()  # the front-end closes its end: the back-end's end sees it
        given.settimeout(PATIENCE)
        assert given.recv(1) == b""
        given.close()
    finally:
        ours.close()


def test_a_backend_channel_handed_over_with_an_fd_too_many_is_still_relayed(raw_peers) -> None:
    """The channel is the first fd, the one a back-end takes: the tap relays it, passes
    the fd too many on as it came, and reports the broken rule."""
    front, back, tap, _proc = raw_peers
    ours, handed = socket.socketpair()
    extra = memfd(PAGE)
    given: socket.socket | None = None
    try:
        request = encode(ChannelKind.MAIN, FrontendReq.SET_BACKEND_REQ_FD, None)
        send_with(front, request, [handed.fileno(), extra])
        data, fds = recv_exactly(back, len(request))
        assert data == request and len(fds) == 2
        given = socket.socket(fileno=fds[0])
        assert not same_file(given.fileno(), handed.fileno())  # the tap's own
        assert same_file(fds[1], extra)  # the one too many, untouched
        os.close(fds[1])
        unmap = encode_shmem_request(BackendReq.SHMEM_UNMAP, ShmemMap(0, 0, MiB, 0, 0),
                                     need_reply=False)  # fmt: skip
        given.sendall(unmap)
        assert recv_exactly(ours, len(unmap))[0] == unmap
        # judged as it passed (nothing was negotiated first either: no SET_PROTOCOL_FEATURES
        # before the channel, no SHMEM before the unmap)
        found = tap.execute("query-status")["violations"]
        assert found == {"backend-channel-fd": 1, "protocol-features-first": 1,
                         "shmem-negotiated": 1}  # fmt: skip
    finally:
        for sock in (ours, handed, given):
            if sock is not None:
                sock.close()
        os.close(extra)


def test_more_fds_than_one_sendmsg_passes_are_forwarded_over_as_many_bytes(raw_peers) -> None:
    """A message that came in two reads brings up to twice SCM_MAX_FD fds; the tap sends
    them on as it got them, a sendmsg per 253, instead of failing the connection."""
    front, back, tap, proc = raw_peers
    asked = encode(ChannelKind.MAIN, FrontendReq.GET_FEATURES, None)
    buffer = memfd(PAGE)
    got: list[int] = []
    try:
        send_with(front, asked[:1], [buffer] * 200)
        send_with(front, asked[1:], [buffer] * 200)
        data = b""
        back.settimeout(PATIENCE)
        while len(data) < len(asked):
            chunk, ancdata, _, _ = back.recvmsg(len(asked) - len(data), socket.CMSG_SPACE(253 * 4))
            assert chunk, f"the back-end got EOF after {data!r}"
            data += chunk
            for _level, _kind, payload in ancdata:
                got.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
        assert data == asked
        assert len(got) == 400 and all(same_file(fd, buffer) for fd in got)
        reply = encode_u64_reply(FrontendReq.GET_FEATURES, 1 << 32)
        back.sendall(reply)
        assert recv_exactly(front, len(reply))[0] == reply  # the pair carries on
        assert tap.execute("query-status")["state"] == "relaying"
    finally:
        close_fds(got)
        os.close(buffer)
    assert proc.alive()


def test_a_side_that_stops_reading_holds_up_neither_the_other_channel_nor_the_control_socket(
    raw_peers,
) -> None:
    """The back-end stops reading the main channel while the front-end keeps sending: the
    tap waits to send on, as a direct connection would, but without its lock: status
    still answers and the backend channel is still relayed. Then everything arrives, in
    order."""
    front, back, tap, proc = raw_peers
    ours, given = hand_over_backend_channel(front, back)
    try:
        sent = encode(ChannelKind.MAIN, FrontendReq.SET_FEATURES, 1 << 32)
        count = 4000  # far more 20-byte messages than the kernel queues for one reader
        front.sendall(sent * count)

        def relayed() -> int:
            status = tap.execute("query-status")  # answers, or the test fails on its timeout
            return int(status["counters"]["main"]["front-end"]["messages"])

        # the tap fills the back-end's socket and then waits: its count stops moving
        counts: list[int] = []

        def stopped() -> bool:
            counts.append(relayed())
            return len(counts) > 1 and counts[-1] == counts[-2]

        wait_until(stopped, what="the tap to stop relaying")
        assert counts[-1] < count
        unmap = encode_shmem_request(BackendReq.SHMEM_UNMAP, ShmemMap(0, 0, MiB, 0, 0),
                                     need_reply=False)  # fmt: skip
        given.sendall(unmap)
        assert recv_exactly(ours, len(unmap))[0] == unmap
        assert recv_exactly(back, len(sent) * count) == (sent * count, [])
        assert relayed() == count + 1  # and the SET_BACKEND_REQ_FD
    finally:
        ours.close()
        given.close()
    assert proc.alive()


def test_a_unit_with_no_room_at_the_receiver_is_judged_then_sent_fd_and_all_outside_the_lock(
) -> None:
    """In memory, beside a real socket pair: the front-end's side is full, so not a byte
    of a SHMEM_MAP goes at once. The tap judges it and lets its lock go, then waits for
    room; the map arrives after what was queued, with its fd on its first byte, and the
    tap keeps no copy of the fd."""
    tap = Tap(TapOptions(Endpoint.parse("listen:unused"), Endpoint.parse("connect:unused")))
    before = {int(fd) for fd in os.listdir("/proc/self/fd")}  # the tap's own stop pipe too
    tap_front, fe = socket.socketpair()
    tap_back, device = socket.socketpair()
    link = Link(tap, ChannelKind.BACKEND, tap_front, tap_back, lambda *_: None, tap.events)
    buffer = memfd(PAGE)
    try:
        queued = 0
        with contextlib.suppress(BlockingIOError):
            while True:  # the front-end reads nothing: its side fills up
                queued += tap_front.send(bytes(4096), socket.MSG_DONTWAIT)
        whole = encode_shmem_request(BackendReq.SHMEM_MAP, ShmemMap(0, 0, MiB, 0, 1),
                                     need_reply=True)  # fmt: skip
        unit = Framer(ChannelKind.BACKEND, replies=False).feed(whole, [os.dup(buffer)])
        assert unit is not None
        forwarded: list[bool] = []
        sender = threading.Thread(target=lambda: forwarded.append(tap.forward(link, BACKEND, unit)))
        sender.start()
        wait_until(lambda: tap.counters["backend"][BACKEND]["messages"] == 1, what="the judgement")
        assert tap.lock.acquire(timeout=PATIENCE)  # let go while the send waits
        tap.lock.release()
        assert sender.is_alive() and not forwarded  # still waiting for room
        # judged: nothing was negotiated on this watch, so the map broke that rule
        assert tap.watch.violations == {"shmem-negotiated": 1}
        assert recv_exactly(fe, queued) == (bytes(queued), [])
        data, fds = recv_exactly(fe, len(whole))
        sender.join(PATIENCE)
        assert forwarded == [True]
        assert data == whole and len(fds) == 1 and same_file(fds[0], buffer)
        close_fds(fds)
    finally:
        os.close(buffer)
        for sock in (tap_front, fe, tap_back, device):
            sock.close()
    assert {int(fd) for fd in os.listdir("/proc/self/fd")} == before


def test_raw_bytes_to_a_side_that_stops_reading_arrive_whole_and_in_order(raw_peers) -> None:
    """Past a lost framing the tap relays chunks of up to 64K: to a back-end that is not
    reading, a chunk goes in part while the lock is held and the rest after; status
    answers meanwhile, and every byte arrives once, in order, the fd with the first."""
    front, back, tap, proc = raw_peers
    buffer = memfd(PAGE)
    got: list[int] = []
    try:
        garbage = b"\xde\xad\xbe\xef" * 3  # a header no codec takes: the framing is lost
        stream = garbage + bytes(range(256)) * 4096  # then a megabyte of raw bytes
        send_with(front, stream[:4096], [buffer])
        sender = threading.Thread(target=front.sendall, args=(stream[4096:],), daemon=True)
        sender.start()
        wait_until(lambda: tap.execute("query-status")["raw"] == ["main from front-end"],
                   what="the framing to be lost")  # fmt: skip
        assert tap.execute("query-status")["state"] == "relaying"
        data, got = recv_exactly(back, len(stream))
        assert data == stream
        assert len(got) == 1 and same_file(got[0], buffer)
        sender.join(PATIENCE)
        assert not sender.is_alive()
    finally:
        close_fds(got)
        os.close(buffer)
    assert proc.alive()


# ------------------------------------------------------------------ the truth from /proc, in memory

B0, B2 = 0x7F0000000000, 0x7F1000000000
FILE = "/memfd:buffer (deleted)"
DEV = os.makedev(0, 1)  # where memfds live


def line(start: int, length: int, inode: int = 0, offset: int = 0, perms: str = "rw-s") -> MapsLine:
    return MapsLine(start, start + length, perms, offset, inode, FILE if inode else "",
                    DEV if inode else 0)  # fmt: skip


def reserved(start: int, length: int) -> MapsLine:
    return line(start, length, perms="---p")


def held(shm_offset: int, length: int, ino: int, fd_offset: int = 0, writable: bool = True
         ) -> Mapping:  # fmt: skip
    return Mapping(0, shm_offset, length, fd_offset, writable, FILE, dev=DEV, ino=ino)


#: a front-end's region 0 (16 pages at B0) holding inode 11 at page 2 and inode 12,
#: read-only from its page 2, at page 4; region 2 (4 pages at B2) reserved and empty
REGION0 = [reserved(B0, 2 * PAGE), line(B0 + 2 * PAGE, 2 * PAGE, 11),
           line(B0 + 4 * PAGE, 2 * PAGE, 12, 2 * PAGE, "r--s"),
           reserved(B0 + 6 * PAGE, 10 * PAGE)]  # fmt: skip
SIZES = {0: 16 * PAGE, 2: 4 * PAGE}
PICTURE = [held(2 * PAGE, 2 * PAGE, 11), held(4 * PAGE, 2 * PAGE, 12, 2 * PAGE, False)]


def test_a_regions_base_is_where_its_mappings_files_sit_and_then_they_agree() -> None:
    result = compare([*REGION0, reserved(B2, 4 * PAGE)], SIZES, PICTURE, {(DEV, 11), (DEV, 12)})
    assert result.findings == [] and result.gone == {} and result.unchecked == []
    assert result.placements == [
        Placement(0, B0), Placement(2, None, "no mapping in the picture to infer it")
    ]


def test_a_file_mapped_twice_still_gives_one_base() -> None:
    """Inode 11 at pages 2 and 8: each mapping alone could sit at two bases; together, one."""
    maps = [*REGION0[:3], reserved(B0 + 6 * PAGE, 2 * PAGE), line(B0 + 8 * PAGE, 2 * PAGE, 11),
            reserved(B0 + 10 * PAGE, 6 * PAGE)]  # fmt: skip
    result = compare(maps, SIZES, [*PICTURE, held(8 * PAGE, 2 * PAGE, 11)], {(DEV, 11), (DEV, 12)})
    assert (result.findings, result.placements[0]) == ([], Placement(0, B0))
    # one mapping alone: both bases fit its file, the one that explains the maps is taken
    alone = compare(maps, {0: 16 * PAGE}, [held(8 * PAGE, 2 * PAGE, 11)], set())
    assert alone.placements == [Placement(0, B0)]
    assert any("kernel has 0x2000+0x2000" in f for f in alone.findings)  # page 2: not pictured


def test_mappings_at_no_one_base_are_a_finding() -> None:
    moved = [*REGION0[:2], line(B2, 2 * PAGE, 12, 2 * PAGE, "r--s")]
    result = compare(moved, SIZES, PICTURE, {(DEV, 11), (DEV, 12)})
    assert result.placements[0] == Placement(0, None, "its mappings sit at no one base")
    assert result.findings == [
        f"region 0: its mappings sit at no one base (0x2000+0x2000 at {B0:#x}; "
        f"0x4000+0x2000 at {B2 - 4 * PAGE:#x})"
    ]


def test_a_mapping_the_maps_do_not_show_is_gone_and_a_finding() -> None:
    picture = [*PICTURE, held(8 * PAGE, PAGE, 13)]
    result = compare(REGION0, SIZES, picture, {(DEV, 11), (DEV, 12), (DEV, 13)})
    why = "the front-end's maps show file 00:01 inode 13 nowhere at file offsets 0x0+0x1000"
    assert result.gone == {(0, 8 * PAGE): why}
    has = "the picture has file 00:01 inode 13 mapped"
    assert result.findings == [f"region 0 0x8000+0x1000: {has}; {why}"]
    assert result.placements[0] == Placement(0, B0)  # the others still place the region


def test_a_different_access_or_a_file_outside_the_picture_is_a_finding() -> None:
    writable = [REGION0[0], REGION0[1], line(B0 + 4 * PAGE, 2 * PAGE, 12, 2 * PAGE), REGION0[3]]
    result = compare(writable, SIZES, PICTURE, {(DEV, 11), (DEV, 12)})
    assert result.findings == [
        "region 0: table has 0x4000+0x2000 ro file 00:01 inode 12 at file offset 0x2000, "
        "kernel does not",
        "region 0: kernel has 0x4000+0x2000 rw file 00:01 inode 12 at file offset 0x2000, "
        "table does not",
    ]
    stray = line(B2, PAGE, 14)  # a file that came through the backend channel, unmapped since
    result = compare([*REGION0, stray], SIZES, PICTURE, {(DEV, 11), (DEV, 12), (DEV, 14)})
    assert len(result.findings) == 1
    assert result.findings[0].startswith(
        f"the front-end maps file 00:01 inode 14 ({FILE}) at {B2:#x}+0x1000"
    )
    not_through = {(DEV, 11), (DEV, 12)}  # 14 did not come through the backend channel
    assert compare([*REGION0, stray], SIZES, PICTURE, not_through).findings == []


def test_a_mapping_whose_file_is_unknown_cannot_be_checked() -> None:
    result = compare(REGION0, SIZES, [*PICTURE, held(8 * PAGE, PAGE, 0)], {(DEV, 11), (DEV, 12)})
    assert result.findings == [] and result.unchecked == [
        "region 0 0x8000+0x1000: the tap never learnt its file"
    ]


def test_without_a_process_to_read_the_verdict_is_unknown_never_agree() -> None:
    assert check(None, SIZES, PICTURE, {11}).verdict == UNKNOWN
    with open("/proc/sys/kernel/pid_max") as f:
        never = int(f.read()) + 1  # above pid_max: no process has it
    gone = check(Peer(never, 0, 0, None), SIZES, PICTURE, {11})
    assert (gone.verdict, gone.why) == (UNKNOWN, f"process {never} is gone")
    unsure = check(Peer(os.getpid(), 0, 0, None), {}, [], set(), unsure="in flight")
    assert (unsure.verdict, unsure.why) == (UNKNOWN, "in flight")
    # this process, holding none of the picture: nothing to disagree with
    assert check(Peer(os.getpid(), 0, 0, None), {}, [], set()).verdict == AGREE


# ------------------------------------------------------------------ the truth from /proc, real


def maps_line_at(pid: int, addr: int) -> tuple[str, int, str]:
    """The device (as /proc prints it), inode and path of the line of /proc/PID/maps that
    holds `addr`, read here as /proc prints them, not through procmaps."""
    with open(f"/proc/{pid}/maps") as f:
        for raw in f:
            parts = raw.split(maxsplit=5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if start <= addr < end:
                return parts[3], int(parts[4]), parts[5].strip() if len(parts) > 5 else ""
    raise AssertionError(f"nothing at {addr:#x} in /proc/{pid}/maps")


@pytest.mark.parametrize(("front_mode", "back_mode"), [("listen", "connect"),
                                                    ("connect", "listen")])  # fmt: skip
def test_status_names_both_peers_and_holds_the_front_ends_maps_to_the_picture(
    spawn, tmp_path, front_mode, back_mode
) -> None:
    pair = start_pair(spawn, tmp_path, front_mode, back_mode)
    assert pair.fe is not None and pair.be is not None
    device, tap = pair.monitor("be"), pair.monitor("tap")
    device.execute("map", shmid=0, shm_offset=MiB, len=MiB)
    device.execute("map", shmid=0, shm_offset=3 * MiB, len=2 * MiB, fd_offset=0)
    device.execute("map", shmid=2, shm_offset=0, len=64 << 10, ro=True)
    status = tap.execute("query-status")

    fe_side = status["sides"]["front-end"]["process"]
    be_side = status["sides"]["back-end"]["process"]
    assert (fe_side["pid"], be_side["pid"]) == (pair.fe.pid, pair.be.pid)
    assert fe_side["uid"] == be_side["uid"] == os.getuid()
    assert "frontend" in fe_side["cmdline"] and "backend_sim" in be_side["cmdline"]
    assert fe_side["rss"] > 0 and be_side["fds"] > 0 and "error" not in fe_side

    truth = status["truth"]
    assert (truth["verdict"], truth["pid"], truth["findings"]) == (AGREE, pair.fe.pid, []), truth
    bases = region_bases(pair.fe)
    assert {r["shmid"]: r["base"] for r in truth["regions"]} == {0: bases[0], 2: bases[2]}
    kernel = {line.start: line.inode for line in read_maps(pair.fe.pid)}
    for shmid in (0, 2):
        for m in region_mappings(status, shmid):
            addr = bases[shmid] + m["shm_offset"]
            assert (m["dev"], m["ino"], m["file"]) == maps_line_at(pair.fe.pid, addr)
            assert kernel[addr] == m["ino"]  # procmaps reads the same
            assert m["size"] == m["fd_offset"] + m["len"] and "gone" not in m


def test_a_front_end_that_maps_over_a_mapping_disagrees_with_the_picture(spawn, tmp_path) -> None:
    """skip-overlap-check: the front-end answers ok to a map over a mapping and maps it,
    behind its own table's back. The picture keeps the first mapping whole (the second
    should have been refused); the front-end's maps show the second over half of it."""
    pair = start_pair(spawn, tmp_path, "listen", "connect",
                      fe_args=("--fault", "skip-overlap-check"))  # fmt: skip
    assert pair.fe is not None
    device, tap = pair.monitor("be"), pair.monitor("tap")
    device.execute("map", shmid=0, shm_offset=0, len=2 * MiB)
    assert tap.execute("query-status")["truth"]["verdict"] == AGREE
    device.execute("map", shmid=0, shm_offset=MiB, len=MiB)
    status = tap.execute("query-status")
    # the back-end asked for it, the front-end did not refuse it
    assert status["violations"] == {"map-valid": 1, "refuses-invalid": 1}
    base = region_bases(pair.fe)[0]
    (first,) = region_mappings(status, 0)
    dev, over, _ = maps_line_at(pair.fe.pid, base + MiB)
    assert first["dev"] == dev  # both memfds: the same device
    truth = status["truth"]
    assert truth["verdict"] == DISAGREE and truth["regions"][0]["base"] == base
    assert truth["findings"] == [
        f"region 0: table has 0x0+0x200000 rw file {dev} inode {first['ino']} at file offset "
        "0x0, kernel does not",
        f"region 0: kernel has 0x0+0x100000 rw file {dev} inode {first['ino']} at file offset "
        "0x0, table does not",
        f"region 0: kernel has 0x100000+0x100000 rw file {dev} inode {over} at file offset "
        "0x0, table does not",
    ]


def test_the_picture_against_a_front_end_that_is_this_test(raw_peers) -> None:
    """This process is the front-end: what it maps with its own mmap is what the tap
    must find in /proc/PID/maps, whatever the picture says."""
    front, back, tap, _proc = raw_peers
    ours, given = hand_over_backend_channel(front, back)
    buffer = memfd(2 * PAGE)
    view: mmap.mmap | None = None
    try:
        m = ShmemMap(0, 0, 2 * PAGE, 0, 1)

        def backend_says(req: BackendReq, fds: list[int]) -> None:
            """A request that asks no answer: the picture takes it as it passes the tap,
            so once it arrives here the status shows it."""
            data = encode_shmem_request(req, m if fds else m._replace(flags=0), need_reply=False)
            send_with(given, data, fds) if fds else given.sendall(data)
            close_fds(recv_exactly(ours, len(data))[1])

        backend_says(BackendReq.SHMEM_MAP, [buffer])
        status = tap.execute("query-status")
        assert status["sides"]["front-end"]["process"]["pid"] == os.getpid()
        (mapping,) = region_mappings(status, 0)
        st = os.fstat(buffer)
        assert (mapping["dev"], mapping["ino"], mapping["size"]) == (
            f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}", st.st_ino, 2 * PAGE
        )
        assert mapping["file"] == os.readlink(f"/proc/self/fd/{buffer}")
        # acknowledged (no answer was asked), but nothing here maps it: gone, and said
        truth = status["truth"]
        assert (truth["verdict"], truth["pid"]) == (DISAGREE, os.getpid())
        assert f"file {mapping['dev']} inode {st.st_ino} nowhere" in mapping["gone"]

        view = mmap.mmap(buffer, 2 * PAGE)
        (at,) = [ln.start for ln in read_maps() if ln.inode == st.st_ino]
        truth = tap.execute("query-status")["truth"]
        assert (truth["verdict"], truth["regions"]) == (AGREE, [{"shmid": 0, "base": at}])

        backend_says(BackendReq.SHMEM_UNMAP, [])  # out of the picture; still mapped here
        truth = tap.execute("query-status")["truth"]
        assert truth["verdict"] == DISAGREE
        assert truth["findings"] == [
            f"the front-end maps file {mapping['dev']} inode {st.st_ino} ({mapping['file']}) at "
            f"{at:#x}+0x2000, file offset 0x0, outside every region the picture places: a file "
            "that came through the backend channel and is not in the picture there"
        ]
        view.close()
        assert tap.execute("query-status")["truth"]["verdict"] == AGREE
        given.close()
    finally:
        if view is not None:
            view.close()
        os.close(buffer)
        ours.close()


def test_a_map_the_codec_cannot_read_is_relayed_and_makes_no_mapping(raw_peers) -> None:
    front, back, tap, proc = raw_peers
    ours, given = hand_over_backend_channel(front, back)
    buffer, other_buffer = memfd(PAGE), memfd(PAGE)
    try:
        m = ShmemMap(0, 0, PAGE, 0, 1)
        whole = encode_shmem_request(BackendReq.SHMEM_MAP, m, need_reply=False)
        short = whole[:8] + (len(whole) - 20).to_bytes(4, "little") + whole[12:-8]
        for data, fd in ((short, buffer), (whole, other_buffer)):
            send_with(given, data, [fd])
            got, fds = recv_exactly(ours, len(data))
            assert got == data and len(fds) == 1 and same_file(fds[0], fd)
            close_fds(fds)
        status = tap.execute("query-status")
        assert status["state"] == "relaying"
        (mapping,) = region_mappings(status, 0)  # the second map's file, not the first's
        assert mapping["ino"] == os.fstat(other_buffer).st_ino
        given.close()
    finally:
        close_fds([buffer, other_buffer])
        ours.close()
    assert proc.alive() and "internal error" not in proc.log()
