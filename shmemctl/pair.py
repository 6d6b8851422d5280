"""A pair's lifecycle: start both daemons detached, wait for them, stop them, clean up."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from .control import ControlClient, ControlError, DaemonUnreachable
from .rundir import PairPaths

ROLES = ("backend", "frontend")
_MARKERS = {"backend": "backend_sim", "frontend": "frontend"}


class PairError(Exception):
    """`up` or `down` could not do its job; the message says what to do."""


@dataclass
class Running:
    role: str
    pid: int


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _ours(role: str, cmdline: str, paths: PairPaths) -> bool:
    return _MARKERS[role] in cmdline and f"{paths.dir}/" in cmdline


def running(paths: PairPaths) -> list[Running]:
    """The pair's daemons that are alive: the pid files' pids, checked to be ours (a pid
    reused by an unrelated process does not count); without pid files (the run directory
    was removed under the pair), any process whose command line names the directory."""
    alive = []
    for role in ROLES:
        pid = _read_pid(paths.pidfile(role))
        if pid is None:
            continue
        try:
            cmdline = " ".join(psutil.Process(pid).cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if _ours(role, cmdline, paths):
            alive.append(Running(role, pid))
    if alive or paths.dir.exists():
        return alive
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        for role in ROLES:
            if "--control" in cmdline and _ours(role, cmdline, paths):
                alive.append(Running(role, proc.info["pid"]))
    return alive


def clean(paths: PairPaths) -> list[str]:
    """Remove what dead daemons left behind; return what was removed."""
    removed: list[str] = []
    if not paths.dir.exists():
        return removed
    for path in (
        paths.vhost,
        *(paths.control(r) for r in ROLES),
        *(paths.pidfile(r) for r in ROLES),
    ):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path.name)
    return removed


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text().splitlines()[-lines:]
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text)


def up(
    paths: PairPaths,
    regions: str,
    *,
    scenario: str | None = None,
    shmem_bit: int = 22,
    timeout: float = 20.0,
) -> dict[str, int]:
    """Start backend_sim and the front-end; return their pids once connected."""
    paths.ensure()
    if alive := running(paths):
        who = ", ".join(f"{r.role} {r.pid}" for r in alive)
        raise PairError(
            f"pair {paths.dir.name} is already up ({who}); "
            f"stop it first with: shmemctl down --name {paths.dir.name}"
        )
    clean(paths)  # whatever a dead pair left: never reused blindly
    common = ["--shmem-bit", str(shmem_bit)]
    argv = {
        "backend": [
            sys.executable, "-m", "backend_sim", "--listen", str(paths.vhost),
            "--regions", regions, "--control", str(paths.control("backend")), *common,
            *(["--scenario", scenario] if scenario else []),
        ],
        "frontend": [
            sys.executable, "-m", "shmemctl", "frontend", "--connect", str(paths.vhost),
            "--reconnect", "0.5", "--control", str(paths.control("frontend")), *common,
        ],
    }  # fmt: skip
    pids: dict[str, int] = {}
    try:
        for role in ROLES:  # the back-end listens first; the front-end retries until it does
            with paths.logfile(role).open("a") as log:
                proc = subprocess.Popen(
                    argv[role],
                    stdin=subprocess.DEVNULL,
                    stdout=log if role == "frontend" else subprocess.DEVNULL,
                    stderr=log,
                    start_new_session=True,  # outlives this shell command
                    close_fds=True,
                )
            pids[role] = proc.pid
            paths.pidfile(role).write_text(f"{proc.pid}\n")
        _wait_connected(paths, pids, timeout)
    except BaseException:
        stop(paths)
        raise
    return pids


def _wait_connected(paths: PairPaths, pids: dict[str, int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for role, pid in pids.items():
            if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                raise PairError(
                    f"the {role} exited while starting; its log "
                    f"({paths.logfile(role)}) ends:\n{_tail(paths.logfile(role))}"
                )
        with (
            contextlib.suppress(DaemonUnreachable, ControlError, OSError),
            ControlClient(str(paths.control("frontend")), timeout=2) as fe,
        ):
            if fe.execute("status", max_mappings=0)["state"] == "connected":
                return
        if time.monotonic() > deadline:
            raise PairError(
                f"the front-end did not connect within {timeout:g}s; its log ends:\n"
                f"{_tail(paths.logfile('frontend'))}\nand the back-end's:\n"
                f"{_tail(paths.logfile('backend'))}"
            )
        time.sleep(0.05)


def stop(paths: PairPaths, timeout: float = 10.0) -> list[Running]:
    """SIGTERM both daemons (SIGKILL past `timeout`), then remove their files."""
    alive = running(paths)
    for daemon in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for daemon in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(daemon.pid)
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except psutil.TimeoutExpired:
                proc.kill()
    clean(paths)
    return alive
