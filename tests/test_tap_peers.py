"""`shmemctl tap` between real peers: QEMU 7.2 and Debian's virtiofsd (neither of them
ours), QEMU and backend_sim, our front-end and qemu-storage-daemon, our front-end and
backend_sim's scenarios.

What each peer did is taken from the peer: QEMU's own trace of the vhost-user messages
it wrote and read (`-trace vhost_user_write -trace vhost_user_read`), virtiofsd's debug
log (one "Got VU event" per message it dispatched; it names none), and the trace and
status our daemons give on their control sockets.

Topologies: QEMU connects to the tap, the tap to virtiofsd (listen, connect); the tap
connects to QEMU's server socket and backend_sim to the tap (connect, listen); the tap
connects to both our front-end and qemu-storage-daemon, or both daemons of a scenario
(connect, connect).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shmemctl.events import OUTCOMES, Event
from shmemctl.tap.truth import AGREE
from shmemctl.wire import ChannelKind, FrontendReq

from .conftest import PATIENCE, Proc, need, wait_until
from .test_events import fits, wait_event
from .test_real_peers import Monitor, MonitorClosed
from .test_tap import (
    TRACE_KEYS,
    Pair,
    carried,
    plain,
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
    status = tap.execute("status")  # a fence: every event published so far is in
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
        assert daemon.alive(), f"{name} exited {daemon.popen.returncode}:\n{daemon.log()}"
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
        assert (process["pid"], process["cmdline"]) == (proc.pid, proc.popen.args), side
        assert status["sides"][side]["attached"]


def check_relayed_realize(tap: Monitor, vm: Proc, back: Proc) -> dict[str, Any]:
    """The tap's account of QEMU's realize: the same messages as QEMU's own trace, in
    order, none judged broken; both peers by pid; what they negotiated. Its status."""
    wire = qemu_wire(vm)
    assert wire and wire[0] == ("write", FrontendReq.GET_FEATURES, 0x1), wire
    assert tap_wire(tap, len(wire)) == wire, names(wire)
    status = tap.execute("status")  # a fence for the events, after the last forwarded message
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
    assert vm.popen.wait(PATIENCE) == 0, vm.log()


def dispatched(virtiofsd: Proc) -> int:
    """How many messages virtiofsd dispatched, from its debug log once it has exited (it
    exits when its front-end goes): each is a "Got VU event" after which it came back to
    wait for the next. The end of the stream can be one more event, never dispatched."""
    assert virtiofsd.popen.wait(PATIENCE) == 0, virtiofsd.log()
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
    own = device.execute("status")["negotiated"]["protocol_features"]
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
    wait_until(lambda: front.execute("status")["state"] == "connected", what="the handshake")

    own = front.execute("status")
    status = tap.execute("status")
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
    from_front = [r for r in forwarded if (r[0] == "main") != r[4]]
    assert from_front == sent
    assert [r for r in forwarded if r not in from_front] == got
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
SCENARIO_RATE = "5"
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
    before = tap.execute("status")
    if answered(before) != n:
        return False
    # Neither can move on while the tap sees nothing new: the front-end acts on a request
    # the tap sent on, and the device learns of an answer after the tap does.
    own = front.execute("status")
    believed = device.execute("status")
    after = tap.execute("status")
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
    watched: dict[str, Monitor] = {}

    def watch_device(pair: Pair) -> None:  # before the tap: no answer can be missed
        assert pair.be is not None
        watched["be"] = watch(pair.be, pair.be_ctl, *sorted(OUTCOMES))

    runs = ("--scenario", scenario, "--scenario-rate", SCENARIO_RATE)
    pair = start_pair(spawn, tmp_path, "connect", "connect", be_args=runs, before_tap=watch_device)
    device, front, tap = watched["be"], pair.monitor("fe"), pair.monitor("tap")
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
