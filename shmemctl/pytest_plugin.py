"""shmemctl's pytest plugin: real daemons as fixtures, failures that explain
themselves, and the conformance suite as test items. Registered through the
`pytest11` entry point when shmemctl is installed; `-p no:shmemctl` turns it off.

Fixtures (each configurable by `@pytest.mark.shmem(...)` or indirect parametrization
with a dict of the same keys: `regions`, `shmem_bit`, `frontend_args`, `backend_args`):

* `shmem_frontend`: shmemctl's front-end listening on a fresh socket; hand
  `shmem_frontend.socket` to the device under test.
* `shmem_backend`: backend_sim listening on a fresh socket; point the VMM under test
  at `shmem_backend.socket`.
* `shmem_pair`: the two connected to each other.
* `shmem_daemons`: starts any of them (and `shmemctl tap`) with the options, sockets
  and control sockets a test chooses: `shmem_daemons.frontend(connect=path)`.

When a test using them fails, its report gains the last protocol messages each
daemon traced and the end of its log. After each test the daemons it started are
gone: no process, socket or fd of theirs is left, or the test errors in teardown.

`pytest --shmem-conformance-backend="CMD {socket}"` (or `-frontend`) starts the
user's implementation with that command and yields one item per conformance check:
`test_conformance[need-reply-on-a-getter]`, failing with the passage, what was
expected and what arrived.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .api import BackendSim, Frontend, Pair, Tap
from .conformance import backend as backend_suite
from .conformance import frontend as frontend_suite
from .conformance.report import FAIL, NA, NOT_RUN, Report, Result
from .control import DaemonUnreachable
from .daemon import stop_process
from .events import TRACE
from .render import render_event

#: How many traced messages a failing test's report shows, per daemon.
TRACE_KEPT = 40
#: How many lines of each daemon's log it shows.
LOG_KEPT = 30
#: The options of the fixtures (the marker's keywords); `timeout` is how long a daemon
#: may take to come up, generous for a loaded CI machine.
DEFAULTS: dict[str, Any] = {"regions": "0=8M,2=64K", "shmem_bit": 22, "frontend_args": (),
                            "backend_args": (), "timeout": 60.0}  # fmt: skip


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("shmemctl", "vhost-user SHMEM (shmemctl)")
    group.addoption(
        "--shmem-conformance-backend", metavar="CMD", default=None,
        help="run the back-end conformance checks against the device CMD starts; {socket} "
        "in CMD is the socket it must listen on",
    )  # fmt: skip
    group.addoption(
        "--shmem-conformance-frontend", metavar="CMD", default=None,
        help="run the front-end conformance checks against the VMM CMD starts; {socket} in "
        "CMD is the socket it must connect to",
    )  # fmt: skip
    group.addoption(
        "--shmem-conformance-timeout", metavar="SECONDS", type=float, default=30.0,
        help="how long the conformance suite waits for an answer (default 30)",
    )  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "shmem(regions='0=8M,2=64K', shmem_bit=22, frontend_args=(), backend_args=(), "
        "timeout=60): how "
        "the shmem_frontend, shmem_backend and shmem_pair fixtures start their daemons",
    )


# ---------------------------------------------------------------- what a test started


Daemon = Frontend | BackendSim | Tap


class TraceKeeper:
    """The last messages a daemon traced, kept from its start by a subscription of
    their own, for the report of a test that fails. Only for a daemon that answers as
    it is kept: one started without waiting for it gets none, as a subscription made
    later, at a moment nobody chose, would be one more connection in the middle of
    whatever the test counts of it (its fds)."""

    def __init__(self, daemon: Daemon) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=TRACE_KEPT)
        self._subscription = contextlib.ExitStack()
        self._stream = self._subscription.enter_context(daemon.events([TRACE]))
        self._thread = threading.Thread(target=self._keep, daemon=True, name="shmem-trace")
        self._thread.start()

    def _keep(self) -> None:
        with contextlib.suppress(DaemonUnreachable):
            for event in self._stream:
                self.lines.append(render_event(event.record))

    def close(self) -> None:
        self._stream.interrupt()
        self._thread.join()
        self._subscription.close()


@dataclass
class Started:
    """The daemons one test started, what each traced, and what must be gone after."""

    daemons: dict[str, Daemon] = field(default_factory=dict)
    traces: dict[str, TraceKeeper] = field(default_factory=dict)
    #: what stops the daemons, and what then removes their files
    stoppers: list[Callable[[], None]] = field(default_factory=list)
    closers: list[Callable[[], None]] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)
    #: the fds opened in this process while starting them (see `starting`)
    opened: set[str] = field(default_factory=set)

    @contextlib.contextmanager
    def starting(self) -> Iterator[None]:
        """Around the start of a daemon: the fds it opens in this process (its control
        connections) must be closed after the test; the test's own are its business."""
        before = _fds()
        try:
            yield
        finally:
            self.opened |= _fds() - before

    def keep(self, handle: Daemon | Pair, **daemons: Daemon) -> None:
        """`handle` was started: these are its daemons, by name (their traces and logs
        go in a failure's report)."""
        self.stoppers.append(handle.stop)
        self.closers.append(handle.close)
        for name, daemon in daemons.items():
            self.daemons[name] = daemon
            self.pids[name] = daemon.pid
            with contextlib.suppress(DaemonUnreachable):  # not up yet: no trace
                self.traces[name] = TraceKeeper(daemon)

    def sections(self) -> list[tuple[str, str]]:
        out = []
        for name, daemon in self.daemons.items():
            trace = self.traces.get(name)
            if trace is not None:
                lines = "\n".join(trace.lines) or "(no message)"
                out.append((f"shmemctl {name}: last {TRACE_KEPT} messages", lines))
            out.append((f"shmemctl {name}: log", daemon.log_tail(LOG_KEPT)))
        return out

    def stop(self) -> list[str]:
        """Stop everything; what was left behind, each in a sentence."""
        for trace in self.traces.values():
            trace.close()
        for stop in reversed(self.stoppers):
            stop()
        # a daemon that died (a crash, a kill, an error the test provoked; perhaps as
        # the test ended) could not clean up after itself: its test judges that death,
        # and only the files of one that ended well (stopped here, or by itself) are
        died = {name for name, daemon in self.daemons.items()
                if daemon.argv is not None and daemon.returncode() not in (None, 0)}  # fmt: skip
        # a stopped daemon has removed its sockets itself; only then goes the rest
        left = [f"the {name} (pid {pid}) still runs" for name, pid in self.pids.items()
                if _alive(pid)]  # fmt: skip
        for name, daemon in self.daemons.items():
            if name in died:
                continue
            own = [daemon.control, *([daemon.socket] if daemon.listens and daemon.socket else [])]
            left += [f"the {name}'s {path} is still there" for path in own if path.exists()]
        for close in reversed(self.closers):
            close()
        return left


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie that is ours to reap does not count)."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


_STARTED = pytest.StashKey[list[Started]]()


def _fds() -> set[str]:
    """This process's open fds, each with what it is (`7 -> socket:[1234]`)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            found.add(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
    return found


@contextlib.contextmanager
def _started(request: pytest.FixtureRequest) -> Iterator[Started]:
    """One fixture's daemons: stopped after the test, and checked to be gone, with
    every fd the fixture opened in this process (the test's own are its business)."""
    started = Started()
    request.node.stash.setdefault(_STARTED, []).append(started)
    try:
        yield started
    finally:
        left = started.stop()
        leaked = sorted(started.opened & _fds())
        if leaked:
            left.append(f"fds it opened in this process are still open: {', '.join(leaked)}")
        if left:
            pytest.fail("shmemctl left things behind after the test: " + "; ".join(left),
                        pytrace=False)  # fmt: skip


def _options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The marker's keywords, then indirect parametrization's, over the defaults."""
    chosen = dict(DEFAULTS)
    marker = request.node.get_closest_marker("shmem")
    if marker is not None:
        chosen.update(marker.kwargs)
    param = getattr(request, "param", None)
    if isinstance(param, dict):
        chosen.update(param)
    unknown = sorted(set(chosen) - set(DEFAULTS))
    if unknown:
        raise pytest.UsageError(
            f"shmem: no option {', '.join(unknown)}; the options are {', '.join(DEFAULTS)}"
        )
    return chosen


def _fresh_socket(started: Started, role: str) -> Path:
    """A socket path short enough for AF_UNIX (pytest's tmp_path can be over 108 bytes)."""
    home = Path(tempfile.mkdtemp(prefix=f"shmem-{role}-"))
    started.closers.append(lambda: shutil.rmtree(home, ignore_errors=True))
    return home / "vhost.sock"


@pytest.fixture
def shmem_frontend(request: pytest.FixtureRequest) -> Iterator[Frontend]:
    """shmemctl's front-end listening on a fresh socket (`.socket`) for your device."""
    opts = _options(request)
    with _started(request) as started:
        with started.starting():
            frontend = Frontend.start(
                listen=_fresh_socket(started, "frontend"), shmem_bit=opts["shmem_bit"],
                args=opts["frontend_args"], timeout=opts["timeout"],
            )  # fmt: skip
            started.keep(frontend, frontend=frontend)
        yield frontend


@pytest.fixture
def shmem_backend(request: pytest.FixtureRequest) -> Iterator[BackendSim]:
    """backend_sim listening on a fresh socket (`.socket`) for your VMM."""
    opts = _options(request)
    with _started(request) as started:
        with started.starting():
            backend = BackendSim.start(
                listen=_fresh_socket(started, "backend"), regions=opts["regions"],
                shmem_bit=opts["shmem_bit"], args=opts["backend_args"],
                timeout=opts["timeout"],
            )  # fmt: skip
            started.keep(backend, backend=backend)
        yield backend


@pytest.fixture
def shmem_pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    """backend_sim and a front-end connected to each other."""
    opts = _options(request)
    with _started(request) as started:
        with started.starting():
            pair = Pair.start(
                regions=opts["regions"], shmem_bit=opts["shmem_bit"],
                frontend_args=opts["frontend_args"], backend_args=opts["backend_args"],
                timeout=opts["timeout"],
            )  # fmt: skip
            started.keep(pair, frontend=pair.frontend, backend=pair.backend)
        yield pair


class Daemons:
    """What `shmem_daemons` gives a test: each of shmemctl's daemons started with
    exactly the options the test needs, on the sockets it chooses, as many as it
    likes; each watched as the other fixtures' are (its log, and its trace unless it
    was started with `wait=False`, in a failure's report; gone after the test)."""

    def __init__(self, started: Started) -> None:
        self._started = started

    def _add(self, name: str | None, role: str, start: Callable[[], Daemon]) -> Any:
        name = name or role
        if name in self._started.daemons:
            raise ValueError(f"a daemon named {name!r} was started already: name each one")
        with self._started.starting():
            daemon = start()
            self._started.keep(daemon, **{name: daemon})
        return daemon

    def frontend(self, *, name: str | None = None, **options: Any) -> Frontend:
        """`Frontend.start(**options)`; `name` tells it apart in a failure's report."""
        started: Frontend = self._add(name, "frontend", lambda: Frontend.start(**options))
        return started

    def backend(self, *, name: str | None = None, **options: Any) -> BackendSim:
        """`BackendSim.start(**options)`."""
        started: BackendSim = self._add(name, "backend", lambda: BackendSim.start(**options))
        return started

    def tap(self, *, name: str | None = None, **options: Any) -> Tap:
        """`Tap.start(**options)`."""
        started: Tap = self._add(name, "tap", lambda: Tap.start(**options))
        return started


@pytest.fixture
def shmem_daemons(request: pytest.FixtureRequest) -> Iterator[Daemons]:
    """Start shmemctl's daemons one by one, each as the test needs it:

    frontend = shmem_daemons.frontend(connect=device_socket, args=["--reconnect", "1"])
    """
    with _started(request) as started:
        yield Daemons(started)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and report.when == "call":
        for started in item.stash.get(_STARTED, []):
            report.sections += started.sections()
    return report


# ---------------------------------------------------------------- conformance as items


class ConformanceRun:
    """One run of the suite against the user's implementation, shared by its items:
    the implementation is started once, checked once, and each item reads its verdict
    (or the one reason none could be had, with the command's last output)."""

    def __init__(self, command: str, role: str, timeout: float, share: Path | None) -> None:
        self.command = command
        self.role = role  # of the implementation under test: "backend" or "frontend"
        self.timeout = timeout
        #: under pytest-xdist, where the workers of one run meet: the first to need
        #: the report makes it, the others read it (one implementation, one socket)
        self.share = share
        self._report: Report | None = None
        self._failure: ConformanceError | None = None
        self.output = ""

    @property
    def checks(self) -> dict[str, str]:
        return (backend_suite if self.role == "backend" else frontend_suite).CHECKS

    def report(self) -> Report:
        if self._failure is not None:
            raise self._failure
        if self._report is None:
            try:
                self._report = self._run() if self.share is None else self._shared()
            except (ConformanceError, OSError) as exc:  # OSError: no such command
                self._failure = ConformanceError(
                    f"could not run the {self.role} checks: {exc}" + self._output_tail()
                )
                raise self._failure from None
        return self._report

    def _shared(self) -> Report:
        key = hashlib.sha256(f"{self.role}\0{self.command}".encode()).hexdigest()[:16]
        assert self.share is not None
        self.share.mkdir(parents=True, exist_ok=True)
        done = self.share / f"{key}.json"
        with open(self.share / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.exists():
                try:
                    record: dict[str, Any] = {"report": json.loads(self._run().to_json())}
                except (ConformanceError, OSError) as exc:
                    record = {"failure": str(exc)}
                done.write_text(json.dumps({**record, "output": self.output}))
        record = json.loads(done.read_text())
        self.output = record["output"]
        if "failure" in record:
            raise ConformanceError(record["failure"])
        made = Report(record["report"]["target"], record["report"]["role"], self.checks)
        made.results = [Result(**r) for r in record["report"]["results"]]
        return made

    def _output_tail(self) -> str:
        side = "device" if self.role == "backend" else "VMM"
        return f"\n\nthe {side}'s output ends:\n{self.output}" if self.output else ""

    def _start(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("w") as out:  # in a session of its own: its children go with it
            return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip

    def _run(self) -> Report:
        home = Path(tempfile.mkdtemp(prefix="shmem-conformance-"))
        socket = home / "vhost.sock"
        argv = shlex.split(self.command.replace("{socket}", str(socket)))
        log = home / "implementation.log"
        proc: subprocess.Popen[bytes] | None = None
        try:
            if self.role == "backend":  # the device listens; the suite connects
                proc = self._start(argv, log)
                _wait_for_socket(socket, proc, self.timeout)
                return backend_suite.check_backend(str(socket), timeout=self.timeout)
            # the VMM connects; the suite listens and starts it once it does
            result: list[Report] = []
            suite = threading.Thread(target=lambda: result.append(frontend_suite.check_frontend(
                str(socket), listen=True, timeout=self.timeout)), daemon=True)  # fmt: skip
            suite.start()
            _wait_for_socket(socket, None, self.timeout)
            proc = self._start(argv, log)
            suite.join()  # check_frontend gives up by itself within its timeouts
            return result[0]
        finally:
            if proc is not None:
                _stop_group(proc)
            self.output = log.read_text(errors="replace")[-4000:] if log.exists() else ""
            shutil.rmtree(home, ignore_errors=True)


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise ConformanceError(f"the command exited ({proc.returncode}) before {path} "
                                   "appeared")  # fmt: skip
        if time.monotonic() > deadline:
            raise ConformanceError(f"{path} did not appear within {timeout:g}s")
        time.sleep(0.02)  # a socket file cannot be waited on before it exists


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """The command and whatever it started: a shell's children are not left running."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    stop_process(proc)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


class ConformanceError(Exception):
    """A check failed, or could not run: the words say which and why."""


class ConformanceSuite(pytest.Collector):
    def __init__(self, *, run: ConformanceRun, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.run = run

    def collect(self) -> list[pytest.Item]:
        return [
            ConformanceItem.from_parent(self, name=f"test_conformance[{check}]", check=check)
            for check in self.run.checks
        ]


class ConformanceItem(pytest.Item):
    def __init__(self, *, check: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.check = check

    def runtest(self) -> None:
        assert isinstance(self.parent, ConformanceSuite)
        run = self.parent.run
        report = run.report()
        result = next((r for r in report.results if r.check == self.check), None)
        if result is None:  # the suite did not plan it (an option of the run left it out)
            pytest.skip(f"{self.check} was not part of this run")
        if result.verdict == NA:
            pytest.skip(f"not applicable: {result.note}")
        if result.verdict in (FAIL, NOT_RUN):
            raise ConformanceError(_explain(result, run))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, ConformanceError):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[str, int, str]:
        assert isinstance(self.parent, ConformanceSuite)
        return self.parent.run.command, 0, self.name


def _explain(result: Result, run: ConformanceRun) -> str:
    lines = [f"{result.check}: {result.verdict} ({result.passage}, docs/protocol.md)"]
    if result.verdict == FAIL:
        lines += [f"expected: {result.expected}", f"arrived:  {result.arrived}"]
    if result.note:
        lines.append(f"note:     {result.note}")
    if run.output:
        side = "device" if run.role == "backend" else "VMM"
        lines += ["", f"the {side}'s output ends:", run.output]
    return "\n".join(lines)


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    timeout = config.getoption("--shmem-conformance-timeout")
    share = None
    worker = getattr(config, "workerinput", None)  # pytest-xdist's, in a worker
    if worker is not None:
        # beside the workers' own temporary directories, which pytest cleans up in time
        factory = getattr(config, "_tmp_path_factory", None)
        root = factory.getbasetemp().parent if factory else Path(tempfile.gettempdir())
        share = root / f"shmemctl-conformance-{worker['testrunuid']}"
    for role in ("backend", "frontend"):
        command = config.getoption(f"--shmem-conformance-{role}")
        if command:
            run = ConformanceRun(command, role, timeout, share)
            name = f"shmem-conformance-{role}"
            suite = ConformanceSuite.from_parent(session, name=name, nodeid=name, run=run)
            items.extend(suite.collect())
