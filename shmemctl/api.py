"""shmemctl from Python: start its daemons or attach to running ones, and drive them,
with typed results and exceptions in the words the CLI prints.

    from shmemctl import Pair

    with Pair.start(regions="0=8M,2=64K") as pair:
        mapping = pair.backend.map(shmid=0, offset=0, length=1 << 20)
        status = pair.frontend.wait_for(lambda s: s.holds(mapping))
        assert status.agrees  # and /proc/PID/maps says the same
        pair.backend.unmap(0, 0, 1 << 20)

Each handle talks to its daemon's control socket through the same client as the
CLI and the console (`shmemctl.control.ControlClient`, QMP). A handle that
started its daemon stops it when it is closed (the `with` block ends); one that
attached leaves the daemon running. Waiting never sleeps: `wait_for` re-reads the
status each time the daemon publishes an event, until the predicate holds.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from . import rundir
from .control import ControlClient, ControlError, DaemonUnreachable
from .daemon import stop_process
from .events import Event, EventRecord, event_time, lookup
from .rundir import PairPaths, log_tail
from .shmem.mapping import Mapping, MappingJSON
from .wire.messages import MMAP_FLAG_WRITE, ShmemConfig

if TYPE_CHECKING:
    from .pair import Launched

# what `import shmemctl` offers of this module: shmemctl/__init__.py, __all__

#: How long a handle waits for its daemon to come up, and a `wait_for` by default.
DEFAULT_TIMEOUT = 30.0

D = TypeVar("D", bound="_Daemon")


class Timeout(TimeoutError):
    """What was waited for did not happen in time; the message says what it was."""


class MapRefused(ControlError):
    """The front-end refused a SHMEM_MAP or SHMEM_UNMAP. `errno` is the errno's name
    (`EEXIST`), or None where the front-end answered a bare value without a reason
    (QEMU answers 1); `value` is the reply's value; `reason` is the rest of what the
    device said (its own reading of why)."""

    def __init__(self, desc: str, errno: str | None, value: int, reason: str) -> None:
        super().__init__(desc)
        self.errno = errno
        self.value = value
        self.reason = reason


#: backend_sim's words for a refusal (backend_sim/device.py, `SimDevice.refusal`)
_REFUSAL = re.compile(
    r"refused by the front-end: (?:(?P<errno>E[A-Z0-9]+) \(reply value (?P<negative>-\d+)\)"
    r"|reply value (?P<value>\d+), no reason given)(?:; (?P<reason>.*))?$",
    re.DOTALL,
)


def _refusal(exc: ControlError) -> ControlError:
    """A map's error as MapRefused when it is the front-end's refusal, else unchanged."""
    found = _REFUSAL.search(exc.desc)
    if found is None:
        return exc
    value = int(found["negative"] or found["value"])
    return MapRefused(exc.desc, found["errno"], value, found["reason"] or "")


@dataclass(frozen=True)
class DaemonEvent:
    """One event a daemon published: its name, its data (the record shmemctl.events
    names for it), when, and which daemon said it."""

    name: Event
    data: dict[str, Any]
    time: float
    role: str
    #: the event as it came on the wire (what shmemctl.render prints)
    record: EventRecord = field(repr=False, compare=False)

    @classmethod
    def from_record(cls, record: EventRecord, role: str) -> DaemonEvent:
        return cls(lookup(record["event"]), record.get("data", {}), event_time(record), role,
                   record)  # fmt: skip

    @property
    def mapping(self) -> Mapping | None:
        """The mapping a MAPPED or UNMAPPED event is about."""
        if self.name not in (Event.MAPPED, Event.UNMAPPED) or "shm_offset" not in self.data:
            return None
        return _mapping(self.data, self.time)


@dataclass(frozen=True)
class Status:
    """A daemon as its control socket describes it.

    `mappings`: the front-end's table (as much of it as was listed), what backend_sim
    believes is mapped, or a tap's picture of somebody else's pair. `agrees`: whether
    the front-end's /proc/PID/maps holds what the table (or the tap's picture) says
    (`disagreements` says how not); None for a back-end, which has no mappings of its
    own to check, and for a tap that cannot tell now. `raw` is the whole answer."""

    role: str
    state: str
    pid: int
    rss: int
    fds: int
    shmem: bool
    regions: dict[int, int]
    mappings: tuple[Mapping, ...]
    agrees: bool | None
    disagreements: tuple[str, ...]
    raw: dict[str, Any] = field(repr=False, compare=False)

    def holds(self, mapping: Mapping) -> bool:
        """Whether this mapping (its range, offset into its file and access) is among
        `mappings`, whoever described it and whatever else they knew of it."""
        return _essence(mapping) in {_essence(m) for m in self.mappings}

    @classmethod
    def from_answer(cls, answer: dict[str, Any], made: float) -> Status:
        process = answer.get("process", {})
        regions_field = answer.get("regions", {})
        if isinstance(regions_field, list):  # the front-end's or a tap's: one per region
            regions = {r["shmid"]: r["size"] for r in regions_field if r["size"] is not None}
            listed = [m for r in regions_field for m in r.get("mappings", [])]
            truth = answer.get("truth")
            if truth is None:  # the front-end checks its own maps
                disagreements: tuple[str, ...] = tuple(answer.get("disagreements", []))
                agrees: bool | None = not disagreements
            else:  # the tap holds the picture to the front-end's maps
                disagreements = tuple(str(f) for f in truth.get("findings", []))
                agrees = {"agree": True, "disagree": False}.get(truth.get("verdict", ""))
        else:  # backend_sim's: shmid -> size, and what it believes is mapped
            regions = {int(k): v for k, v in regions_field.items()}
            listed = answer.get("mapped", [])
            disagreements, agrees = (), None
        return cls(
            role=answer.get("role", "?"),
            state=answer.get("state", "?"),
            pid=process.get("pid", 0),
            rss=process.get("rss", 0),
            fds=process.get("fds", 0),
            shmem=bool(answer.get("negotiated", {}).get("shmem")),
            regions=regions,
            mappings=tuple(_mapping(m, made) for m in listed),
            agrees=agrees,
            disagreements=disagreements,
            raw=answer,
        )


def _mapping(data: MappingJSON | dict[str, Any], made: float) -> Mapping:
    """A mapping's JSON form read back; `made` is when the document was made."""
    return Mapping.from_json(data, made)  # type: ignore[arg-type]


def _essence(m: Mapping) -> tuple[int, int, int, int, bool]:
    return m.shmid, m.shm_offset, m.len, m.fd_offset, m.writable


class EventStream(Iterator[DaemonEvent]):
    """A subscription's events, in the order the daemon published them. Iteration ends
    when `interrupt` is called (from any thread); DaemonUnreachable when the daemon
    goes away."""

    def __init__(self, client: ControlClient, role: str) -> None:
        self._client = client
        self._role = role
        self._interrupted = False

    def __next__(self) -> DaemonEvent:
        try:
            record = self._client.next_event(None)
        except DaemonUnreachable:
            if self._interrupted:
                raise StopIteration from None
            raise
        assert record is not None  # no timeout: it waits for one
        return DaemonEvent.from_record(record, self._role)

    def next(self, timeout: float | None) -> DaemonEvent | None:
        """The next event, or None if none came within `timeout` seconds (or the stream
        was interrupted)."""
        try:
            record = self._client.next_event(timeout)
        except DaemonUnreachable:
            if self._interrupted:
                return None
            raise
        return None if record is None else DaemonEvent.from_record(record, self._role)

    def interrupt(self) -> None:
        """End the stream: a thread iterating gets StopIteration, one in `next` None."""
        self._interrupted = True
        self._client.interrupt()


class _Daemon:
    """What every handle shares: a control socket, perhaps a process we started."""

    role: ClassVar[str]

    def __init__(
        self,
        control: str | Path,
        process: subprocess.Popen[str] | None = None,
        *,
        socket: str | Path | None = None,
        listens: bool = False,
        log: Path | None = None,
        output: Path | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        self.control = Path(control)
        #: the vhost-user socket it listens on (`listens`) or connects to, where known
        self.socket = None if socket is None else Path(socket)
        self.listens = listens
        #: its log (standard error) and its standard output, where we started it
        self.log = log
        self.output = output
        #: how long any one answer of the daemon may take (None: no limit)
        self.timeout = timeout
        #: the process this handle started (kept once stopped: how it ended is its own)
        self._process = process
        self._client: ControlClient | None = None
        #: a directory this handle made for the daemon's files, removed with it
        self._own_dir: Path | None = None

    @classmethod
    def attach(
        cls: type[D], name: str | None = None, *, control: str | Path | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> D:  # fmt: skip
        """A handle on a daemon already running: by its pair's name (in shmemctl's run
        directory) or by its control socket; DaemonUnreachable if nothing answers there.
        `timeout`: how long any one answer may take. Closing it leaves the daemon
        running."""
        if (name is None) == (control is None):
            raise ValueError("attach takes a pair's name or a control socket, one of them")
        path = control if control is not None else rundir.pair(name or "").control(cls.role)
        handle = cls(path, timeout=timeout)
        handle._connect(timeout=5.0)
        return handle

    @classmethod
    def _spawn(
        cls: type[D], command: list[str], where: list[str], socket: Path | None, listens: bool,
        control: str | Path | None, timeout: float, wait: bool, log: str | Path | None = None,
    ) -> D:  # fmt: skip
        """Start `python -m COMMAND... WHERE`, with its control socket beside `control` or
        in a directory of its own, and its log and output beside that (or at `log` and
        `log`.out); once its control socket answers (`wait`), or at once."""
        ctl, own_dir = _home(control, cls.role)
        log = ctl.with_suffix(".log") if log is None else Path(log)
        output = log.with_suffix(".out")
        argv = [sys.executable, "-m", *command, *where, "--control", str(ctl)]
        ctl.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # for the log, before it
        with log.open("a") as err, output.open("a") as out:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, text=True, close_fds=True,
            )  # fmt: skip
        handle = cls(ctl, process, socket=socket, listens=listens, log=log, output=output)
        handle._own_dir = own_dir
        if wait:
            try:
                handle._connect(timeout=timeout)
            except BaseException:
                handle.close()
                raise
        return handle

    def _connect(self, timeout: float) -> ControlClient:
        """The client, connected once: for a daemon we started, once its socket is up."""
        if self._client is not None:
            return self._client
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._client = ControlClient(str(self.control), self.timeout)
                return self._client
            except DaemonUnreachable:
                if self._process is None:
                    raise
                if self._process.poll() is not None:
                    raise DaemonUnreachable(
                        f"the {self.role} has exited ({self._process.returncode}); its log "
                        f"ends:\n{self.log_tail()}"
                    ) from None
                if time.monotonic() > deadline:
                    raise Timeout(f"the {self.role}'s control socket {self.control} did not "
                                  f"answer within {timeout:g}s") from None  # fmt: skip
                time.sleep(0.02)  # the socket file cannot be waited on before it exists

    def execute(self, command: str, /, **arguments: Any) -> Any:
        """Run a control command as it is on the wire; its `return` value, or
        ControlError with the daemon's words."""
        client = self._connect(timeout=5.0)
        try:
            return client.execute(command, **arguments)
        except DaemonUnreachable:
            # gone or going: the next call connects afresh (to a daemon started again)
            if self._client is client:
                self._client = None
            client.close()
            raise

    def status(self) -> Status:
        """What the daemon says of itself now (a front-end's: every mapping listed)."""
        return Status.from_answer(self.execute("query-status", **self._full_status), time.time())

    _full_status: ClassVar[dict[str, Any]] = {}
    #: the events after which its status may have changed (None: all but the trace)
    _changes: ClassVar[list[str] | None] = None

    @contextlib.contextmanager
    def events(self, names: Sequence[Event | str] | None = None) -> Iterator[EventStream]:
        """The daemon's events from now on (all but the message trace unless `names` says
        which), until the block ends, on a connection of their own:

            with frontend.events([Event.MAPPED]) as events:
                backend.map(0, 0, 4096)
                event = next(events)
        """
        client = ControlClient(str(self.control), self.timeout)
        try:
            client.subscribe(None if names is None else [lookup(n).value for n in names])
            yield EventStream(client, self.role)
        finally:
            client.close()

    def wait_for(
        self, predicate: Callable[[Status], object], timeout: float = DEFAULT_TIMEOUT
    ) -> Status:
        """The first status for which `predicate` holds, read again at each event the
        daemon publishes (no polling); Timeout, with the last status, if none does
        within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        # subscribed before the first look: no change between the two is missed
        with self.events(self._changes) as changes:
            while True:
                status = self.status()
                if predicate(status):
                    return status
                left = deadline - time.monotonic()
                if left <= 0 or changes.next(left) is None:
                    status = self.status()
                    if predicate(status):
                        return status
                    raise Timeout(f"the {self.role} did not reach what was waited for within "
                                  f"{timeout:g}s; it is {status.state}: {status}")  # fmt: skip

    def log_tail(self, lines: int = 20) -> str:
        """The end of the daemon's log, where we started it."""
        return "(no log)" if self.log is None else log_tail(self.log, lines, indent="")

    @property
    def pid(self) -> int:
        return self._process.pid if self._process is not None else self.status().pid

    @property
    def argv(self) -> list[str] | None:
        """The command line of a daemon this handle started."""
        return None if self._process is None else list(self._process.args)  # type: ignore[arg-type]

    @property
    def _started(self) -> subprocess.Popen[str]:
        if self._process is None:
            raise ValueError(f"this handle attached to the {self.role}; it did not start it")
        return self._process

    def returncode(self) -> int | None:
        """How a daemon this handle started ended (a negative number: the signal that
        ended it), or None while it runs."""
        return self._started.poll()

    def wait_exit(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Until a daemon this handle started exits (a connecting backend_sim ends with
        its front-end); its exit status, or Timeout."""
        try:
            return self._started.wait(timeout)
        except subprocess.TimeoutExpired:
            raise Timeout(f"the {self.role} (pid {self._started.pid}) still runs after "
                          f"{timeout:g}s") from None  # fmt: skip

    def stop(self, timeout: float = 10.0) -> None:
        """Let go of the control socket; a daemon this handle started is stopped
        (SIGTERM, then SIGKILL past `timeout`). Its files stay (see `close`)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._process is not None:
            stop_process(self._process, timeout)  # nothing to do once it has ended

    def close(self, timeout: float = 10.0) -> None:
        """`stop`, then remove the directory this handle made for the daemon's files."""
        self.stop(timeout)
        own, self._own_dir = self._own_dir, None
        if own is not None:
            shutil.rmtree(own, ignore_errors=True)

    def __enter__(self: D) -> D:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _socket_argv(
    listen: str | Path | None, connect: str | Path | None
) -> tuple[list[str], Path, bool]:
    """The options that say where a daemon meets its peer; the socket; whether it listens."""
    if (listen is None) == (connect is None):
        raise ValueError("say where the vhost-user socket is: listen=PATH or connect=PATH")
    if listen is not None:
        return ["--listen", str(listen)], Path(listen), True
    return ["--connect", str(connect)], Path(str(connect)), False


def _home(control: str | Path | None, role: str) -> tuple[Path, Path | None]:
    """Where a daemon we start has its control socket, beside which go its log and
    output: the control socket asked for, or one in a private directory made for it
    (returned second: it is removed when the daemon is)."""
    if control is not None:
        return Path(control), None
    home = Path(tempfile.mkdtemp(prefix=f"shmemctl-{role}-"))
    return home / f"{role}.ctl", home


class Frontend(_Daemon):
    """shmemctl's front-end: it maps what a back-end asks into reserved regions."""

    role = "frontend"
    _full_status: ClassVar[dict[str, Any]] = {"max_mappings": 1 << 20}

    @classmethod
    def start(
        cls,
        *,
        listen: str | Path | None = None,
        connect: str | Path | None = None,
        control: str | Path | None = None,
        shmem_bit: int = 22,
        reconnect: float | None = None,
        args: Sequence[str] = (),
        timeout: float = DEFAULT_TIMEOUT,
        wait: bool = True,
        log: str | Path | None = None,
    ) -> Frontend:
        """Start a front-end that listens for a back-end on `listen` (hand that path to
        your device) or connects to one on `connect`; returns once its control socket
        answers (not once a back-end is there: `wait_for` that), or at once if not
        `wait`. `args`: more of `shmemctl frontend`'s options; `log`: where its log goes
        (by default beside its control socket; its standard output beside the log)."""
        again = [] if reconnect is None else ["--reconnect", str(reconnect)]
        where, socket, listens = _socket_argv(listen, connect)
        command = ["shmemctl", "frontend", "--shmem-bit", str(shmem_bit), *again, *args]
        return cls._spawn(command, where, socket, listens, control, timeout, wait, log)

    def mappings(self) -> tuple[Mapping, ...]:
        """Every mapping the front-end holds now."""
        return self.status().mappings

    def get_shmem_config(self) -> ShmemConfig:
        """Send GET_SHMEM_CONFIG now: the back-end's layout."""
        answer = self.execute("get-shmem-config")
        return ShmemConfig.from_regions({int(k): v for k, v in answer["sizes"].items()})

    def reset(self) -> int:
        """Reset the device (every mapping dropped); how many mappings were dropped."""
        return int(self.execute("reset")["dropped"])

    def read(self, shmid: int, offset: int, length: int = 64) -> bytes:
        """Bytes through the front-end's own mapping."""
        return bytes.fromhex(self.execute("read", shmid=shmid, offset=offset, length=length)["hex"])


class BackendSim(_Daemon):
    """backend_sim: a device daemon that owns memfd buffers and asks the front-end to
    map and unmap them."""

    role = "backend"

    @classmethod
    def start(
        cls,
        *,
        listen: str | Path | None = None,
        connect: str | Path | None = None,
        control: str | Path | None = None,
        regions: str | None = "0=8M",
        shmem_bit: int = 22,
        args: Sequence[str] = (),
        timeout: float = DEFAULT_TIMEOUT,
        wait: bool = True,
        log: str | Path | None = None,
    ) -> BackendSim:
        """Start backend_sim listening on `listen` (point your VMM at it) or connecting
        to a front-end on `connect`, with these regions (`SHMID=SIZE,...`; None: its
        own default); returns once its control socket answers, or at once if not
        `wait`. `args`: more of its options (`--script FILE` prints each step's result
        to `output`)."""
        where, socket, listens = _socket_argv(listen, connect)
        layout = [] if regions is None else ["--regions", regions]
        command = ["backend_sim", *layout, "--shmem-bit", str(shmem_bit), *args]
        return cls._spawn(command, where, socket, listens, control, timeout, wait, log)

    def map(
        self,
        shmid: int,
        offset: int,
        length: int,
        *,
        fd_offset: int = 0,
        writable: bool = True,
        buffer: int | None = None,
    ) -> Mapping:
        """Send SHMEM_MAP (with NEED_REPLY) for a new buffer, or an existing one; the
        mapping once the front-end acked it, or MapRefused."""
        arguments: dict[str, Any] = {"shmid": shmid, "shm_offset": offset, "len": length,
                                     "fd_offset": fd_offset, "ro": not writable}  # fmt: skip
        if buffer is not None:
            arguments["buffer"] = buffer
        try:
            answer = self.execute("map", **arguments)
        except ControlError as exc:
            raise _refusal(exc) from None
        return Mapping(
            answer["shmid"], answer["shm_offset"], answer["len"], answer["fd_offset"],
            bool(answer["flags"] & MMAP_FLAG_WRITE), created=time.time(),
        )  # fmt: skip

    def unmap(self, shmid: int, offset: int, length: int) -> None:
        """Send SHMEM_UNMAP (with NEED_REPLY); MapRefused if the front-end refused it."""
        try:
            self.execute("unmap", shmid=shmid, shm_offset=offset, len=length)
        except ControlError as exc:
            raise _refusal(exc) from None

    def batch(self, maps: Sequence[Mapping]) -> int:
        """Several SHMEM_MAPs, NEED_REPLY on the last only; how many were sent."""
        items = [{"shmid": m.shmid, "shm_offset": m.shm_offset, "len": m.len,
                  "fd_offset": m.fd_offset, "ro": not m.writable} for m in maps]  # fmt: skip
        try:
            return int(self.execute("batch", maps=items)["count"])
        except ControlError as exc:
            raise _refusal(exc) from None


class Tap(_Daemon):
    """`shmemctl tap` between somebody else's front-end and back-end, started here or
    attached to by its name or control socket: its picture of the pair as a Status,
    held to the front-end's /proc; `events()` brings its VIOLATION events among the
    rest."""

    role = "tap"
    #: its picture changes with every message it relays, and it publishes no event
    #: of its own for a mapping: the trace is what says it may have changed
    _changes: ClassVar[list[str] | None] = [e.value for e in Event]

    @classmethod
    def start(
        cls,
        *,
        front: str,
        back: str,
        control: str | Path | None = None,
        shmem_bit: int = 22,
        args: Sequence[str] = (),
        timeout: float = DEFAULT_TIMEOUT,
        wait: bool = True,
        log: str | Path | None = None,
    ) -> Tap:
        """Start a tap that meets the front-end at `front` and the back-end at `back`
        (each `listen:PATH` or `connect:PATH`); returns once its control socket
        answers, or at once if not `wait`. `args`: more of `shmemctl tap`'s options."""
        from .tap import Endpoint  # ValueError for a side that is neither, before a start

        met = Endpoint.parse(front)
        Endpoint.parse(back)
        where = ["--front", front, "--back", back]
        command = ["shmemctl", "tap", "--shmem-bit", str(shmem_bit), *args]
        return cls._spawn(command, where, Path(met.path), met.mode == "listen", control,
                          timeout, wait, log)  # fmt: skip

    def violations(self) -> dict[str, int]:
        """The rules either side broke so far, each with how often."""
        return dict(self.status().raw.get("violations", {}))


class Pair:
    """A front-end and backend_sim connected to each other: started together in a run
    directory (`start`), or a running pair found by its name (`attach`)."""

    def __init__(
        self, paths: PairPaths, frontend: Frontend, backend: BackendSim,
        launched: Launched | None = None, own_dir: Path | None = None,
    ) -> None:  # fmt: skip
        self.paths = paths
        self.frontend = frontend
        self.backend = backend
        self._launched = launched
        self._own_dir = own_dir

    @property
    def name(self) -> str:
        return self.paths.dir.name

    @classmethod
    def start(
        cls,
        *,
        regions: str = "0=8M,2=64K",
        name: str | None = None,
        run_dir: str | Path | None = None,
        shmem_bit: int = 22,
        frontend_args: Sequence[str] = (),
        backend_args: Sequence[str] = (),
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Pair:
        """Start backend_sim and a front-end connected to it; returns once connected.
        The pair lives in `run_dir/name` (by default a new private directory), so
        `shmemctl status --name NAME` with SHMEMCTL_RUN_DIR=run_dir finds it."""
        from .pair import PairError, launch  # which waits on the daemons with these handles

        name = rundir.check_name(name or rundir.DEFAULT_NAME)  # before anything is made
        own = None if run_dir is not None else Path(tempfile.mkdtemp(prefix="shmemctl-pair-"))
        root = Path(run_dir) if run_dir is not None else own
        assert root is not None
        paths = PairPaths(root / name)
        paths.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        bit = ["--shmem-bit", str(shmem_bit)]
        try:
            launched = launch(
                paths, timeout=timeout,
                backend_args=["--regions", regions, *bit, *backend_args],
                frontend_args=[*bit, *frontend_args],
            )  # fmt: skip
        except PairError as exc:  # it said why, with the end of the logs
            if own is not None:
                shutil.rmtree(own, ignore_errors=True)
            raise DaemonUnreachable(str(exc)) from None
        frontend = Frontend(paths.control("frontend"), socket=paths.vhost,
                            log=paths.logfile("frontend"))  # fmt: skip
        backend = BackendSim(paths.control("backend"), socket=paths.vhost, listens=True,
                             log=paths.logfile("backend"))  # fmt: skip
        return cls(paths, frontend, backend, launched, own)

    @classmethod
    def attach(cls, name: str = rundir.DEFAULT_NAME) -> Pair:
        """A running pair by its name, in shmemctl's run directory; closing leaves it."""
        paths = rundir.pair(name)
        return cls(paths, Frontend.attach(control=paths.control("frontend")),
                   BackendSim.attach(control=paths.control("backend")))  # fmt: skip

    def stop(self) -> None:
        """Let go of both; a pair this handle started is stopped. Its files stay."""
        self.frontend.close()
        self.backend.close()
        launched, self._launched = self._launched, None
        if launched is not None:
            launched.stop()

    def close(self) -> None:
        """`stop`, then remove the run directory this handle made."""
        self.stop()
        own, self._own_dir = self._own_dir, None
        if own is not None:
            shutil.rmtree(own, ignore_errors=True)

    def __enter__(self) -> Pair:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


#: The handle of each role a control socket can have.
HANDLES: dict[str, type[Frontend | BackendSim | Tap]] = {
    "frontend": Frontend, "backend": BackendSim, "tap": Tap,
}  # fmt: skip
