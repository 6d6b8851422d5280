"""Harness: the daemons as real processes, a back-end the test drives byte by byte,
and the kernel's view of a process (/proc/PID/maps, /proc/PID/fd)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from shmemctl.backend import BackendEndpoint, DeviceModel
from shmemctl.channel import Channel, close_fds
from shmemctl.daemon import listen_unix
from shmemctl.shmem.procmaps import Segment, kernel_segments, read_maps
from shmemctl.wire import BackendReq, ChannelKind, ShmemMap, encode_shmem_request
from shmemctl.wire.messages import describe_reply as describe

# This machine is small and noisy: no per-example deadline. In CI the examples
# are derandomized, so a failure there reproduces anywhere.
settings.register_profile("dev", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") == "true" else "dev")

PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20

#: The last-resort deadline of every wait in the suite. Tests wait on conditions (a log
#: line, a reply, /proc, a process exit), never on time; this only bounds how long a test
#: that is going to fail takes to say so, so it is generous: the machine may be busy.
PATIENCE = 60.0


def wait_until(
    predicate: Callable[[], object], timeout: float = PATIENCE, what: str = ""
) -> object:
    """Poll `predicate` every 20 ms until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


class Proc:
    """A daemon started as a real process; stdout and stderr go to files we can poll."""

    def __init__(self, args: list[str], workdir: Path, name: str) -> None:
        self.name = name
        self.out_path = workdir / f"{name}.out"
        self.err_path = workdir / f"{name}.err"
        # Each test's daemons get a run directory of their own.
        env = {**os.environ, "SHMEMCTL_RUN_DIR": str(workdir / "run")}
        self.popen = subprocess.Popen(
            args,
            stdout=self.out_path.open("w"),
            stderr=self.err_path.open("w"),
            stdin=subprocess.DEVNULL,
            cwd=workdir,
            env=env,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.err_path.read_text()

    def stdout_lines(self) -> list[str]:
        return self.out_path.read_text().splitlines()

    def wait_log(self, pattern: str, timeout: float = PATIENCE) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.popen.returncode}:\n{self.log()}")
            return re.search(pattern, self.log())

        try:
            return wait_until(found, timeout, f"{pattern!r} in {self.name}'s log")  # type: ignore[return-value]
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- {self.name} log ---\n{self.log()}") from None

    def wait_lines(self, n: int, timeout: float = PATIENCE) -> list[str]:
        def enough() -> bool:
            if len(self.stdout_lines()) >= n:
                return True
            if self.popen.poll() is not None and len(self.stdout_lines()) < n:
                raise AssertionError(
                    f"{self.name} exited {self.popen.returncode} after {self.stdout_lines()}:\n"
                    f"{self.log()}"
                )
            return False

        wait_until(enough, timeout, f"{n} lines from {self.name}")
        return self.stdout_lines()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = PATIENCE) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    procs: list[Proc] = []

    def start(kind: str, *args: str, name: str | None = None) -> Proc:
        if kind == "frontend":
            argv = [sys.executable, "-m", "shmemctl", "frontend", *args]
        elif kind == "backend_sim":
            argv = [sys.executable, "-m", "backend_sim", *args]
        else:
            argv = [kind, *args]
        proc = Proc(argv, tmp_path, name or kind)
        procs.append(proc)
        return proc

    yield start
    for proc in reversed(procs):
        proc.stop()


def need(binary: str) -> str:
    """A real peer's binary: the test command installs it, so under CI=true its absence
    is a failure; elsewhere the test is skipped with what to install."""
    path = shutil.which(binary)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{binary} is missing: the test command should have installed it")
        pytest.skip(f"{binary} not installed (apt-get install qemu-system-x86 qemu-system-common)")
    return path


def region_bases(frontend: Proc) -> dict[int, int]:
    """Where the front-end reserved each region, from its log."""
    found = re.findall(r"region (\d+): \S+ reserved at (0x[0-9a-f]+)", frontend.log())
    return {int(shmid): int(addr, 16) for shmid, addr in found}


def recv_lines(sock: socket.socket, n: int = 1) -> list[bytes]:
    """The next `n` lines a control socket sends (the greeting, answers), read byte-exactly
    so that nothing after them is taken off the socket."""
    sock.settimeout(PATIENCE)
    data = b""
    while data.count(b"\n") < n:
        byte = sock.recv(1)
        if not byte:
            raise AssertionError(f"the daemon hung up after {data!r}")
        data += byte
    return data.splitlines()


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def segments(pid: int, base: int, size: int) -> list[Segment]:
    return kernel_segments(read_maps(pid), base, size)


def read_mem(pid: int, addr: int, n: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        f.seek(addr)
        return f.read(n)


def write_mem(pid: int, addr: int, data: bytes) -> None:
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as f:
        f.seek(addr)
        f.write(data)


def memfd(size: int, pattern: bytes = b"") -> int:
    fd = os.memfd_create("test-buffer", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if pattern:
        os.pwrite(fd, pattern, 0)
    return fd


class DrivenBackend:
    """A back-end in the test process: our BackendEndpoint answers the handshake in a
    thread, and the test sends whatever it likes on the real backend channel."""

    def __init__(self, path: str, regions: dict[int, int]) -> None:
        self.listener = listen_unix(path)
        self.endpoint = BackendEndpoint(DeviceModel(regions), reply_timeout=PATIENCE)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        sock, _ = self.listener.accept()
        try:
            self.endpoint.serve(Channel(sock, ChannelKind.MAIN, replies=False))
        except BaseException as exc:  # reported to the test
            self.error = exc

    def wait_ready(self) -> None:
        assert self.endpoint.wait_ready(PATIENCE), (
            "front-end never opened a backend channel with SHMEM"
        )

    @property
    def channel(self) -> Channel:
        assert self.endpoint.backend_channel is not None
        return self.endpoint.backend_channel.channel

    def send_raw(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        self.channel.send(data, fds)

    def reply(self, timeout: float = PATIENCE) -> int:
        msg = self.channel.recv(timeout=timeout)
        close_fds(msg.fds)
        assert isinstance(msg.payload, int)
        return msg.payload

    def map(self, m: ShmemMap, fds: tuple[int, ...]) -> str:
        """Send SHMEM_MAP with exactly these fds; return 'ok' or the errno name."""
        self.send_raw(encode_shmem_request(BackendReq.SHMEM_MAP, m, need_reply=True), fds)
        return describe(self.reply())

    def unmap(self, m: ShmemMap, fds: tuple[int, ...] = ()) -> str:
        self.send_raw(encode_shmem_request(BackendReq.SHMEM_UNMAP, m, need_reply=True), fds)
        return describe(self.reply())

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def driven(
    tmp_path: Path, spawn: Callable[..., Proc]
) -> Iterator[Callable[..., tuple[DrivenBackend, Proc]]]:
    """Start (a back-end driven by the test, a front-end process connected to it)."""
    made: list[DrivenBackend] = []

    def start(regions: dict[int, int] | None = None, *fe_args: str) -> tuple[DrivenBackend, Proc]:
        path = str(tmp_path / "vhost.sock")
        backend = DrivenBackend(path, regions if regions is not None else {0: 8 * MiB, 2: 64 << 10})
        made.append(backend)
        fe = spawn("frontend", "--connect", path, *fe_args)
        fe.wait_log(r"connected: SHMEM")
        return backend, fe

    yield start
    for backend in made:
        backend.close()
