"""Faults from outside the protocol: kill -9, a vanished run directory, clients that
die mid-request, and many clients at once while the pair works hard."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading

import psutil

from shmemctl.control import ControlClient

from .conftest import PATIENCE, fd_count, recv_lines, wait_until


def test_kill_9_of_the_frontend_mid_stream(spawn, tmp_path) -> None:
    sock = str(tmp_path / "vhost.sock")
    be = spawn("backend_sim", "--listen", sock, "--regions", "0=64M", "--scenario", "blobs",
               "--scenario-rate", "100")  # fmt: skip
    be.wait_state("listening")
    baseline = fd_count(be.pid)
    fe = spawn("frontend", "--connect", sock, "--control", str(tmp_path / "fe1.ctl"), name="fe1")
    wait_until(lambda: fd_count(be.pid) > baseline + 5, what="buffers mapped")
    fe.stop(signal.SIGKILL)
    be.wait_status(lambda s: s["state"] != "connected", "the front-end to be gone")
    assert re.search("front-end disconnected|dropping the front-end", be.log())
    wait_until(lambda: fd_count(be.pid) <= baseline, what="backend_sim's fds back to baseline")
    fe2 = spawn("frontend", "--connect", sock, "--control", str(tmp_path / "fe2.ctl"), name="fe2")
    fe2.wait_connected()

    def mapping_again() -> bool:
        with ControlClient(str(tmp_path / "fe2.ctl")) as c:
            return c.execute("query-status", max_mappings=0)["counters"]["maps"] > 0

    wait_until(mapping_again, what="the scenario mapping through the new front-end")
    assert be.alive() and "Traceback" not in be.log()


def shell(run_dir, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmemctl", *args], capture_output=True, text=True, timeout=PATIENCE,
        env={**os.environ, "SHMEMCTL_RUN_DIR": str(run_dir)},
    )  # fmt: skip


def test_the_run_directory_removed_under_a_running_pair(tmp_path) -> None:
    run = tmp_path / "run"
    assert shell(run, "up").returncode == 0
    pids = [int((run / "default" / f"{r}.pid").read_text()) for r in ("frontend", "backend")]
    shutil.rmtree(run)
    assert all(psutil.pid_exists(p) for p in pids)
    done = shell(run, "status")
    assert done.returncode == 3 and "pair default is not up" in done.stderr
    done = shell(run, "down")
    assert done.returncode == 0 and "pair default is down" in done.stdout, done.stdout

    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_until(lambda: all(gone(p) for p in pids), what="both daemons gone")


def test_control_clients_killed_mid_request(driven, tmp_path) -> None:
    backend, fe = driven()
    backend.wait_ready()
    ctl = str(tmp_path / "run" / "default" / "frontend.ctl")
    with ControlClient(ctl) as c:
        c.execute("query-status")
    baseline = fd_count(fe.pid)
    code = (
        "import socket, sys, os, signal\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile('rb')\n"
        "f.readline()  # the greeting; then leave capabilities negotiation\n"
        's.sendall(b\'{"execute": "qmp_capabilities"}\')\n'
        "assert b'\"return\"' in f.readline()\n"
        "s.sendall(sys.argv[2].encode())\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    for request in (
        '{"id": 1, "execute": "query-status", "arguments": {"max_mappings": 100000}}\n',
        '{"id": 1, "execute": "query-sta',
        '{"id": 1, "execute": "reset"}\n',
    ):
        done = subprocess.run([sys.executable, "-c", code, ctl, request], timeout=PATIENCE)
        assert done.returncode == -signal.SIGKILL
    wait_until(lambda: fd_count(fe.pid) <= baseline, what="the dead clients' fds released")
    with ControlClient(ctl) as c:
        assert c.execute("query-status", max_mappings=0)["state"] == "connected"
    assert fe.alive() and "Traceback" not in fe.log()


def test_eight_clients_hammer_status_while_10000_cycles_run(spawn, tmp_path) -> None:
    # The front-end listens, so the clients are hammering before backend_sim connects and
    # its script (the cycles) starts: no pause in the script to give them a head start.
    sock = str(tmp_path / "vhost.sock")
    fe = spawn("frontend", "--listen", sock, "--control", str(tmp_path / "fe.ctl"))
    fe.wait_listening()
    statuses: list[int] = []
    problems: list[object] = []
    done = threading.Event()
    hammering = [threading.Event() for _ in range(8)]

    def hammer(started: threading.Event) -> None:
        with ControlClient(str(tmp_path / "fe.ctl"), timeout=PATIENCE) as c:
            while not done.is_set():
                st = c.execute("query-status", max_mappings=64)
                statuses.append(1)
                started.set()
                if st["disagreements"]:
                    problems.append(st["disagreements"])

    threads = [threading.Thread(target=hammer, args=(e,)) for e in hammering]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: all(e.is_set() for e in hammering), what="every client answered")
        script = tmp_path / "cycles.txt"
        script.write_text("bench batch16 4096 0 10000\n")
        be = spawn("backend_sim", "--connect", sock, "--regions", "0=512M",
                   "--reply-timeout", str(PATIENCE), "--script", str(script))  # fmt: skip
        lines = be.wait_lines(1, timeout=300)
    finally:
        done.set()
        for t in threads:
            t.join(PATIENCE)
    result = json.loads(lines[0].split(": ", 1)[1])
    assert result["pairs"] == 10000
    assert problems == [], problems[:3]
    assert len(statuses) >= 8
    with ControlClient(str(tmp_path / "fe.ctl")) as c:
        st = c.execute("query-status")
    assert st["counters"]["maps"] >= 10000 and st["counters"]["unmaps"] >= 10000
    assert st["disagreements"] == [] and st["regions"][0]["count"] == 0
    assert fe.alive() and be.alive()


def test_a_socket_client_that_only_connects(driven, tmp_path) -> None:
    """Connecting and sending nothing holds no lock and blocks nobody."""
    driven()
    ctl = str(tmp_path / "run" / "default" / "frontend.ctl")
    idle = [socket.socket(socket.AF_UNIX) for _ in range(20)]
    try:
        for s in idle:
            s.connect(ctl)
        for s in idle:  # each one accepted, its threads running, and then it sends nothing
            assert b'"QMP"' in recv_lines(s)[0]
        with ControlClient(ctl) as c:
            assert c.execute("query-status", max_mappings=0)["state"] == "connected"
    finally:
        for s in idle:
            s.close()
