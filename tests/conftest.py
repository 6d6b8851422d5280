"""Harness: the daemons as real processes, a back-end the test drives byte by byte,
and the kernel's view of a process (/proc/PID/maps, /proc/PID/fd)."""

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
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from shmemctl.backend import BackendEndpoint, DeviceModel
from shmemctl.channel import Channel, close_fds
from shmemctl.control import ControlClient, DaemonUnreachable
from shmemctl.daemon import listen_unix
from shmemctl.inventory import brief
from shmemctl.rundir import DEFAULT_NAME, PairPaths
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

#: The last-resort deadline of every wait in the suite. Tests wait on conditions (a
#: daemon's status, a reply, /proc, a process exit), never on time; this only bounds how
#: long a test that is going to fail takes to say so, so it is generous: the machine may
#: be busy.
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


def _option(args: list[str], flag: str) -> str | None:
    """The value of `flag` on a command line (the last one wins, as for click)."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(f"{flag}="):
            value = arg.split("=", 1)[1]
    return value


def _role(args: list[str]) -> str | None:
    """The role of the shmemctl daemon `args` starts (its control socket is ROLE.ctl);
    None for any other program."""
    if args[1:3] == ["-m", "backend_sim"]:
        return "backend"
    if args[1:3] == ["-m", "shmemctl"] and args[3:4] in (["frontend"], ["tap"]):
        return args[3]
    return None


class Proc:
    """A daemon started as a real process; stdout and stderr go to files we can poll,
    and what it is doing is asked of its control socket."""

    def __init__(self, args: list[str], workdir: Path, name: str) -> None:
        self.name = name
        self.out_path = workdir / f"{name}.out"
        self.err_path = workdir / f"{name}.err"
        # Each test's daemons get a run directory of their own.
        run_dir = workdir / "run"
        env = {**os.environ, "SHMEMCTL_RUN_DIR": str(run_dir)}
        #: its control socket: --control, else ROLE.ctl in the run directory of its --name
        self.role = _role(args)
        self.control: Path | None = None
        if self.role is not None:
            control = _option(args, "--control")
            pair = PairPaths(run_dir / (_option(args, "--name") or DEFAULT_NAME))
            self.control = workdir / control if control else pair.control(self.role)
        self._client: ControlClient | None = None
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

    def status(self) -> dict[str, Any] | None:
        """The daemon's status (a front-end's without mapping lists), or None while its
        control socket does not answer: not made yet, or the daemon is going away. One
        connection is kept for the daemon's life: a client's socket that the daemon
        closes some time after each request would make its fd count drift."""
        if self.control is None:
            raise AssertionError(f"{self.name} has no control socket")
        assert self.role is not None
        try:
            if self._client is None:
                self._client = ControlClient(str(self.control), timeout=PATIENCE)
            # backend_sim's in full: tests read the mappings and buffers it believes
            summary = brief(self.role) if self.role != "backend" else {}
            return self._client.execute("query-status", **summary)
        except DaemonUnreachable:
            self._disconnect()
            return None

    def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def wait_status(
        self,
        predicate: Callable[[dict[str, Any]], object] = lambda _: True,
        what: str = "its control socket to answer",
        timeout: float = PATIENCE,
    ) -> dict[str, Any]:
        """Poll the control socket until the status satisfies `predicate`; that status.
        Fails at once, with the daemon's log, if it exits meanwhile."""
        last: dict[str, Any] | None = None

        def reached() -> dict[str, Any] | None:
            nonlocal last
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited {self.popen.returncode} while waiting for {what}"
                )
            last = self.status()
            return last if last is not None and predicate(last) else None

        try:
            return wait_until(reached, timeout, f"{what} ({self.name})")  # type: ignore[return-value]
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}\n--- {self.name}'s last status ---\n{last}\n"
                f"--- {self.name} log ---\n{self.log()}"
            ) from None

    def wait_state(self, *states: str, timeout: float = PATIENCE) -> dict[str, Any]:
        """Until the status's state is one of `states`."""
        return self.wait_status(
            lambda s: s["state"] in states, f"state {' or '.join(states)}", timeout
        )

    def wait_listening(self, timeout: float = PATIENCE) -> dict[str, Any]:
        """A front-end started with --listen: its socket is there to take a back-end."""
        return self.wait_status(lambda s: s["listening"], "its socket to listen on", timeout)

    def wait_connected(
        self, shmem: bool | None = True, *, connection: int = 1, timeout: float = PATIENCE
    ) -> dict[str, Any]:
        """A front-end: the handshake of its `connection`-th connection (or a later one)
        is done, with SHMEM negotiated or not as `shmem` says (None: either)."""
        return self.wait_status(
            lambda s: (
                s["state"] == "connected"
                and s["counters"]["connections"] >= connection
                and (shmem is None or s["negotiated"]["shmem"] is shmem)
            ),
            f"connection {connection} to be made"
            + ("" if shmem is None else f" with SHMEM {'on' if shmem else 'off'}"),
            timeout,
        )

    def wait_dropped(self, timeout: float = PATIENCE) -> dict[str, Any]:
        """A front-end that was connected: the connection is over and every mapping went
        with it (the regions stay reserved, empty)."""
        return self.wait_status(
            lambda s: (
                s["state"] in ("disconnected", "reconnecting")
                and all(r["count"] == 0 for r in s["regions"])
            ),
            "the connection and its mappings to be dropped",
            timeout,
        )

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
        self._disconnect()
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
    """Where the front-end reserved each region, from its status."""
    status = frontend.status()
    assert status is not None, f"{frontend.name} does not answer on its control socket"
    return {r["shmid"]: r["base"] for r in status["regions"]}


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


def qmp_negotiate(sock: socket.socket) -> dict[str, Any]:
    """Begin a raw QMP session on a control socket: read the greeting (QMP's, with no
    capabilities offered), leave capabilities negotiation and check it is accepted; the
    greeting's `QMP` object. Byte-exact, as recv_lines: nothing after it is taken."""
    greeting = json.loads(recv_lines(sock)[0])
    assert list(greeting) == ["QMP"] and greeting["QMP"]["capabilities"] == [], greeting
    sock.sendall(b'{"execute": "qmp_capabilities"}\n')
    answer = json.loads(recv_lines(sock)[0])
    assert answer == {"return": {}}, answer
    return greeting["QMP"]


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

    def wait_hung_up(self) -> None:
        """Until the front-end has closed the main channel: it gave up on this back-end."""
        self.thread.join(PATIENCE)
        assert not self.thread.is_alive(), "the front-end never hung up"

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
        fe.wait_connected(shmem=None)
        return backend, fe

    yield start
    for backend in made:
        backend.close()
