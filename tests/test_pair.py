"""The two daemons as real processes over a real socket, and backend_sim under a
front-end the test drives by hand."""

from __future__ import annotations

import ctypes
import os
import signal
import threading

import pytest

from shmemctl.control import ControlClient
from shmemctl.frontend import Frontend, FrontendOptions
from shmemctl.pair import daemon_status, launch
from shmemctl.rundir import PairPaths
from shmemctl.shmem.procmaps import Segment, kernel_segments, read_maps

from .conftest import PAGE, PATIENCE, MiB, fd_count, read_mem, region_bases, segments, wait_until

DEMO = """\
map 0 0 1M
map 0 0x80000 1M
map 2 0 64K ro
map 0 0x100000 4096 fd_offset=4096
unmap 0 0 1M
map 0 0x200000 4K noreply
map 0 0x201000 4K noreply
map 0 0x202000 4K
"""
DEMO_RESULTS = [
    "map 0 0 1M: ok",
    "map 0 0x80000 1M: EEXIST",
    "map 2 0 64K ro: ok",
    "map 0 0x100000 4096 fd_offset=4096: ok",
    "unmap 0 0 1M: ok",
    "map 0 0x200000 4K noreply: sent (no reply asked)",
    "map 0 0x201000 4K noreply: sent (no reply asked)",
    "map 0 0x202000 4K: ok",
]


def start_pair(spawn, tmp_path, script: str = DEMO, *fe_args: str):
    sock = str(tmp_path / "vhost.sock")
    (tmp_path / "script.txt").write_text(script)
    be = spawn(
        "backend_sim",
        "--listen",
        sock,
        "--regions",
        "0=8M,2=64K",
        "--script",
        str(tmp_path / "script.txt"),
    )
    be.wait_state("listening")
    fe = spawn("frontend", "--connect", sock, *fe_args)
    return be, fe, sock


def test_script_results_and_proc_maps_agree(spawn, tmp_path) -> None:
    be, fe, _ = start_pair(spawn, tmp_path)
    assert be.wait_lines(len(DEMO_RESULTS)) == DEMO_RESULTS
    bases = region_bases(fe)
    region0 = segments(fe.pid, bases[0], 8 * MiB)
    # buffer 4 (fd_offset 4096) at 1M, buffers 5-7 at 2M..2M+12K (three distinct files)
    assert [(s.start, s.end, s.access, s.file_offset) for s in region0] == [
        (0, MiB, "none", 0),
        (MiB, MiB + PAGE, "rw", PAGE),
        (MiB + PAGE, 2 * MiB, "none", 0),
        (2 * MiB, 2 * MiB + PAGE, "rw", 0),
        (2 * MiB + PAGE, 2 * MiB + 2 * PAGE, "rw", 0),
        (2 * MiB + 2 * PAGE, 2 * MiB + 3 * PAGE, "rw", 0),
        (2 * MiB + 3 * PAGE, 8 * MiB, "none", 0),
    ]
    assert [s.access for s in segments(fe.pid, bases[2], 64 << 10)] == ["ro"]
    # every page starts with a tag naming its buffer and page
    assert read_mem(fe.pid, bases[2], 26) == b"shmemctl buffer 3 page 0\n\0"
    assert read_mem(fe.pid, bases[2] + 5 * PAGE, 25) == b"shmemctl buffer 3 page 5\n"
    assert read_mem(fe.pid, bases[0] + MiB, 25) == b"shmemctl buffer 4 page 1\n"


def test_disconnect_drops_everything_and_reconnect_starts_over(spawn, tmp_path) -> None:
    sock = str(tmp_path / "vhost.sock")
    fe = spawn("frontend", "--connect", sock, "--reconnect", "0.2")
    fe.wait_state("reconnecting")
    baseline = fd_count(fe.pid)
    (tmp_path / "script.txt").write_text("map 0 0 1M\nmap 2 0 64K ro\n")
    args = ("--listen", sock, "--regions", "0=8M,2=64K", "--script", str(tmp_path / "script.txt"))
    be = spawn("backend_sim", *args, name="backend1")
    assert be.wait_lines(2) == ["map 0 0 1M: ok", "map 2 0 64K ro: ok"]
    bases = region_bases(fe)
    assert fd_count(fe.pid) > baseline  # the two channels

    be.stop(9)  # kill -9 mid-session
    fe.wait_dropped()
    assert "dropped 2 mappings" in fe.log()  # said before the state changes
    assert segments(fe.pid, bases[0], 8 * MiB) == [Segment(0, 8 * MiB, "none")]
    assert segments(fe.pid, bases[2], 64 << 10) == [Segment(0, 64 << 10, "none")]
    wait_until(lambda: fd_count(fe.pid) == baseline, what="fds back to baseline")
    assert fe.alive()

    os.unlink(sock)  # the killed back-end left its socket behind
    be2 = spawn("backend_sim", *args, name="backend2")
    assert be2.wait_lines(2) == ["map 0 0 1M: ok", "map 2 0 64K ro: ok"]
    # backend_sim maps as soon as it may, which can be before the front-end's SET_FEATURES
    # (the last step of its handshake) is acked: the second "connected" may come after.
    fe.wait_connected(connection=2)
    assert region_bases(fe) == bases  # same layout: reservations kept across peers
    assert segments(fe.pid, bases[0], 8 * MiB)[0].access == "rw"


def test_without_reconnect_it_stays_up_disconnected_until_stopped(spawn, tmp_path) -> None:
    be, fe, _ = start_pair(spawn, tmp_path, "map 0 0 64K\n")
    assert be.wait_lines(1) == ["map 0 0 64K: ok"]
    be.stop()
    fe.wait_state("disconnected")
    fe.wait_log("staying up disconnected")  # said once the state has changed
    # still up after saying so: it answers on its control socket, disconnected
    with ControlClient(str(tmp_path / "run" / "default" / "frontend.ctl")) as c:
        assert c.execute("query-status", max_mappings=0)["state"] == "disconnected"
    assert fe.alive()
    assert fe.stop() == 0


def test_first_connect_failure_says_what_to_do(spawn, tmp_path) -> None:
    fe = spawn("frontend", "--connect", str(tmp_path / "nobody.sock"))
    assert fe.wait_exit(PATIENCE) == 1
    assert "is a back-end listening there?" in fe.log()
    assert "Traceback" not in fe.log()


def test_sigterm_stops_a_listening_front_end_cleanly(spawn, tmp_path) -> None:
    sock = tmp_path / "fe.sock"
    fe = spawn("frontend", "--listen", str(sock))
    fe.wait_listening()
    (tmp_path / "script.txt").write_text("map 0 0 64K\n")
    be = spawn("backend_sim", "--connect", str(sock), "--script", str(tmp_path / "script.txt"))
    assert be.wait_lines(1) == ["map 0 0 64K: ok"]
    assert fe.stop() == 0
    assert not sock.exists()
    assert be.wait_exit(PATIENCE) == 0  # a connecting backend_sim ends with its front-end
    assert "Traceback" not in fe.log() + be.log()


#: tgkill(2)'s number: a signal to one chosen thread of a process, as the kernel may
#: choose one itself for a signal sent to the process
_TGKILL = {"x86_64": 234, "aarch64": 131}.get(os.uname().machine)


def signal_another_thread(pid: int, sig: int) -> None:
    """Send `sig` to a thread of `pid` that is not its main thread."""
    others = sorted(int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid)
    assert others, f"pid {pid} has no thread but its main one"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_TGKILL, pid, others[0], sig) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill {pid} {others[0]}")


@pytest.mark.skipif(_TGKILL is None, reason="tgkill's number on this machine is not known here")
def test_a_sigterm_that_another_thread_receives_still_stops_each_daemon(spawn, tmp_path) -> None:
    """The kernel may hand a process's SIGTERM to any of its threads, and Python runs the
    handler only in the main thread, once that is back from its system call. A daemon
    whose main thread sleeps (polling its sockets, or waiting for its connection to end)
    must still wake for it and stop cleanly, as it does when the main thread gets it."""
    dev, front = tmp_path / "dev.sock", tmp_path / "front.sock"
    be = spawn("backend_sim", "--listen", str(dev), "--control", str(tmp_path / "be.ctl"),
               "--regions", "0=1M")  # fmt: skip
    be.wait_state("listening")
    tap = spawn("tap", "--front", f"listen:{front}", "--back", f"connect:{dev}",
                "--control", str(tmp_path / "tap.ctl"), "--reply-deadline", "0")  # fmt: skip
    tap.wait_status(lambda s: s["state"] != "starting", "its sockets made")
    fe = spawn("frontend", "--connect", str(front), "--control", str(tmp_path / "fe.ctl"))
    fe.wait_connected()
    tap.wait_status(lambda s: s["state"] == "relaying", "relaying")
    for daemon in (fe, tap, be):  # each with its main thread asleep, waiting
        signal_another_thread(daemon.pid, signal.SIGTERM)
        assert daemon.wait_exit(PATIENCE) == 0, daemon.log()
    assert not dev.exists() and not front.exists()
    assert "Traceback" not in fe.log() + tap.log() + be.log()


def test_reset_drops_every_mapping_and_the_backend_forgets(spawn, tmp_path) -> None:
    """The front-end runs in this process so the test can reset it; /proc/self is its truth."""
    sock = str(tmp_path / "vhost.sock")
    (tmp_path / "script.txt").write_text("map 0 0 1M\nmap 2 0 64K ro\n")
    # the acks come from this process, as busy as pytest is: a generous reply timeout
    be = spawn("backend_sim", "--listen", sock, "--regions", "0=8M,2=64K", "--script",
               str(tmp_path / "script.txt"), "--reply-timeout", str(PATIENCE))  # fmt: skip
    be.wait_state("listening")
    fe = Frontend(FrontendOptions(connect=sock))
    runner = threading.Thread(target=fe.run, daemon=True)
    runner.start()
    try:
        assert be.wait_lines(2) == ["map 0 0 1M: ok", "map 2 0 64K ro: ok"]
        assert fe.regions is not None and fe.regions.count == 2
        assert fe.reset() == (2, "RESET_DEVICE")
        lines = read_maps()
        for region in fe.regions.regions.values():
            assert kernel_segments(lines, region.base, region.size) == [
                Segment(0, region.size, "none")
            ]
        assert fe.regions.count == 0
        be.wait_status(lambda s: s["mapped"] == [], "the device to forget its mappings")
        # said once the mappings are forgotten
        be.wait_log(r"forgot 2 mappings \(RESET_DEVICE from the front-end\)")
        assert fe.state == "connected"  # a reset is not a disconnect
    finally:
        fe.stop()
        runner.join(PATIENCE)
    assert not runner.is_alive()
    assert fe.regions is None  # reservations released on stop


def test_launch_uses_the_directory_it_is_given_and_leaves_its_parent_alone(tmp_path) -> None:
    """demo and bench launch a pair in a temporary directory: the directory around it
    (/tmp itself, for them) keeps its modes, and the pair's status is read, not logged."""
    parent = tmp_path / "shared"
    parent.mkdir(mode=0o755)
    parent.chmod(0o1777)
    paths = PairPaths(parent / "pair")
    paths.dir.mkdir(mode=0o700)
    pair = launch(paths, backend_args=["--regions", "0=1M,3=64K"], timeout=PATIENCE)
    try:
        assert sorted(pair.bases) == [0, 3]
        status = daemon_status(paths, "frontend")
        assert status is not None and status["state"] == "connected"
        assert {r["shmid"]: r["base"] for r in status["regions"]} == pair.bases
    finally:
        pair.stop()
    assert pair.frontend.returncode is not None and pair.backend.returncode is not None
    assert parent.stat().st_mode & 0o7777 == 0o1777
