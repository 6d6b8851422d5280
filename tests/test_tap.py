"""`shmemctl tap` between a real front-end and a real device: every topology carries the
pair, every byte and fd crosses once, what passes is judged by the observer, and the
tap keeps no fd and never decides a pair's fate. The kernel's view (/proc/PID/maps,
/proc/PID/fd) is the truth; the framer's decisions are also checked in memory."""

from __future__ import annotations

import array
import dataclasses
import os
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shmemctl.channel import close_fds
from shmemctl.events import Event
from shmemctl.shmem.procmaps import Segment
from shmemctl.tap import Endpoint, Framer
from shmemctl.tap.framer import RAW_CHUNK
from shmemctl.wire import BackendReq, ChannelKind, FrontendReq, ShmemMap, encode
from shmemctl.wire.messages import encode_shmem_request, encode_u64_reply

from .conftest import PATIENCE, MiB, Proc, fd_count, memfd, region_bases, segments, wait_until
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
    tap = spawn(sys.executable, "-m", "shmemctl", "tap", "--front", front, "--back", back,
                "--name", "t", *extra, name="tap")  # fmt: skip
    tap.wait_log("control socket")
    for mode_path in (front, back):
        if mode_path.startswith("listen:"):
            tap.wait_log(f"listening on {mode_path[7:]}")
    return tap, str(tmp_path / "run" / "t" / "tap.ctl")


def start_pair(
    spawn: Callable[..., Proc],
    tmp_path: Path,
    front_mode: str,
    back_mode: str,
    *,
    be_args: tuple[str, ...] = (),
    before_tap: Callable[[Pair], None] | None = None,
) -> Pair:
    """backend_sim and a front-end with the tap between them, in the order each topology
    needs (whoever listens is up before whoever connects)."""
    front_sock, back_sock = str(tmp_path / "front.sock"), str(tmp_path / "back.sock")
    fe_ctl, be_ctl = str(tmp_path / "fe.ctl"), str(tmp_path / "be.ctl")
    fe_args = ["--control", fe_ctl]
    be_all = ["--control", be_ctl, "--regions", REGIONS, "--reply-timeout", str(PATIENCE),
              *be_args]  # fmt: skip
    pair = Pair(tap=None, tap_ctl="")  # type: ignore[arg-type]
    if back_mode == "connect":
        pair.be = spawn("backend_sim", "--listen", back_sock, *be_all)
        pair.be.wait_log("listening on")
    if front_mode == "connect":
        pair.fe = spawn("frontend", "--listen", front_sock, *fe_args)
        pair.fe.wait_log("listening on")
    pair.fe_ctl, pair.be_ctl = fe_ctl, be_ctl
    if before_tap is not None:
        before_tap(pair)
    pair.tap, pair.tap_ctl = start_tap(spawn, tmp_path, f"{front_mode}:{front_sock}",
                                       f"{back_mode}:{back_sock}")  # fmt: skip
    if front_mode == "listen":
        pair.fe = spawn("frontend", "--connect", front_sock, *fe_args)
    if back_mode == "listen":
        pair.be = spawn("backend_sim", "--connect", back_sock, *be_all)
    assert pair.fe is not None
    pair.fe.wait_log("connected: SHMEM on")
    return pair


def plain(mapping: dict[str, Any]) -> dict[str, Any]:
    """A mapping's JSON form without what only its holder knows (file, age)."""
    return {k: v for k, v in mapping.items() if k not in ("file", "age")}


def region_mappings(status: dict[str, Any], shmid: int) -> list[dict[str, Any]]:
    return next(r["mappings"] for r in status["regions"] if r["shmid"] == shmid)


TOPOLOGIES = [("listen", "connect"), ("listen", "listen"), ("connect", "connect"),
              ("connect", "listen")]  # fmt: skip


@pytest.mark.parametrize(("front_mode", "back_mode"), TOPOLOGIES)
def test_each_topology_carries_a_working_pair(spawn, tmp_path, front_mode, back_mode) -> None:
    pair = start_pair(spawn, tmp_path, front_mode, back_mode)
    assert pair.fe is not None
    device, front, tap = pair.monitor("be"), pair.monitor("fe"), pair.monitor("tap")
    assert tap.greeting["greeting"]["role"] == "tap"
    device.execute("map", shmid=0, shm_offset=MiB, len=MiB)
    device.execute("map", shmid=2, shm_offset=0, len=64 << 10, ro=True)

    base = region_bases(pair.fe)[0]
    assert Segment(MiB, 2 * MiB, "rw") in [
        dataclasses.replace(s, inode=0, file_offset=0) for s in segments(pair.fe.pid, base, 8 * MiB)
    ]
    seen = tap.execute("status")
    own = front.execute("status")
    for shmid in (0, 2):
        assert region_mappings(seen, shmid) == [plain(m) for m in region_mappings(own, shmid)]
    assert region_mappings(seen, 0) == [
        {"shmid": 0, "shm_offset": MiB, "len": MiB, "fd_offset": 0, "writable": True}
    ]
    assert seen["state"] == "relaying" and seen["violations"] == {}
    assert seen["negotiated"]["shmem"] and seen["negotiated"]["backend_channel"]
    assert seen["negotiated"]["device_features"] == "0x140000000"  # VERSION_1, PROTOCOL_FEATURES
    assert {r["shmid"]: r["size"] for r in seen["regions"]} == {0: 8 * MiB, 2: 64 << 10}
    assert tap.execute("shmem-config")["sizes"] == {"0": 8 * MiB, "2": 64 << 10}
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
        monitor.execute("status")  # a fence: every trace event published so far is in

    sent_by_fe = carried(front, "frontend", direction="out")
    got_by_be = carried(device, "backend", direction="in")
    sent_by_be = carried(device, "backend", direction="out")
    got_by_fe = carried(front, "frontend", direction="in")
    assert sent_by_fe == got_by_be and sent_by_be == got_by_fe
    counters = tap.execute("status")["counters"]
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
        monitor.execute("status")
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
    with pytest.raises(AssertionError, match="Refused"):
        device.execute("map", shmid=0, shm_offset=0, len=MiB)
    violation = tap.events[wait_event(tap, Event.VIOLATION)]["data"]
    assert fits(tap.events[0], "tap") == ""
    assert violation["by"] == "back-end" and violation["rule"] == "map-valid"
    assert violation["passage"] == "§5" and violation["request"] == "SHMEM_MAP"
    assert "shmid 0 [0x800000, 0x900000)" in violation["detail"]
    status = tap.execute("status")
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
    baseline_mappings = tap.execute("status")["regions"][0]["count"]
    assert baseline_mappings == 1

    pair.fe.stop()
    wait_event(device, Event.DISCONNECTED)  # the device saw the VMM leave
    gone = wait_event(tap, Event.DETACHED)
    second = wait_event(tap, Event.DETACHED, gone + 1)
    detached = [tap.events[i]["data"] for i in (gone, second)]
    assert {d["side"] for d in detached} == {"front-end", "back-end"}
    assert all(d["connection"] == 1 for d in detached), detached
    assert detached[0]["reason"] == "front-end closed the main channel"
    status = tap.execute("status")
    assert status["regions"] == [] or all(r["count"] == 0 for r in status["regions"])

    fe2 = spawn("frontend", "--connect", str(tmp_path / "front.sock"), "--control",
                str(tmp_path / "fe2.ctl"), name="fe2")  # fmt: skip
    fe2.wait_log("connected: SHMEM on")
    again = wait_event(tap, Event.ATTACHED, gone)
    assert tap.events[again]["data"]["connection"] == 2
    device.execute("map", shmid=0, shm_offset=0, len=MiB)
    base = region_bases(fe2)[0]
    assert segments(fe2.pid, base, 8 * MiB)[0].access == "rw"
    assert tap.execute("status")["connection"] == 2
    assert all(fits(e, "tap") == "" for e in tap.events)


def test_the_tap_keeps_no_fd_once_a_connection_is_over(spawn, tmp_path) -> None:
    """Its fds before any front-end came are its fds after each one left: every fd it
    forwarded, every backend channel and both main sockets are closed."""
    dev, front_sock = str(tmp_path / "dev.sock"), str(tmp_path / "front.sock")
    be = spawn("backend_sim", "--listen", dev, "--control", str(tmp_path / "be.ctl"),
               "--regions", REGIONS)  # fmt: skip
    be.wait_log("listening on")
    proc, ctl = start_tap(spawn, tmp_path, f"listen:{front_sock}", f"connect:{dev}")
    tap, device = Monitor.of(proc, ctl, PATIENCE), Monitor.of(be, str(tmp_path / "be.ctl"))
    idle = fd_count(proc.pid)  # listener, control socket and this client: nothing relayed yet
    for round_ in (1, 2):
        fe = spawn("frontend", "--connect", front_sock, "--control",
                   str(tmp_path / f"fe{round_}.ctl"), name=f"fe{round_}")  # fmt: skip
        fe.wait_log("connected: SHMEM on")
        for i in range(4):
            device.execute("map", shmid=0, shm_offset=i * MiB, len=MiB)
        device.execute("unmap", shmid=0, shm_offset=0, len=MiB)
        assert fd_count(proc.pid) > idle  # relaying: a socket per side of both channels
        fe.stop()
        wait_until(lambda: fd_count(proc.pid) == idle, what="the tap's fds back to idle")
    assert tap.execute("status")["counters"]["backend"]["back-end"]["fds"] == 8  # the maps'


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


@pytest.fixture
def raw_peers(spawn, tmp_path) -> Iterator[tuple[socket.socket, socket.socket, Monitor, Proc]]:
    """The tap between two sockets of this test: (front-end's, back-end's, tap monitor)."""
    front_path, back_path = str(tmp_path / "front.sock"), str(tmp_path / "back.sock")
    proc, ctl = start_tap(spawn, tmp_path, f"listen:{front_path}", f"listen:{back_path}")
    monitor = Monitor.of(proc, ctl, PATIENCE)
    monitor.execute("subscribe", events=[*Event])
    front = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    front.connect(front_path)
    back = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    back.connect(back_path)
    wait_event(monitor, Event.ATTACHED)
    yield front, back, monitor, proc
    front.close()
    back.close()


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
        status = tap.execute("status")
        assert status["raw"] == ["main from front-end"] and status["unjudged"] == ["main"]
        assert status["counters"]["main"]["front-end"]["undecodable"] == 2

        # the other direction still decodes, and the tap hangs up on nobody; but what the
        # front-end asked is unknown now, so this reply is nobody's fault
        reply = encode_u64_reply(FrontendReq.GET_FEATURES, 7)
        back.sendall(reply)
        assert recv_exactly(front, len(reply))[0] == reply
        status = tap.execute("status")
        assert status["state"] == "relaying" and status["violations"] == {"reply-owed": 1}

        front.close()  # the front-end leaves: the device sees it leave too
        back.settimeout(PATIENCE)
        assert back.recv(1) == b""
        wait_event(tap, Event.DETACHED)
        assert sum(e["event"] == Event.VIOLATION for e in tap.events) == 1
        # every event the registry says the tap publishes, it published, in its record
        assert all(fits(e, "tap") == "" for e in tap.events)
        registered = {e.value for e in Event if "tap" in e.payloads}
        assert registered <= {e["event"] for e in tap.events}
    finally:
        os.close(buffer)
    assert proc.alive()


def test_the_backend_channel_is_relayed_through_a_pair_of_the_taps_own(raw_peers) -> None:
    """SET_BACKEND_REQ_FD is the one message the tap changes: the back-end gets its
    socket, and what it sends there reaches the socket the front-end handed over."""
    front, back, _tap, _proc = raw_peers
    ours, handed = socket.socketpair()
    try:
        request = encode(ChannelKind.MAIN, FrontendReq.SET_BACKEND_REQ_FD, None)
        send_with(front, request, [handed.fileno()])
        handed.close()
        data, fds = recv_exactly(back, len(request))
        assert data == request and len(fds) == 1
        given = socket.socket(fileno=fds[0])
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
