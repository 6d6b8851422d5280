"""What both daemons need from their process: logging, a stop that signals can
trigger, and sockets laid out the same way."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any


def setup_logging(role: str, verbose: bool = False) -> logging.Logger:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"%(asctime)s {role}[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    return logging.getLogger(role)


class Stopper:
    """A stop flag that SIGTERM/SIGINT set and that `wait`/`poll` callers wake up for."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._r, self._w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def install_signals(self, on_signal: Callable[[], None] | None = None) -> None:
        """SIGTERM and SIGINT call `on_signal` (by default: stop). From the main thread.

        The kernel may hand a signal to any thread, and Python runs its handler only in
        the main thread, once that is back from its system call: a main thread asleep in
        poll would never see it. So this stopper's pipe is also the signal wakeup fd, and
        every wait here polls that pipe: whichever thread the signal went to, the byte
        it writes wakes the main thread, which then runs the handler."""
        handler = on_signal or self.stop
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: handler())
        signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)

    def stop(self) -> None:
        self.event.set()
        with contextlib.suppress(OSError):
            os.write(self._w, b"x")

    @property
    def stopped(self) -> bool:
        return self.event.is_set()

    def wait(self, seconds: float | None = None) -> bool:
        """Sleep up to `seconds` (None: until a stop comes); True if a stop came."""
        self.wait_readable(None, seconds)
        return self.stopped

    def wait_readable(self, sock: socket.socket | int | None, timeout: float | None) -> bool:
        """Wait until `sock` is readable (True) or a stop/timeout comes (False); with no
        `sock`, for a stop or the timeout alone."""
        poller = select.poll()
        if sock is not None:
            poller.register(sock, select.POLLIN)
        poller.register(self._r, select.POLLIN)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.stopped:
            left = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            ready = poller.poll(left)
            if any(fd != self._r for fd, _ in ready):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
        return False


def listen_unix(path: str, mode: int | None = None) -> socket.socket:
    """Listen on `path`, replacing a stale socket file but never a live one or a non-socket.
    With `mode`, the socket is born with it: no window in which others may connect."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise OSError(f"{path} exists and is not a socket; remove it or pick another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: stale
        else:
            raise OSError(f"{path} is in use by a running process; pick another path")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o777 & ~mode) if mode is not None else None
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        if old is not None:
            os.umask(old)
    sock.listen(16)
    return sock


def connect_unix(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


_UCRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process on the other end of a connected Unix socket, as
    the kernel recorded them when it connected (SO_PEERCRED). OSError if it cannot."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def profiled(target: Callable[..., None], name: str) -> Callable[..., None]:
    """`target`, run under cProfile when SHMEMCTL_PROFILE_DIR is set (see `shmemctl bench`):
    the stats land in that directory as NAME-PID.prof when the thread ends."""
    directory = os.environ.get("SHMEMCTL_PROFILE_DIR")
    if not directory:
        return target

    def run(*args: object) -> None:
        import cProfile

        profile = cProfile.Profile()
        try:
            profile.runcall(target, *args)
        finally:
            profile.dump_stats(os.path.join(directory, f"{name}-{os.getpid()}.prof"))

    return run


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM a process we started, SIGKILL past `timeout`; reaped either way."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_seconds(pid: int | None) -> float:
    """CPU time of process `pid` so far, all its threads, those that ended too; 0 when
    it cannot be read, or there is no pid. From the process's CPU-time clock, in
    nanoseconds: user and system times move in 10 ms ticks, and a short bench cell's
    peer may spend less than one."""
    if pid is None:
        return 0.0
    # the clock id clock_getcpuclockid(3) gives for another process on Linux: the
    # scheduler's count of the whole process (CPUCLOCK_SCHED, not one thread)
    with contextlib.suppress(OSError, OverflowError):
        return time.clock_gettime(((~pid) << 3) | 2)
    import psutil

    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


def process_facts(pid: int | None = None) -> dict[str, Any]:
    """pid, RSS and open fds of a process (ours by default), as psutil sees it."""
    import psutil

    proc = psutil.Process(pid)
    with proc.oneshot():
        return {"pid": proc.pid, "rss": proc.memory_info().rss, "fds": proc.num_fds()}


def open_peer(path: str, *, listen: bool, timeout: float) -> socket.socket:
    """One connection to a peer: accept it on `path` (then remove the socket file) or
    connect to it there."""
    if not listen:
        return connect_unix(path)
    listener = listen_unix(path)
    listener.settimeout(timeout)
    try:
        sock, _ = listener.accept()
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    sock.settimeout(None)
    return sock
