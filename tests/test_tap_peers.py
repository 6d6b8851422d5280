"""`shmemctl tap` between real peers: QEMU 7.2 and Debian's virtiofsd (neither of them
ours), QEMU and backend_sim, our front-end and qemu-storage-daemon, our front-end and
backend_sim's scenarios; and every fault of our daemons that an observer can see, as
the tap reports it.

What each peer did is taken from the peer: QEMU's own trace of the vhost-user messages
it wrote and read (`-trace vhost_user_write -trace vhost_user_read`), virtiofsd's debug
log (one "Got VU event" per message it dispatched; it names none), and the trace and
status our daemons give on their control sockets.

Topologies: QEMU connects to the tap, the tap to virtiofsd (listen, connect); the tap
connects to QEMU's server socket and backend_sim to the tap (connect, listen); the tap
connects to both our front-end and qemu-storage-daemon, or both daemons of a scenario
(connect, connect); the pairs with faults connect to the tap on both sides
(listen, listen).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shmemctl.events import OUTCOMES, Event
from shmemctl.tap.truth import AGREE, DISAGREE
from shmemctl.wire import ChannelKind, FrontendReq, ShmemMap, encode

from .conftest import PAGE, PATIENCE, DrivenBackend, MiB, Proc, memfd, need, wait_until
from .test_events import fits, wait_event
from .test_real_peers import Monitor, MonitorClosed
from .test_tap import (
    REGIONS,
    TRACE_KEYS,
    Pair,
    carried,
    plain,
    recv_exactly,
    region_mappings,
    start_pair,
    start_tap,
)

FRONT_END, BACK_END = "front-end", "back-end"

# ------------------------------------------------------------------ helpers


def watch(proc: Proc, control: str, *events: Event) -> Monitor:
    """A monitor of `proc`'s control socket that gets `events` from now on."""
    monitor = Monitor.of(proc, control, PATIENCE)
    monitor.execute("subscribe", events=list(events))
    return monitor


def records(monitor: Monitor, keep: Callable[[dict[str, Any]], bool], n: int) -> list[dict]:
    """The trace records a monitor got that `keep` keeps, once there are `n` of them:
    a peer that sends without waiting for an answer is ahead of whoever relays or reads
    its last messages."""

    def kept() -> list[dict[str, Any]]:
        return [
            e["data"] for e in monitor.events if e["event"] == Event.MESSAGE and keep(e["data"])
        ]

    while len(kept()) < n:
        wait_event(monitor, Event.MESSAGE, len(monitor.events))
    return kept()


def on_main(record: dict[str, Any]) -> bool:
    return record["channel"] == ChannelKind.MAIN.value


def attempt(monitor: Monitor, name: str, /, **arguments: Any) -> Any:
    """A command whose failure belongs to the fault being shown (the front-end refuses,
    answers nonsense or never answers): its answer, or the error as text."""
    try:
        return monitor.execute(name, **arguments)
    except MonitorClosed:
        raise
    except AssertionError as exc:
        return str(exc)


def violations(tap: Monitor) -> list[tuple[str, str]]:
    """(who, rule) of every violation the tap reported to this monitor so far."""
    return [
        (e["data"]["by"], e["data"]["rule"]) for e in tap.events if e["event"] == Event.VIOLATION
    ]


def no_findings(tap: Monitor) -> None:
    """A clean run: the tap reported nothing (events read up to a fence) and counts
    nothing."""
    status = tap.execute("query-status")  # a fence: every event published so far is in
    reported = [e for e in tap.events if e["event"] in (Event.VIOLATION, Event.UNDECODABLE)]
    assert reported == [], reported
    assert status["violations"] == {}
    for kind in ChannelKind:
        assert all(side["undecodable"] == 0 for side in status["counters"][kind.value].values())


# ------------------------------------------------------------------ QEMU and its peers

#: Debian ships virtiofsd with qemu-system-common, in QEMU's library directory (not on PATH)
VIRTIOFSD = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd", "virtiofsd")
#: QEMU's trace of each vhost-user message it wrote or read on the main channel
QEMU_WIRE = re.compile(r"vhost_user_(write|read) req:(\d+) flags:(0x[0-9a-f]+)")

Wire = list[tuple[str, int, int]]


def start_virtiofsd(spawn: Callable[..., Proc], tmp_path: Path, sock: str, name: str) -> Proc:
    binary = need(next((path for path in VIRTIOFSD if shutil.which(path)), VIRTIOFSD[0]))
    share = tmp_path / "share"
    share.mkdir(exist_ok=True)
    # chroot: a container has no namespaces to give; -d logs a line for each message it dispatches
    daemon = spawn(binary, f"--socket-path={sock}", "-o", f"source={share}", "-o",
                   "sandbox=chroot", "-d", name=name)  # fmt: skip

    def listening() -> bool:
        assert daemon.alive(), f"{name} exited {daemon.returncode}:\n{daemon.log()}"
        return os.path.exists(sock)

    wait_until(listening, what=f"{name}'s socket")
    return daemon


def start_qemu(
    spawn: Callable[..., Proc], tmp_path: Path, name: str, device: str, chardev: str
) -> tuple[Proc, Monitor]:
    """QEMU paused before the guest runs (-S), with one vhost-user device on `chardev`;
    returns once the device is realized: QMP answers only after every -device is, and
    realize is where a vhost-user device has its handshake."""
    qmp = str(tmp_path / f"{name}.qmp")
    vm = spawn(
        need("qemu-system-x86_64"),
        "-S", "-display", "none", "-nodefaults", "-machine", "q35,accel=tcg", "-m", "128",
        "-object", "memory-backend-memfd,id=mem,size=128M,share=on", "-numa", "node,memdev=mem",
        "-chardev", f"socket,id=vu,{chardev}", "-device", f"{device},chardev=vu,id=vu-dev",
        "-qmp", f"unix:{qmp},server=on,wait=off", "-monitor", "none", "-serial", "none",
        "-trace", "vhost_user_write", "-trace", "vhost_user_read",
        name=name,
    )  # fmt: skip
    monitor = Monitor.of(vm, qmp, PATIENCE)
    realized = monitor.execute("qom-get", path="/machine/peripheral/vu-dev", property="realized")
    assert realized is True
    assert monitor.execute("query-status")["status"] == "prelaunch"
    return vm, monitor


def qemu_wire(vm: Proc) -> Wire:
    """What QEMU wrote and read on the main channel, in order, as it traced it. Complete
    once QMP answered: realize is over, and a paused guest sends nothing more."""
    return [(way, int(req), int(flags, 16)) for way, req, flags in QEMU_WIRE.findall(vm.log())]


def tap_wire(tap: Monitor, n: int) -> Wire:
    """The same, as the tap forwarded it, once it has forwarded `n` main-channel messages."""
    main = records(tap, on_main, n)
    return [("read" if r["reply"] else "write", r["id"], r["flags"]) for r in main]


def names(wire: Wire) -> list[str]:
    return [FrontendReq(req).name for way, req, _ in wire if way == "write"]


def assert_peers(status: dict[str, Any], front: Proc, back: Proc) -> None:
    """The tap's status names each side's process (SO_PEERCRED, /proc): the ones started."""
    for side, proc in ((FRONT_END, front), (BACK_END, back)):
        process = status["sides"][side]["process"]
        assert (process["pid"], process["cmdline"]) == (proc.pid, proc.argv), side
        assert status["sides"][side]["attached"]


def check_relayed_realize(tap: Monitor, vm: Proc, back: Proc) -> dict[str, Any]:
    """The tap's account of QEMU's realize: the same messages as QEMU's own trace, in
    order, none judged broken; both peers by pid; what they negotiated. Its status."""
    wire = qemu_wire(vm)
    assert wire and wire[0] == ("write", FrontendReq.GET_FEATURES, 0x1), wire
    assert tap_wire(tap, len(wire)) == wire, names(wire)
    status = tap.execute("query-status")  # a fence for the events, after the last forwarded message
    assert [e for e in tap.events if e["event"] == Event.MESSAGE and not on_main(e["data"])] == []
    assert all(fits(e, "tap") == "" for e in tap.events)
    no_findings(tap)

    assert_peers(status, vm, back)
    assert status["state"] == "relaying" and status["connection"] == 1
    counters = status["counters"]["main"]
    assert counters[FRONT_END]["messages"] == sum(way == "write" for way, _, _ in wire)
    assert counters[BACK_END]["messages"] == sum(way == "read" for way, _, _ in wire)
    assert status["pending"] == {"main": [], "backend": []}

    negotiated = status["negotiated"]
    assert set(negotiated["acked"]) <= set(negotiated["offered"])
    # QEMU 7.2 knows no SHMEM (docs/protocol.md §8) and sets no features before the guest
    # driver does (§4 step 7): -S keeps it from ever running
    assert "SHMEM" not in negotiated["acked"] and not negotiated["shmem"]
    assert negotiated["reply_ack"] and negotiated["backend_channel"]
    assert negotiated["device_features"] is not None and negotiated["features"] is None
    assert status["truth"]["verdict"] == AGREE  # QEMU maps nothing a SHMEM_MAP carried
    return status


def quit_qemu(vm: Proc, monitor: Monitor) -> None:
    attempt(monitor, "quit")
    assert vm.wait_exit(PATIENCE) == 0, vm.log()


def dispatched(virtiofsd: Proc) -> int:
    """How many messages virtiofsd dispatched, from its debug log once it has exited (it
    exits when its front-end goes): each is a "Got VU event" after which it came back to
    wait for the next. The end of the stream can be one more event, never dispatched."""
    assert virtiofsd.wait_exit(PATIENCE) == 0, virtiofsd.log()
    log = virtiofsd.log()
    return log[: log.rfind("virtio_loop: Waiting for VU event")].count("virtio_loop: Got VU event")


def realize_fs(
    spawn: Callable[..., Proc], tmp_path: Path, name: str, *, through_tap: bool
) -> tuple[Wire, int]:
    """QEMU's vhost-user-fs-pci against its own virtiofsd, directly or through the tap:
    what QEMU's trace says it wrote and read, and how many messages virtiofsd
    dispatched."""
    fsd_sock = str(tmp_path / f"{name}-virtiofsd.sock")
    fsd = start_virtiofsd(spawn, tmp_path, fsd_sock, f"{name}-virtiofsd")
    sock, tap = fsd_sock, None
    if through_tap:
        sock = str(tmp_path / "front.sock")
        proc, ctl = start_tap(spawn, tmp_path, f"listen:{sock}", f"connect:{fsd_sock}")
        # from before QEMU connects: the whole handshake is seen
        tap = watch(proc, ctl, Event.MESSAGE, Event.VIOLATION, Event.UNDECODABLE)
    vm, qmp = start_qemu(spawn, tmp_path, name, "vhost-user-fs-pci,tag=shared", f"path={sock}")
    wire = qemu_wire(vm)
    if tap is not None:
        check_relayed_realize(tap, vm, fsd)
    quit_qemu(vm, qmp)
    return wire, dispatched(fsd)


@pytest.mark.qemu
def test_qemu_and_virtiofsd_through_the_tap_do_what_they_do_without_it(spawn, tmp_path) -> None:
    """Neither peer is ours. QEMU realizes vhost-user-fs-pci as it does straight against
    virtiofsd (its own trace of the wire is the same message for message), the tap
    forwards exactly what QEMU traced, and virtiofsd dispatched as many messages as the
    tap forwarded to it."""
    direct, direct_count = realize_fs(spawn, tmp_path, "direct", through_tap=False)
    relayed, relayed_count = realize_fs(spawn, tmp_path, "relayed", through_tap=True)
    assert relayed == direct, (names(direct), names(relayed))
    requests = sum(way == "write" for way, _, _ in relayed)
    assert relayed_count == direct_count == requests
    # realize as docs/protocol.md §4 tells it, the backend channel acked before SET_OWNER
    assert names(relayed)[:3] == ["GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES"]
    assert ("write", FrontendReq.SET_BACKEND_REQ_FD, 0x9) in relayed


@pytest.mark.qemu
def test_qemu_and_backend_sim_through_the_tap_see_the_same_messages(spawn, tmp_path) -> None:
    """QEMU listens (server=on), the tap connects to it; backend_sim connects to the tap.
    QEMU's trace, the tap's and backend_sim's are the same messages, in order."""
    qemu_sock, back_sock = str(tmp_path / "qemu.sock"), str(tmp_path / "back.sock")
    proc, ctl = start_tap(spawn, tmp_path, f"connect:{qemu_sock}", f"listen:{back_sock}",
                          "--retry", "0.05")  # fmt: skip
    tap = watch(proc, ctl, Event.MESSAGE, Event.VIOLATION, Event.UNDECODABLE)
    be_ctl = str(tmp_path / "be.ctl")
    be = spawn("backend_sim", "--connect", back_sock, "--control", be_ctl, "--regions", "0=8M")
    # the tap takes a back-end only once it has a front-end: nothing passes before QEMU
    device = watch(be, be_ctl, Event.MESSAGE)
    # server=on waits for the tap to connect before realizing anything
    vm, qmp = start_qemu(spawn, tmp_path, "qemu", "vhost-user-gpio-pci",
                         f"path={qemu_sock},server=on")  # fmt: skip
    status = check_relayed_realize(tap, vm, be)

    forwarded = [tuple(r[k] for k in TRACE_KEYS) for r in records(tap, on_main, 0)]
    requests = [r for r in forwarded if not r[4]]
    received = records(device, lambda r: r["direction"] == "in" and on_main(r), len(requests))
    assert [tuple(r[k] for k in TRACE_KEYS) for r in received] == requests
    # a fence: what backend_sim sent is traced before it is sent, so it is all in now
    own = device.execute("query-status")["negotiated"]["protocol_features"]
    assert carried(device, "backend", direction="out") == [r for r in forwarded if r[4]]
    assert own == status["negotiated"]["protocol_features"]  # what the tap saw acked
    assert vm.alive() and be.alive()
    quit_qemu(vm, qmp)


@pytest.mark.qemu
def test_our_front_end_and_qemu_storage_daemon_through_the_tap(spawn, tmp_path) -> None:
    """The tap connects to both: our front-end listening, and qemu-storage-daemon's
    vhost-user-blk export. The handshake ends as it does without the tap (SHMEM off), and
    the front-end's trace and the tap's are the same messages."""
    qsd = need("qemu-storage-daemon")
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (4 << 20))
    blk, qmp = str(tmp_path / "blk.sock"), str(tmp_path / "qsd.qmp")
    daemon = spawn(
        qsd,
        "--blockdev", f"driver=file,node-name=file0,filename={disk}",
        "--export",
        f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={blk},writable=on",
        "--chardev", f"socket,id=qmp,path={qmp},server=on,wait=off",
        "--monitor", "chardev=qmp",
        name="qsd",
    )  # fmt: skip
    exports = Monitor.of(daemon, qmp, PATIENCE)
    assert [e["id"] for e in exports.execute("query-block-exports")] == ["exp0"]

    front_sock, fe_ctl = str(tmp_path / "front.sock"), str(tmp_path / "fe.ctl")
    fe = spawn("frontend", "--listen", front_sock, "--control", fe_ctl)
    front = watch(fe, fe_ctl, Event.MESSAGE)
    # The tap meets the front-end first, and the front-end starts its handshake at once;
    # the back-end's socket appears under the tap's name only once the tap is watched.
    back_sock = tmp_path / "back.sock"
    proc, ctl = start_tap(spawn, tmp_path, f"connect:{front_sock}", f"connect:{back_sock}",
                          "--retry", "0.05")  # fmt: skip
    tap = watch(proc, ctl, Event.MESSAGE, Event.VIOLATION, Event.UNDECODABLE)
    back_sock.symlink_to(blk)
    fe.wait_connected(shmem=False)

    own = front.execute("query-status")
    status = tap.execute("query-status")
    assert not own["negotiated"]["shmem"] and not status["negotiated"]["shmem"]
    assert status["negotiated"]["protocol_features"] == own["negotiated"]["protocol_features"]
    assert own["negotiated"]["protocol_features"] == ["MQ", "REPLY_ACK", "BACKEND_REQ",
                                                      "BACKEND_SEND_FD"]  # fmt: skip
    assert status["negotiated"]["features"] == own["negotiated"]["features"]
    assert_peers(status, fe, daemon)
    sides = status["sides"]
    assert (sides[FRONT_END]["mode"], sides[BACK_END]["mode"]) == ("connect", "connect")

    sent = carried(front, "frontend", direction="out")
    got = carried(front, "frontend", direction="in")
    forwarded = [tuple(r[k] for k in TRACE_KEYS) for r in records(tap, bool, len(sent + got))]
    # the front-end's: requests on the main channel, replies on the backend channel
    assert [r for r in forwarded if (r[0] == "main") != r[4]] == sent
    assert [r for r in forwarded if (r[0] == "main") == r[4]] == got
    no_findings(tap)
    assert status["truth"]["verdict"] == AGREE

    # both still up: the export stands, the front-end is connected and leaves cleanly
    exports = exports.execute("query-block-exports")
    assert [(e["id"], e["shutting-down"]) for e in exports] == [("exp0", False)]
    assert fe.stop() == 0 and daemon.alive()
    assert "Traceback" not in fe.log()


# ------------------------------------------------------------------ scenarios, step by step

#: Scenario actions a second: slow enough that an answer is compared before the next
#: request passes, mostly; a request that overtakes a comparison costs only that one
SCENARIO_RATE = 5.0
STEPS = 8


def device_mappings(status: dict[str, Any], shmid: int) -> list[dict[str, Any]]:
    """backend_sim's belief in one region, as the front-end's and the tap's mappings read
    (its own buffer left out); every one confirmed by an answer."""
    held = [m for m in status["mapped"] if m["shmid"] == shmid]
    assert all(m["confirmed"] for m in held), held
    return [{k: v for k, v in plain(m).items() if k not in ("buffer", "confirmed")} for m in held]


def nth_event(monitor: Monitor, n: int) -> dict[str, Any]:
    """The monitor's n-th event (from 1), once it has come."""
    while len(monitor.events) < n:
        answer = monitor._read()
        if "event" in answer:
            monitor.events.append(answer)
    return monitor.events[n - 1]


def answered(status: dict[str, Any]) -> int | None:
    """How many SHMEM requests the tap has seen, when each was answered (None while one
    waits). The scenarios ask an answer to each, and the tap counts a request before it
    sends it on, so before its answer can come."""
    if status["pending"]["backend"]:
        return None
    return status["counters"]["backend"][BACK_END]["messages"]


def same_step(tap: Monitor, front: Monitor, device: Monitor, n: int) -> bool:
    """After the device's n-th answer: the tap's picture is the front-end's table and the
    device's belief, and the tap's /proc verdict is the front-end's own. False, with
    nothing compared, when the next request passed the tap meanwhile."""
    before = tap.execute("query-status")
    if answered(before) != n:
        return False
    # Neither can move on while the tap sees nothing new: the front-end acts on a request
    # the tap sent on, and the device learns of an answer after the tap does.
    own = front.execute("query-status")
    believed = device.execute("query-status")
    after = tap.execute("query-status")
    if answered(after) != n:
        return False
    assert after["regions"] == before["regions"]
    for region in before["regions"]:
        picture = [plain(m) for m in region["mappings"]]
        assert picture == [plain(m) for m in region_mappings(own, region["shmid"])], n
        assert picture == device_mappings(believed, region["shmid"]), n
    agree = before["truth"]["verdict"] == AGREE
    assert agree == (own["disagreements"] == []), (before["truth"], own["disagreements"])
    assert agree and after["truth"]["verdict"] == AGREE, before["truth"]
    assert before["violations"] == {}
    return True


@pytest.mark.parametrize("scenario", ["blobs", "dax"])
def test_at_each_step_of_a_scenario_the_tap_and_both_daemons_agree(
    spawn, tmp_path, scenario
) -> None:
    """backend_sim runs a scenario on its own (its control socket has no step command):
    after each answer the device reports, the tap and both daemons hold the same
    mappings, and the tap's /proc verdict is the front-end's own."""
    pair = start_pair(spawn, tmp_path, "connect", "connect")
    assert pair.be is not None
    device = watch(pair.be, pair.be_ctl, *sorted(OUTCOMES))  # before the first answer
    front, tap = pair.monitor("fe"), pair.monitor("tap")
    # Started once the handshake is over, not with --scenario: that one maps as soon as
    # the backend channel is open, and the front-end's SET_FEATURES, asked while it owes
    # that map's answer, is then reply-before-follow-up.
    device.execute("scenario-start", name=scenario, rate=SCENARIO_RATE, seed=7)
    compared, unmapped, n = 0, False, 0
    while compared < STEPS or not unmapped:
        n += 1
        assert n <= 20 * STEPS, f"{compared} of {n} answers compared: the rest were overtaken"
        # the device's monitor gets its outcomes only: its n-th event is its n-th answer
        outcome = nth_event(device, n)["event"]
        assert outcome != Event.REFUSED, device.events
        unmapped |= outcome == Event.UNMAPPED
        compared += same_step(tap, front, device, n)
    device.execute("scenario-stop")


# ------------------------------------------------------------------ faults, as the tap sees them

# Faults an observer of the wire cannot see, so none is tested here:
# * front-end ask-config-twice: asking GET_SHMEM_CONFIG again breaks no rule an observer
#   holds (the front-end's own get-shmem-config command does it on every call).
# * front-end no-reply-ack and back-end shmem-without-reply-ack: SHMEM acked without
#   REPLY_ACK breaks nothing by itself; backend_sim then sends no SHMEM request at all
#   ("REPLY_ACK was not negotiated"). The tap's status shows it (shmem, not reply_ack).
# * front-end exit-mid-handshake: a crash, not a message; the tap reports both sides
#   detached ("front-end closed the main channel").
# * back-end fail-backend-channel: a back-end may fail SET_BACKEND_REQ_FD; the front-end
#   then gives up, and the tap reports it detached.
# * back-end echo-need-reply needs a front-end that asks a getter with NEED_REPLY, which
#   neither ours nor QEMU 7.2 does: a test of its own below plays that front-end.
# Shown elsewhere: front-end skip-overlap-check (test_tap.py, the /proc verdict) and
# back-end map-out-of-bounds (test_tap.py, map-valid); front-end skip-alignment-check
# needs a back-end that sends an unaligned length, which backend_sim never does: a test
# of its own below drives one. Front-end backend-fd-twice and back-end map-two-fds are
# on the wire for all to see, yet the observer does not judge them (expected to fail).

Act = Callable[[Monitor, Monitor], object]
ONE = {"shmid": 0, "shm_offset": 0, "len": MiB}
NEXT = {**ONE, "shm_offset": MiB}


def map_one(front: Monitor, device: Monitor) -> None:
    attempt(device, "map", **ONE)


def map_it_twice(front: Monitor, device: Monitor) -> None:
    map_one(front, device)
    map_one(front, device)


def map_two(front: Monitor, device: Monitor) -> None:
    map_one(front, device)
    attempt(device, "map", **NEXT)


def batch_of_two(front: Monitor, device: Monitor) -> None:
    """The first map goes without NEED_REPLY: it takes effect unless refused, silently."""
    attempt(device, "batch", maps=[ONE, NEXT])


def ask_layout(front: Monitor, device: Monitor) -> None:
    attempt(front, "get-shmem-config")


def map_then_reset(front: Monitor, device: Monitor) -> None:
    map_one(front, device)
    attempt(front, "reset")


def everything(front: Monitor, device: Monitor) -> None:
    """What a clean pair does: maps (one read-only, a batch), an unmap, the layout asked
    again, a reset."""
    device.execute("map", **ONE)
    device.execute("map", shmid=2, shm_offset=0, len=64 << 10, ro=True)
    device.execute("batch", maps=[{**ONE, "shm_offset": 2 * MiB}, {**ONE, "shm_offset": 3 * MiB}])
    device.execute("unmap", **ONE)
    front.execute("get-shmem-config")
    front.execute("reset")


@dataclass(frozen=True)
class Faulty:
    """A pair with faults: the daemons' and the tap's options, whose fault it is, and
    what makes it show once the handshake is over (None: the handshake does)."""

    fe: tuple[str, ...] = ()
    be: tuple[str, ...] = ()
    tap: tuple[str, ...] = ()
    side: str = ""
    act: Act | None = None


def fault(cls: type[Faulty], side: str, name: str, **case: Any) -> Any:
    """A case of `cls` with `side`'s --fault `name`; `case`: the rest."""
    daemon = "fe" if side == FRONT_END else "be"
    case[daemon] = ("--fault", name, *case.get(daemon, ()))
    return pytest.param(cls(side=side, **case), id=f"{side} {name}")


def faulty_pair(spawn: Callable[..., Proc], tmp_path: Path, case: Faulty) -> tuple[Pair, Monitor]:
    """The tap listening on both sides and watched before either comes; then our front-end
    and backend_sim connect to it, and the case's act runs once the handshake is over."""
    front, back = str(tmp_path / "front.sock"), str(tmp_path / "back.sock")
    proc, ctl = start_tap(spawn, tmp_path, f"listen:{front}", f"listen:{back}", *case.tap)
    tap = watch(proc, ctl, Event.VIOLATION, Event.UNDECODABLE)
    pair = Pair(proc, ctl, fe_ctl=str(tmp_path / "fe.ctl"), be_ctl=str(tmp_path / "be.ctl"))
    pair.fe = fe = spawn("frontend", "--connect", front, "--control", pair.fe_ctl, *case.fe)
    # the case's options after these: the last of an option given twice is the one taken
    pair.be = spawn("backend_sim", "--connect", back, "--control", pair.be_ctl, "--regions",
                    REGIONS, "--reply-timeout", str(PATIENCE), *case.be)  # fmt: skip
    if case.act is not None:
        # not before: a front-end that still asks for answers in its handshake while it
        # owes one to a SHMEM request is in the wrong (reply-before-follow-up)
        fe.wait_connected(shmem=None)
        case.act(pair.monitor("fe"), pair.monitor("be"))
    return pair, tap


def wait_violation(tap: Monitor, by: str, rules: tuple[str, ...]) -> dict[str, Any]:
    """The first violation event by `by` of one of `rules`, once it has come."""
    index = -1
    while True:
        index = wait_event(tap, Event.VIOLATION, index + 1)
        data = tap.events[index]["data"]
        if data["by"] == by and data["rule"] in rules:
            return data


#: tap options for a fault that only time shows: a request never answered. Generous, so
#: that a busy machine's slow answers elsewhere in the handshake are not late.
DEADLINE = ("--reply-deadline", "3")


@dataclass(frozen=True)
class Broken(Faulty):
    """A fault the tap reports as a broken rule of the side whose fault it is: one of
    `rules` (more than one where which the observer names depends on how the two
    directions of a channel cross the tap); `also`: what else the way it is provoked
    breaks, as (side, rule)."""

    rules: tuple[str, ...] = ()
    also: tuple[tuple[str, str], ...] = ()


#: a reply nobody is owed: reply-owed when nothing waits, else it answers the wrong request
UNOWED = ("reply-owed", "reply-matches-request")

BROKEN = [
    fault(Broken, FRONT_END, "reply-twice", rules=("reply-only-under-reply-ack",), act=map_one),
    fault(Broken, FRONT_END, "reply-always", rules=("reply-only-under-reply-ack",),
          act=batch_of_two),
    fault(Broken, FRONT_END, "no-reply", rules=("answered-in-time",), act=map_one, tap=DEADLINE,
          be=("--reply-timeout", "1")),
    fault(Broken, FRONT_END, "reply-ok-always", rules=("refuses-invalid",), act=map_it_twice,
          also=((BACK_END, "map-valid"),)),
    fault(Broken, FRONT_END, "ack-gpa", rules=("shmem-at-bit-22",),
          be=("--fault", "offer-bit-21"), also=((BACK_END, "shmem-at-bit-22"),)),
    fault(Broken, FRONT_END, "ack-unoffered", rules=("acks-only-offered",)),
    fault(Broken, FRONT_END, "backend-channel-first", rules=("protocol-features-first",)),
    fault(Broken, BACK_END, "offer-bit-21", rules=("shmem-at-bit-22",)),
    fault(Broken, BACK_END, "no-ack", rules=("answered-in-time",), tap=DEADLINE),
    fault(Broken, BACK_END, "ack-twice", rules=UNOWED),
    fault(Broken, BACK_END, "ack-always", rules=UNOWED),
    fault(Broken, BACK_END, "unaligned-config", rules=("config-page-multiples",)),
    fault(Broken, BACK_END, "unstable-config", rules=("config-stable",), act=ask_layout),
    fault(Broken, BACK_END, "nregions-mismatch", rules=("config-nregions",)),
    # a front-end that knows SHMEM at another bit does not ack it
    fault(Broken, BACK_END, "map-without-shmem", rules=("shmem-negotiated",), act=map_one,
          fe=("--shmem-bit", "21")),
    # what a reset dropped is no mapping any more: its unmap is invalid too
    fault(Broken, BACK_END, "unmap-after-reset", rules=("no-unmap-after-reset",),
          act=map_then_reset, also=((BACK_END, "map-valid"),)),
]  # fmt: skip


@pytest.mark.parametrize("case", BROKEN)
def test_a_fault_that_breaks_a_rule_is_a_violation_of_that_rule(spawn, tmp_path, case) -> None:
    _pair, tap = faulty_pair(spawn, tmp_path, case)
    violation = wait_violation(tap, case.side, case.rules)
    assert violation["passage"].startswith("§") and violation["detail"]
    tap.execute("query-status")  # a fence: every event published so far is in
    allowed = {(case.side, rule) for rule in case.rules} | set(case.also)
    assert set(violations(tap)) <= allowed, violations(tap)
    assert all(fits(e, "tap") == "" for e in tap.events)


@dataclass(frozen=True)
class Unreadable(Faulty):
    """A fault of a message's form (docs/protocol.md §2: flags, sizes): no rule of the
    session layer covers it, so the tap reports the message undecodable, with why, and
    blames no rule."""

    reason: str = ""
    #: False once the framing of that direction is lost
    decoding: bool = True


UNREADABLE = [
    fault(Unreadable, FRONT_END, "bad-reply-flags", act=map_one,
          reason="NEED_REPLY flag on a reply: reply 9 flags 0xd"),
    fault(Unreadable, FRONT_END, "stale-reply", act=map_one,
          reason="wrong payload size for this message: u64 is 8 bytes, got 40"),
    fault(Unreadable, FRONT_END, "bad-request-flags", decoding=False,
          reason="reserved flag bits set: flags 0x19 has bits 0x10"),
    fault(Unreadable, BACK_END, "short-shmem-config",
          reason="VhostUserShMemConfig is 2056 bytes, got 2048"),
    fault(Unreadable, BACK_END, "bad-nregions", reason="field out of range: nregions 300 > 256"),
    fault(Unreadable, BACK_END, "bad-reply-flags",
          reason="request where only replies belong: request 1 (flags 0x1)"),
    fault(Unreadable, BACK_END, "short-protocol-features",
          reason="wrong payload size for this message: u64 is 8 bytes, got 4"),
]  # fmt: skip


@pytest.mark.parametrize("case", UNREADABLE)
def test_a_fault_of_form_is_an_undecodable_message(spawn, tmp_path, case) -> None:
    _pair, tap = faulty_pair(spawn, tmp_path, case)
    event = tap.events[wait_event(tap, Event.UNDECODABLE)]["data"]
    assert event["side"] == case.side and case.reason in event["reason"], event
    assert event["decoding"] is case.decoding
    tap.execute("query-status")  # a fence
    assert violations(tap) == []
    assert all(fits(e, "tap") == "" for e in tap.events)


DISAGREEING = [
    fault(Faulty, FRONT_END, "ignore-unasked", act=batch_of_two),
    fault(Faulty, FRONT_END, "reply-fail-always", act=batch_of_two),
    # it acks a map it did not make: one its own limit refused, which no observer knows
    fault(Faulty, FRONT_END, "reply-ok-always", fe=("--max-mappings", "1"), act=map_two),
]


@pytest.mark.parametrize("case", DISAGREEING)
def test_a_front_end_that_did_not_make_a_map_the_wire_says_it_made_disagrees(
    spawn, tmp_path, case
) -> None:
    """Nothing on the wire is wrong: a map asked no answer takes effect unless refused
    (silently), and an answer of 0 says it was made. Only /proc shows that the front-end
    holds nothing there, so the tap's verdict disagrees; the front-end's own table agrees
    with its own maps."""
    pair, tap = faulty_pair(spawn, tmp_path, case)
    status = tap.execute("query-status")
    truth = status["truth"]
    assert truth["verdict"] == DISAGREE, truth
    (finding,) = truth["findings"]
    (gone,) = [m for r in status["regions"] for m in r["mappings"] if "gone" in m]
    assert gone["gone"] in finding and f"inode {gone['ino']} nowhere" in gone["gone"]
    assert pair.monitor("fe").execute("query-status")["disagreements"] == []
    assert violations(tap) == [] and status["violations"] == {}


@pytest.mark.parametrize("case", [
    fault(Broken, FRONT_END, "backend-fd-twice", rules=("backend-channel-fd",)),
    fault(Broken, BACK_END, "map-two-fds", rules=("map-valid",), act=map_one),
])  # fmt: skip
def test_an_fd_too_many_is_a_violation(spawn, tmp_path, case) -> None:
    """Both go through the handshake or the map without a wait: once the front-end is
    connected and the act is over, the tap judged what passed."""
    pair, tap = faulty_pair(spawn, tmp_path, case)
    assert pair.fe is not None
    pair.fe.wait_connected()
    tap.execute("query-status")  # a fence
    assert (case.side, case.rules[0]) in violations(tap)


def test_a_clean_pair_breaks_no_rule(spawn, tmp_path) -> None:
    pair, tap = faulty_pair(spawn, tmp_path, Faulty(act=everything))
    no_findings(tap)
    truth = tap.execute("query-status")["truth"]
    assert truth["verdict"] == AGREE and truth["pid"] == pair.fe.pid  # type: ignore[union-attr]


def test_a_front_end_that_maps_an_unaligned_length_refuses_nothing_it_must(spawn, tmp_path) -> None:
    """skip-alignment-check, against a back-end this test drives: backend_sim never sends
    a length that is not page aligned."""
    back, front = str(tmp_path / "back.sock"), str(tmp_path / "front.sock")
    device = DrivenBackend(back, {0: 8 * MiB})
    buffer = memfd(2 * PAGE)
    try:
        proc, ctl = start_tap(spawn, tmp_path, f"listen:{front}", f"connect:{back}")
        tap = watch(proc, ctl, Event.VIOLATION, Event.UNDECODABLE)
        fe = spawn("frontend", "--connect", front, "--control", str(tmp_path / "fe.ctl"),
                   "--fault", "skip-alignment-check")  # fmt: skip
        device.wait_ready()
        fe.wait_connected()  # its handshake over: nothing more it asks an answer to
        # the answer passed the tap after the tap judged the request and the answer
        assert device.map(ShmemMap(0, 0, PAGE + 512, 0, 1), (buffer,)) == "ok"
        tap.execute("query-status")  # a fence
        assert violations(tap) == [(BACK_END, "map-valid"), (FRONT_END, "refuses-invalid")]
        assert "must be multiples of the page size" in tap.events[0]["data"]["detail"]
    finally:
        os.close(buffer)
        device.close()


def test_a_reply_that_echoes_need_reply_is_undecodable_and_still_answers(spawn, tmp_path) -> None:
    """echo-need-reply: this test is the front-end that asks GET_FEATURES with
    NEED_REPLY; backend_sim answers with flags 0xd, as libvhost-user does."""
    front_path, back_path = str(tmp_path / "front.sock"), str(tmp_path / "back.sock")
    proc, ctl = start_tap(spawn, tmp_path, f"listen:{front_path}", f"listen:{back_path}")
    tap = watch(proc, ctl, Event.VIOLATION, Event.UNDECODABLE)
    spawn("backend_sim", "--connect", back_path, "--control", str(tmp_path / "be.ctl"),
          "--fault", "echo-need-reply")  # fmt: skip
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as front:
        front.connect(front_path)
        front.sendall(encode(ChannelKind.MAIN, FrontendReq.GET_FEATURES, None, need_reply=True))
        reply, _ = recv_exactly(front, 20)
        assert int.from_bytes(reply[4:8], "little") == 0xD
        event = tap.events[wait_event(tap, Event.UNDECODABLE)]["data"]
        assert (event["side"], event["decoding"]) == (BACK_END, True)
        assert event["reason"] == "NEED_REPLY flag on a reply: reply 1 flags 0xd"
        status = tap.execute("query-status")
        # a reply all the same: what the back-end owed it answered, and no rule is broken
        assert status["pending"]["main"] == [] and status["violations"] == {}
        assert status["negotiated"]["device_features"] == "0x140000000"
