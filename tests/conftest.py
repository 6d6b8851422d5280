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
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from shmemctl.api import Timeout
from shmemctl.backend import BackendEndpoint, DeviceModel
from shmemctl.channel import Channel, close_fds
from shmemctl.control import DaemonUnreachable
from shmemctl.daemon import listen_unix
from shmemctl.inventory import brief
from shmemctl.pytest_plugin import Daemon, Daemons
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


def _without(args: list[str], *flags: str) -> list[str]:
    """A command line without these options (each with its value)."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        elif not any(arg.startswith(f"{flag}=") for flag in flags):
            out.append(arg)
    return out


class Proc:
    """A process a test started: one of shmemctl's daemons (started through the
    plugin's `shmem_daemons`, which checks it is gone after the test) or somebody
    else's program (QEMU, virtiofsd, a CLI command). Its standard output and log are
    files the test can poll; a daemon's state is asked of its control socket."""

    def __init__(
        self,
        name: str,
        out_path: Path,
        err_path: Path,
        *,
        popen: subprocess.Popen[bytes] | None = None,
        daemon: Daemon | None = None,
    ) -> None:
        self.name = name
        self.out_path = out_path
        self.err_path = err_path
        self._popen = popen
        self.daemon = daemon
        self.role = None if daemon is None else daemon.role
        self.control = None if daemon is None else daemon.control

    @classmethod
    def program(cls, args: list[str], workdir: Path, name: str) -> Proc:
        """Somebody else's program, or a shmemctl command that is not a daemon."""
        out_path, err_path = workdir / f"{name}.out", workdir / f"{name}.err"
        with out_path.open("w") as out, err_path.open("w") as err:
            popen = subprocess.Popen(args, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                     cwd=workdir)  # fmt: skip
        return cls(name, out_path, err_path, popen=popen)

    @property
    def pid(self) -> int:
        return self.daemon.pid if self.daemon is not None else self._process.pid

    @property
    def _process(self) -> subprocess.Popen[bytes]:
        assert self._popen is not None
        return self._popen

    @property
    def argv(self) -> list[str]:
        if self.daemon is not None:
            argv = self.daemon.argv
            assert argv is not None
            return argv
        return list(self._process.args)  # type: ignore[arg-type]

    @property
    def returncode(self) -> int | None:
        """How it ended, or None while it runs."""
        return self.daemon.returncode() if self.daemon is not None else self._process.poll()

    def wait_exit(self, timeout: float = PATIENCE) -> int:
        """Until it exits; its exit status."""
        if self.daemon is not None:
            return self.daemon.wait_exit(timeout)
        return self._process.wait(timeout)

    def log(self) -> str:
        return self.err_path.read_text()

    def stdout_lines(self) -> list[str]:
        return self.out_path.read_text().splitlines()

    def wait_log(self, pattern: str, timeout: float = PATIENCE) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            if not self.alive():
                raise AssertionError(f"{self.name} exited {self.returncode}:\n{self.log()}")
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
        if self.daemon is None or self.role is None:
            raise AssertionError(f"{self.name} has no control socket")
        # backend_sim's in full: tests read the mappings and buffers it believes
        summary = brief(self.role) if self.role != "backend" else {}
        try:  # the handle's own connection, made once its control socket answers
            answer: dict[str, Any] = self.daemon.execute("query-status", **summary)
        except (DaemonUnreachable, Timeout):
            return None
        return answer

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
            if not self.alive():
                raise AssertionError(
                    f"{self.name} exited {self.returncode} while waiting for {what}"
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
            if not self.alive() and len(self.stdout_lines()) < n:
                raise AssertionError(
                    f"{self.name} exited {self.returncode} after {self.stdout_lines()}:\n"
                    f"{self.log()}"
                )
            return False

        wait_until(enough, timeout, f"{n} lines from {self.name}")
        return self.stdout_lines()

    def alive(self) -> bool:
        return self.returncode is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = PATIENCE) -> int | None:
        """Send `sig` and wait for the end (SIGKILL past `timeout`); the exit status."""
        if self.alive():
            os.kill(self.pid, sig)
            try:
                self.wait_exit(timeout)
            except (subprocess.TimeoutExpired, Timeout):
                os.kill(self.pid, signal.SIGKILL)
                self.wait_exit(timeout)
        return self.returncode


#: The command lines of shmemctl's daemons as tests write them: which `shmem_daemons`
#: starter takes them, the options that starter takes as arguments of its own.
DAEMONS = {"frontend": "frontend", "backend_sim": "backend", "tap": "tap"}


def _start_daemon(daemons: Daemons, kind: str, args: list[str], run_dir: Path,
                  name: str) -> Proc:  # fmt: skip
    """One of shmemctl's daemons, from the command line a test wrote for it, started
    through the plugin (which stops it after the test and checks it left nothing)."""
    role = DAEMONS[kind]
    control = _option(args, "--control")
    if control is not None:
        control = str(run_dir.parent / control)  # relative to the test's directory
    else:  # where it would put it by itself: the run directory of its --name
        paths = PairPaths(run_dir / (_option(args, "--name") or DEFAULT_NAME)).ensure()
        control = str(paths.control(role))
    rest = _without(args, "--listen", "--connect", "--control", "--regions", "--front", "--back")
    # a log and output of its own, however many daemons of its role the test starts
    options: dict[str, Any] = {"control": control, "args": rest, "wait": False,
                               "log": run_dir.parent / f"{name}.log"}  # fmt: skip
    if role == "tap":
        options.update(front=_option(args, "--front"), back=_option(args, "--back"))
    else:
        options.update(listen=_option(args, "--listen"), connect=_option(args, "--connect"))
    if role == "backend":
        options["regions"] = _option(args, "--regions")
    daemon = getattr(daemons, role)(name=name, **options)
    assert daemon.log is not None and daemon.output is not None
    return Proc(name, daemon.output, daemon.log, daemon=daemon)


@pytest.fixture
def spawn(tmp_path: Path, shmem_daemons: Daemons) -> Iterator[Callable[..., Proc]]:
    """Start a process: `spawn("frontend", ARGS...)`, `spawn("backend_sim", ...)`,
    `spawn("tap", ...)` for shmemctl's daemons, else `spawn(PROGRAM, ARGS...)`."""
    procs: list[Proc] = []

    def start(kind: str, *args: str, name: str | None = None) -> Proc:
        if kind in DAEMONS:
            proc = _start_daemon(shmem_daemons, kind, list(args), tmp_path / "run", name or kind)
        else:
            proc = Proc.program([kind, *args], tmp_path, name or Path(kind).name)
        procs.append(proc)
        return proc

    yield start
    for proc in reversed(procs):
        if proc.daemon is None:  # the plugin stops its daemons, and checks they are gone
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
