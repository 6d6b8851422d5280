"""A pair's lifecycle: start both daemons detached, wait for them, stop them, clean up."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from .control import ControlError, DaemonUnreachable
from .daemon import stop_process
from .inventory import status
from .rundir import PairPaths, log_tail

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


@dataclass
class Launched:
    """A pair this process started: both processes, and where the front-end reserved each
    region (shmid -> base address), as its control socket reported once connected."""

    backend: subprocess.Popen[str]
    frontend: subprocess.Popen[str]
    bases: dict[int, int]
    #: `shmemctl tap` between the two, when launched with one
    tap: subprocess.Popen[str] | None = None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM each (SIGKILL past `timeout`); the front-end first, as a VMM goes, then
        the tap, then the back-end."""
        for proc in (self.frontend, self.tap, self.backend):
            if proc is not None:
                stop_process(proc, timeout)


def launch(
    paths: PairPaths,
    *,
    backend_args: Sequence[str] = (),
    frontend_args: Sequence[str] = (),
    detached: bool = False,
    backend_stdout: int = subprocess.DEVNULL,
    timeout: float = 20.0,
    tap: bool = False,
    tap_args: Sequence[str] = (),
    relay: Sequence[str] | None = None,
) -> Launched:
    """The one way a pair is started: backend_sim listening on the pair's vhost socket,
    then the front-end connecting to it, each with its control socket in the pair's
    directory; returns once the front-end's control socket says it is connected.
    `detached` daemons outlive this process (their own session, pid files, logs in the
    pair's directory); otherwise their stderr goes to the same log files. Raises
    PairError, with the end of a log, if either exits or the pair is not connected in
    `timeout` seconds; nothing is left running then. The pair's directory must exist
    (`PairPaths.ensure` makes a named pair's; a temporary one is the caller's).

    With `tap`, `shmemctl tap` sits in the middle: it listens on `tap_socket(paths)` for
    the front-end and connects to backend_sim on the vhost socket, with its control
    socket (`paths.control("tap")`) and log in the pair's directory; it is waited for
    through that control socket before the front-end starts. Not with `detached`:
    `running`, `stop` and `clean` know a pair's two daemons only. `relay` runs another
    program in the tap's place (`bench/relay_floor.c`): the command, to which the two
    sockets are appended; it has no control socket, so it is waited for until it
    listens."""
    if tap and detached:
        raise ValueError("a pair with a tap is launched only for this process's own use")
    if relay is not None and not tap:
        raise ValueError("a relay runs in the tap's place: launch it with tap")
    front_sock = tap_socket(paths) if tap else paths.vhost
    argv = {
        "backend": [
            sys.executable,
            "-m",
            "backend_sim",
            "--listen",
            str(paths.vhost),
            "--control",
            str(paths.control("backend")),
            *backend_args,
        ],
        "frontend": [
            sys.executable,
            "-m",
            "shmemctl",
            "frontend",
            "--connect",
            str(front_sock),
            "--reconnect",
            "0.5",
            "--control",
            str(paths.control("frontend")),
            *frontend_args,
        ],
        "tap": [
            sys.executable,
            "-m",
            "shmemctl",
            "tap",
            "--front",
            f"listen:{front_sock}",
            "--back",
            f"connect:{paths.vhost}",
            "--control",
            str(paths.control("tap")),
            *tap_args,
        ],
    }
    # whoever listens is up before whoever connects to it: each role, and whose
    # listening it waits for
    order: list[tuple[str, Callable[[PairPaths], bool] | None]] = [("backend", None)]
    if relay is not None:
        argv["tap"] = [*relay, str(front_sock), str(paths.vhost)]
    if tap:
        order.append(("tap", _listening))
    up_in_the_middle = _relay_listening if relay is not None else _tap_listening
    order.append(("frontend", up_in_the_middle if tap else _listening))
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        for role, listening in order:
            if listening is not None:
                wait_for(paths, procs, functools.partial(listening, paths), timeout, "listening")
            with paths.logfile(role).open("a") as log:
                procs[role] = subprocess.Popen(
                    argv[role],
                    stdin=subprocess.DEVNULL,
                    stdout=backend_stdout if role == "backend" else subprocess.DEVNULL,
                    stderr=log,
                    text=True,
                    start_new_session=detached,
                    close_fds=True,
                )
            if detached:
                paths.pidfile(role).write_text(f"{procs[role].pid}\n")
        status = _wait_connected(paths, procs, timeout)
    except BaseException:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if detached:
            clean(paths)
        raise
    bases = {r["shmid"]: r["base"] for r in status["regions"]}
    return Launched(procs["backend"], procs["frontend"], bases, procs.get("tap"))


def tap_socket(paths: PairPaths) -> Path:
    """Where a launched tap listens for the front-end."""
    return paths.dir / "tap.sock"


def up(
    paths: PairPaths,
    regions: str,
    *,
    scenario: str | None = None,
    shmem_bit: int = 22,
    timeout: float = 20.0,
) -> dict[str, int]:
    """Start backend_sim and the front-end detached; return their pids once connected."""
    paths.ensure()
    if alive := running(paths):
        who = ", ".join(f"{r.role} {r.pid}" for r in alive)
        raise PairError(
            f"pair {paths.dir.name} is already up ({who}); "
            f"stop it first with: shmemctl down --name {paths.dir.name}"
        )
    clean(paths)  # whatever a dead pair left: never reused blindly
    common = ["--shmem-bit", str(shmem_bit)]
    pair = launch(
        paths,
        backend_args=[
            "--regions",
            regions,
            *common,
            *(["--scenario", scenario] if scenario else []),
        ],
        frontend_args=common,
        detached=True,
        timeout=timeout,
    )
    return {"backend": pair.backend.pid, "frontend": pair.frontend.pid}


def daemon_status(paths: PairPaths, role: str) -> dict[str, Any] | None:
    """A daemon's status (no mapping lists), or None while its control socket does not
    answer."""
    with contextlib.suppress(DaemonUnreachable, ControlError, OSError):
        return status(paths.control(role), role, timeout=2)
    return None


def wait_for(
    paths: PairPaths,
    procs: dict[str, subprocess.Popen[str]],
    ready: Callable[[], Any],
    timeout: float,
    what: str,
) -> Any:
    """Poll `ready` until it gives something true; PairError if a daemon exits first or
    `timeout` passes, with the ends of both logs."""
    deadline = time.monotonic() + timeout
    while True:
        for role, proc in procs.items():
            if proc.poll() is not None:
                raise PairError(
                    f"the {role} exited ({proc.returncode}) while {what}; its log "
                    f"({paths.logfile(role)}) ends:\n{log_tail(paths.logfile(role))}"
                )
        if got := ready():
            return got
        if time.monotonic() > deadline:
            raise PairError(
                f"not {what} within {timeout:g}s; the front-end's log ends:\n"
                f"{log_tail(paths.logfile('frontend'))}\nand the back-end's:\n"
                f"{log_tail(paths.logfile('backend'))}"
            )
        time.sleep(0.02)  # a control socket cannot be waited on before it exists


def _listening(paths: PairPaths) -> bool:
    status = daemon_status(paths, "backend")
    return status is not None and status["state"] in ("listening", "connected")


def _tap_listening(paths: PairPaths) -> bool:
    status = daemon_status(paths, "tap")
    return status is not None and status["state"] not in ("starting", "stopped")


def _relay_listening(paths: PairPaths) -> bool:
    return tap_socket(paths).exists()


def _wait_connected(
    paths: PairPaths, procs: dict[str, subprocess.Popen[str]], timeout: float
) -> dict[str, Any]:
    def connected() -> dict[str, Any] | None:
        status = daemon_status(paths, "frontend")
        return status if status is not None and status["state"] == "connected" else None

    return wait_for(paths, procs, connected, timeout, "connected")


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
