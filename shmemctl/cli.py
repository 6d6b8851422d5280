"""The shmemctl command line."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from . import options, rundir
from .control import ControlError, DaemonUnreachable, ErrorClass
from .events import Event
from .faults import FRONTEND, Fault
from .inventory import PAIR_ROLES, SIDE, kind_of
from .session.profiles import PROFILES
from .shmem.libc import PAGE_SIZE
from .sizes import hex_range, human_size, parse_regions, parse_size
from .wire.constants import LEGACY_SHMEM_BIT, SHMEM_BIT

if TYPE_CHECKING:
    from .api import BackendSim, DaemonEvent, EventStream, Frontend, Tap


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    package_name="shmemctl",
    prog_name="shmemctl",
    message=f"%(prog)s %(version)s (vhost-user SHMEM at protocol feature bit {SHMEM_BIT}, "
    f"{LEGACY_SHMEM_BIT} with --shmem-bit {LEGACY_SHMEM_BIT})",
)
def main() -> None:
    """Drive both sides of the vhost-user VIRTIO Shared Memory extension."""


def run() -> None:
    """The console entry point: a bug still ends in one line, not a traceback
    (SHMEMCTL_DEBUG=1 shows it)."""
    try:
        main(standalone_mode=True)
    except Exception as exc:
        if os.environ.get("SHMEMCTL_DEBUG"):
            raise
        click.echo(
            f"shmemctl: internal error: {exc!r}; please report it "
            "(SHMEMCTL_DEBUG=1 shows the traceback)",
            err=True,
        )
        sys.exit(1)


@main.command()
@click.option("--connect", metavar="PATH", help="Connect to a back-end listening here.")
@click.option("--listen", metavar="PATH", help="Listen here for a back-end to connect.")
@click.option(
    "--reconnect",
    type=float,
    metavar="SECONDS",
    help="Reconnect this often after the back-end goes away (default: stay disconnected).",
)
@click.option("--max-mappings", default=262_144, show_default=True, help="Mappings in all regions.")
@click.option(
    "--max-mappings-per-region", default=131_072, show_default=True, help="Mappings per region."
)
@click.option(
    "--max-reserve",
    type=options.SIZE,
    default="1T",
    show_default=True,
    help="Address space all regions together may reserve.",
)
@click.option(
    "--profile",
    "profile_name",
    type=click.Choice(list(PROFILES)),
    default="strict",
    show_default=True,
    help="Behave on the wire as this front-end does (docs/protocol.md §8): qemu replies 0 "
    "or 1, announces each mapping as guest memory and starts the device as a guest "
    "would; crosvm serves one shmid and keeps mappings across a reset; "
    "cloud-hypervisor opens a fresh backend channel at each activation.",
)
@options.shmem_bit
@options.busy_poll
@options.pair_name
@options.control_path
@options.faults(FRONTEND)
@click.option("-v", "--verbose", is_flag=True, help="Log every map and unmap.")
def frontend(
    connect: str | None,
    listen: str | None,
    shmem_bit: int,
    reconnect: float | None,
    max_mappings: int,
    max_mappings_per_region: int,
    max_reserve: int,
    profile_name: str,
    busy_poll: float,
    name: str,
    control: str | None,
    faults: frozenset[Fault],
    verbose: bool,
) -> None:
    """Run a front-end that maps what the back-end asks into reserved regions."""
    from .frontend import FrontendOptions
    from .frontend.daemon import serve

    if bool(connect) == bool(listen):
        raise click.UsageError("give exactly one of --connect PATH or --listen PATH")
    if reconnect is not None and reconnect <= 0:
        raise click.UsageError("--reconnect takes a positive number of seconds, e.g. 1")
    fe_options = FrontendOptions(
        connect=connect,
        listen=listen,
        shmem_bit=shmem_bit,
        reconnect=reconnect,
        max_total=max_mappings,
        max_per_region=max_mappings_per_region,
        max_reserve=max_reserve,
        busy_poll=busy_poll,
        faults=faults,
        profile=PROFILES[profile_name],
    )
    try:
        serve(fe_options, options.resolve_control(control, name, "frontend"), verbose=verbose)
    except OSError as exc:
        raise click.ClickException(str(exc.strerror or exc)) from None


@main.command()
@click.option("--pause", default=0.4, show_default=True, help="Seconds between tour steps.")
@click.option("--tour", is_flag=True, help="The scripted tour even on a terminal.")
@click.option(
    "--scenario",
    "scenario_name",
    default="blobs",
    show_default=True,
    type=click.Choice(["blobs", "dax"]),
    help="What the device does in the console.",
)
@options.pair_name
def demo(pause: float, tour: bool, scenario_name: str, name: str) -> None:
    """On a terminal: start a pair with a scenario and open the console on it (the pair
    stops when the console quits). Otherwise: a scripted tour with /proc's view of each step."""
    if tour or not (sys.stdin.isatty() and sys.stdout.isatty()):
        from .demo import run_demo

        run_demo(pause)
        return
    from tui.app import run_console

    from .pair import PairError, stop
    from .pair import up as start_pair

    paths = rundir.pair(name)
    try:
        start_pair(paths, "0=64M,2=8M", scenario=scenario_name)
    except PairError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        run_console(str(paths.control("frontend")), str(paths.control("backend")),
                    read_only=False, refresh=1.0)  # fmt: skip
    finally:
        stop(paths)
        click.echo(f"pair {name} stopped")


@main.command()
@options.pair_name
@click.option("--frontend", "frontend_ctl", metavar="CTL", help="Front-end control socket.")
@click.option("--backend", "backend_ctl", metavar="CTL", help="Back-end control socket.")
@click.option("--read-only", is_flag=True, help="Hide every action that changes anything.")
@click.option("--refresh", default=1.0, show_default=True, help="Seconds between process polls.")
def tui(
    name: str, frontend_ctl: str | None, backend_ctl: str | None, read_only: bool, refresh: float
) -> None:
    """The live console: regions and mappings as a map, events, trace, actions. On a
    tap's name, the pair the tap watches, read-only. Without --name on a host with
    several pairs and taps: a list of them first (enter opens one, escape comes back)."""
    from tui.app import console_for, run_console, run_host

    from .inventory import names

    if frontend_ctl or backend_ctl:
        run_console(frontend_ctl, backend_ctl, read_only=read_only, refresh=refresh)
        return
    named = click.get_current_context().get_parameter_source("name")
    if named is click.core.ParameterSource.DEFAULT:
        running = [n for n in names() if kind_of(rundir.pair(n)) is not None]
        if len(running) > 1:
            run_host(read_only=read_only, refresh=refresh)
            return
        name = running[0] if running else name
    console_for(name, read_only=read_only, refresh=refresh).run()


def _counts(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    """N,N,...: counts of mappings, each at least 0 and at most 1,048,576."""
    if value is None:
        return None
    try:
        counts = tuple(sorted({int(part) for part in value.split(",")}))
    except ValueError:
        raise click.BadParameter(f"{value!r}: write counts like 0,65536,262144") from None
    if counts[0] < 0 or counts[-1] > 1 << 20:
        raise click.BadParameter(f"{value!r}: each count is from 0 to 1048576")
    return counts


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--quick", is_flag=True, help="Fewer pairs per cell: a smoke run, noisy figures.")
@click.option("--codec", is_flag=True, help="Measure the wire codec alone (no processes).")
@click.option(
    "--floor",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Build and run this C floor too and print our ratio to it: shmem_floor.c in "
    "place of the pair; with --tap, bench/relay_floor.c in place of the tap.",
)
@click.option("--tap", is_flag=True,
              help="Each cell directly and through `shmemctl tap`, several times: both "
              "figures, their ratio, the tap's fds and RSS.")  # fmt: skip
@click.option("--repeats", type=click.IntRange(min=1), metavar="N",
              help="With --tap: runs of each side (default 3 with --quick, else 5).")  # fmt: skip
@click.option("--existing", metavar="N,N,...", callback=_counts,
              help="Mappings already in place around the churn, one set of cells each "
              "[default: 0,1000,65536; 262144 shows the index at its largest].")  # fmt: skip
def bench(
    as_json: bool, quick: bool, codec: bool, floor: Path | None, tap: bool, repeats: int | None,
    existing: tuple[int, ...] | None,
) -> None:  # fmt: skip
    """Measure map+unmap round trips between the real daemons."""
    from . import bench as bench_mod

    if repeats is not None and not tap:
        raise click.UsageError("--repeats is for --tap")
    if existing is not None and (tap or codec):
        raise click.UsageError("--existing is for the pair bench (not with --tap or --codec)")
    if tap and codec:
        raise click.UsageError("--tap is a run of its own: not with --codec")
    if codec:
        bench_mod.codec_bench(as_json)
    elif tap:
        bench_mod.tap_bench(as_json=as_json, quick=quick, repeats=repeats, floor=floor)
    else:
        bench_mod.pair_bench(as_json=as_json, quick=quick, floor=floor,
                             existing=existing or bench_mod.EXISTING)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())


# ---------------------------------------------------------------- the pair's clients

EXIT_REFUSED = 1
EXIT_NO_DAEMON = 3


class NoDaemon(click.ClickException):
    """Nothing answers on a control socket: a distinct exit status for scripts."""

    exit_code = EXIT_NO_DAEMON


class Target:
    """Which daemons a command talks to: a pair by name, a tap by name, or explicit
    control sockets."""

    def __init__(self, name: str, frontend: str | None, backend: str | None, as_json: bool):
        self.name = name
        self.explicit = frontend is not None or backend is not None
        paths = rundir.pair(name)
        #: the tap's control socket when the name is a tap's: status, watch and trace
        #: then ask it instead of a pair's daemons
        self.tap = None if self.explicit or kind_of(paths) != "tap" else str(paths.control("tap"))
        self.sockets = {
            "frontend": frontend if self.explicit else str(paths.control("frontend")),
            "backend": backend if self.explicit else str(paths.control("backend")),
            "tap": self.tap,
        }
        self.as_json = as_json

    def daemon(self, role: str, what: str) -> Frontend | BackendSim | Tap:
        """A handle on the daemon of this role, attached by its control socket."""
        handle = self.handle(role, what)
        with self.reaching():
            return type(handle).attach(control=handle.control)

    def handle(self, role: str, what: str) -> Frontend | BackendSim | Tap:
        """A handle on the daemon of this role, not connected yet; UsageError when this
        target has no daemon of that role to do `what`."""
        from .api import HANDLES

        path = self.sockets[role]
        if self.tap is not None and role != "tap":
            # not "is the pair up?": nothing on a tap's name maps, resets or reads
            raise click.ClickException(
                f"{self.name} is a tap: it only watches its pair (status, watch, trace); "
                f"{what} is for a pair's {SIDE[role]}"
            )
        if path is None:
            other = "back-end" if role == "frontend" else "front-end"
            raise click.UsageError(
                f"{what} is the {SIDE[role]}'s to do, and no --{role} socket "
                f"was given (only the {other}'s)"
            )
        return HANDLES[role](path)

    @contextlib.contextmanager
    def reaching(self) -> Iterator[None]:
        """Nothing answering becomes NoDaemon, with what would bring it up."""
        try:
            yield
        except DaemonUnreachable as exc:
            if self.explicit:
                hint = ""
            elif self.tap is not None:
                hint = (f"; is the tap running? (shmemctl tap --front ... --back ... "
                        f"--name {self.name})")  # fmt: skip
            else:
                hint = f"; is the pair up? (shmemctl up --name {self.name})"
            raise NoDaemon(f"{exc}{hint}") from None

    def call(self, role: str, what: str, command: str, /, **arguments: Any) -> Any:
        with self.daemon(role, what) as daemon:
            try:
                return daemon.execute(command, **arguments)
            except ControlError as exc:
                if exc.error_class != ErrorClass.NOT_FOUND:
                    raise
                raise click.ClickException(
                    f"the daemon on {daemon.control} has no {command!r} command: {what} "
                    f"needs a {role} (a front-end attached to a real back-end has no map or "
                    "unmap; a back-end attached to QEMU has no reset)"
                ) from None

    def out(self, value: Any, text: str) -> None:
        click.echo(json.dumps(value) if self.as_json else text)


def target_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--name / --frontend / --backend / --json, turned into one `target` argument,
    and every error turned into a one-line answer and an exit status."""

    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
    @click.option("--backend", "backend_ctl", metavar="CTL", help="The back-end's control socket.")
    @click.option(
        "--frontend", "frontend_ctl", metavar="CTL", help="The front-end's control socket."
    )
    @options.pair_name
    @functools.wraps(func)
    def wrapper(
        name: str, frontend_ctl: str | None, backend_ctl: str | None, as_json: bool, **kw: Any
    ) -> Any:
        target = Target(name, frontend_ctl, backend_ctl, as_json)
        try:
            return func(target, **kw)
        except ControlError as exc:
            if as_json:
                click.echo(json.dumps({"error": {"class": exc.error_class, "desc": exc.desc}}))
                sys.exit(EXIT_REFUSED)
            raise click.ClickException(exc.desc) from None
        except KeyboardInterrupt:
            sys.exit(130)

    return wrapper


def _map_text(r: dict[str, Any], verb: str) -> str:
    kind = "" if verb == "unmapped" else (" rw" if r.get("flags", 1) & 1 else " ro")
    return f"{verb} {hex_range(r['shm_offset'], r['len'])} in region {r['shmid']}{kind}"


@main.command("map")
@click.argument("shmid", type=int)
@click.argument("offset", type=options.SIZE)
@click.argument("length", metavar="LEN", type=options.SIZE)
@click.option("--fd-offset", type=options.SIZE, default=0, help="Offset into the buffer.")
@click.option("--ro", is_flag=True, help="Map read-only.")
@click.option("--buffer", type=int, help="Map this existing buffer instead of a new one.")
@target_options
def map_command(
    target: Target, shmid: int, offset: int, length: int, fd_offset: int, ro: bool,
    buffer: int | None,
) -> None:  # fmt: skip
    """Have the back-end ask for a mapping; exit 0 once the front-end acked it."""
    args: dict[str, Any] = {"shmid": shmid, "shm_offset": offset, "len": length}
    if fd_offset:
        args["fd_offset"] = fd_offset
    if ro:
        args["ro"] = True
    if buffer is not None:
        args["buffer"] = buffer
    r = target.call("backend", "map", "map", **args)
    target.out(r, _map_text(r, "mapped"))


@main.command()
@click.argument("shmid", type=int)
@click.argument("offset", type=options.SIZE)
@click.argument("length", metavar="LEN", type=options.SIZE)
@target_options
def unmap(target: Target, shmid: int, offset: int, length: int) -> None:
    """Have the back-end ask for an unmap; exit 0 once the front-end acked it."""
    r = target.call("backend", "unmap", "unmap", shmid=shmid, shm_offset=offset, len=length)
    target.out(r, _map_text(r, "unmapped"))


def _batch_item(text: str) -> dict[str, Any]:
    parts = text.split(":")
    try:
        if not 3 <= len(parts) <= 5:
            raise ValueError("needs SHMID:OFFSET:LEN")
        item: dict[str, Any] = {
            "shmid": int(parts[0], 0),
            "shm_offset": parse_size(parts[1]),
            "len": parse_size(parts[2]),
        }
        for extra in parts[3:]:
            if extra == "ro":
                item["ro"] = True
            elif extra.startswith("fd_offset="):
                item["fd_offset"] = parse_size(extra.removeprefix("fd_offset="))
            else:
                raise ValueError(f"unknown part {extra!r}")
    except ValueError as exc:
        raise click.BadParameter(
            f"{text!r}: {exc}; write SHMID:OFFSET:LEN[:ro][:fd_offset=N], e.g. 0:64K:4K:ro"
        ) from None
    return item


@main.command()
@click.argument("maps", nargs=-1, required=True, metavar="SHMID:OFFSET:LEN[:ro]...")
@target_options
def batch(target: Target, maps: tuple[str, ...]) -> None:
    """Several maps, NEED_REPLY on the last only: one ack confirms all."""
    items = [_batch_item(m) for m in maps]
    r = target.call("backend", "batch", "batch", maps=items)
    target.out(r, f"mapped {r['count']} ranges, one ack")


@main.command()
@target_options
def config(target: Target) -> None:
    """Have the front-end send GET_SHMEM_CONFIG now; print shmid -> size."""
    r = target.call("frontend", "config", "get-shmem-config")
    lines = [f"nregions {r['nregions']}", f"{'shmid':>5}  {'size':>10}  reserved at"]
    for shmid, size in r["sizes"].items():
        base = r["reserved"].get(shmid, {}).get("base")
        where = f"{base:#x}" if base is not None else "not reserved"
        lines.append(f"{shmid:>5}  {human_size(size):>10}  {where}")
    target.out(r, "\n".join(lines))


@main.command()
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@target_options
def reset(target: Target, yes: bool) -> None:
    """Have the front-end reset the device: every mapping is dropped."""
    if not yes and sys.stdin.isatty():
        status = target.call("frontend", "reset", "query-status", max_mappings=0)
        count = sum(r["count"] for r in status["regions"])
        click.confirm(f"Reset the device and drop its {count} mappings?", abort=True)
    r = target.call("frontend", "reset", "reset")
    target.out(r, f"reset with {r['via']}: dropped {r['dropped']} mappings")


@main.command()
@click.argument("shmid", type=int)
@click.argument("offset", type=options.SIZE)
@click.argument("length", metavar="[LEN]", type=options.SIZE, default="64")
@target_options
def read(target: Target, shmid: int, offset: int, length: int) -> None:
    """Read bytes through the front-end's own mapping."""
    r = target.call("frontend", "read", "read", shmid=shmid, offset=offset, length=length)
    data = bytes.fromhex(r["hex"])
    lines = []
    for i in range(0, len(data), 16):
        chunk = data[i : i + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{offset + i:#010x}  {chunk.hex(' '):<47}  {text}")
    target.out(r, "\n".join(lines))


@main.command()
@click.option("--max-mappings", default=20, show_default=True, help="Mappings listed per region.")
@target_options
def status(target: Target, max_mappings: int) -> None:
    """Both sides: connection, features, regions, mappings, pids, memory; flags disagreements.
    On a tap's name: what the tap saw, its violations and its /proc verdict."""
    from .render import render_status, render_tap_status

    if target.tap is not None:
        # the tap's answer is whole already (it lists every mapping): --max-mappings is
        # the front-end's
        view = target.call("tap", "status", "query-status")
        target.out(view, render_tap_status(view))
        if view.get("truth", {}).get("verdict") == "disagree":
            sys.exit(EXIT_REFUSED)
        return
    views: dict[str, Any] = {}
    for role in ("frontend", "backend"):
        if target.sockets[role] is None:
            continue
        try:
            args = {"max_mappings": max_mappings} if role == "frontend" else {}
            views[role] = target.call(role, "status", "query-status", **args)
        except NoDaemon as exc:
            views[role] = {"error": exc.message}
    if all("error" in v for v in views.values()):
        if target.explicit:
            raise NoDaemon("; ".join(v["error"] for v in views.values()))
        raise NoDaemon(
            f"pair {target.name} is not up: no daemon answers in "
            f"{rundir.pair(target.name).dir}; start it with: shmemctl up --name {target.name}"
        )
    target.out(views, render_status(views))
    fe = views.get("frontend", {})
    if fe.get("disagreements"):
        sys.exit(EXIT_REFUSED)


def _stream(target: Target, events: list[Event] | None, count: int | None) -> None:
    """Print events from every daemon of the target as they come, one line each."""
    from .render import render_event

    roles = ("tap",) if target.tap is not None else PAIR_ROLES
    streams = []
    with contextlib.ExitStack() as opened:
        for role in roles:
            if target.sockets[role] is None:
                continue
            daemon = target.handle(role, "watch")
            try:
                with target.reaching():
                    streams.append(opened.enter_context(daemon.events(events)))
            except NoDaemon:
                if target.tap is not None:  # one daemon: its absence is the whole answer
                    raise
        if not streams:
            raise NoDaemon("no daemon of the pair answers; is it up? (shmemctl up)")
        lines: queue.Queue[DaemonEvent | None] = queue.Queue()

        def pump(stream: EventStream) -> None:
            try:
                for event in stream:
                    lines.put(event)
            except DaemonUnreachable:
                pass
            lines.put(None)

        for stream in streams:
            threading.Thread(target=pump, args=(stream,), daemon=True).start()
        seen = 0
        gone = 0
        while count is None or seen < count:
            event = lines.get()
            if event is None:
                gone += 1
                if gone == len(streams):
                    raise NoDaemon("the daemons went away")
                continue
            record = {**event.record, "source": event.role}
            if target.as_json:
                click.echo(json.dumps(record))
            elif event.name == Event.VIOLATION:
                # bold red on a terminal, plain text in a pipe (click drops the colour there)
                click.secho(render_event(record), fg="red", bold=True)
            else:
                click.echo(render_event(record))
            seen += 1
        for stream in streams:
            stream.interrupt()


@main.command()
@click.option("--count", type=int, help="Stop after this many events.")
@target_options
def watch(target: Target, count: int | None) -> None:
    """Live events of both daemons, or of the tap on a tap's name, one line each (JSON
    lines with --json). A tap's violations stand out."""
    _stream(target, None, count)


@main.command()
@click.option("--count", type=int, help="Stop after this many messages.")
@click.option("--replay", metavar="FILE", type=click.Path(exists=True, dir_okay=False),
              help="Print a tap's recording (tap --record) instead of live messages.")  # fmt: skip
@target_options
def trace(target: Target, count: int | None, replay: str | None) -> None:
    """Live decoded protocol messages of both channels, as each daemon sees them (on a
    tap's name: as the tap forwards them, fe->be or be->fe); or a recording's, decoded
    again from its bytes (--replay)."""
    if replay is None:
        if target.tap is None and target.sockets["frontend"] is not None and not target.as_json:
            with contextlib.suppress(NoDaemon, ControlError):  # the stream says what is down
                profile = target.call("frontend", "trace", "query-status",
                                      max_mappings=0).get("profile", "strict")  # fmt: skip
                if profile != "strict":
                    click.echo(f"# the front-end behaves as {profile} (frontend --profile)")
        _stream(target, [Event.MESSAGE], count)
        return
    from .render import render_event
    from .tap.recording import RecordingError, replay_events

    try:
        for n, event in enumerate(replay_events(replay)):
            if count is not None and n >= count:
                break
            click.echo(json.dumps(event) if target.as_json else render_event(event))
    except (RecordingError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


@main.command("ls")
@click.option("--json", "as_json", is_flag=True, help="One JSON list instead of a table.")
def ls_command(as_json: bool) -> None:
    """Every pair and tap on this host (the run directory root), sorted by name: kind,
    peers' pids, state, mappings, bytes mapped, violations, the /proc verdict."""
    from .inventory import inventory, table

    rows = inventory()
    if as_json:
        click.echo(json.dumps(rows))
    elif rows:
        click.echo(table(rows))
    else:
        click.echo(f"no pair or tap in {rundir.root()}", err=True)


@main.group()
def scenario() -> None:
    """Start or stop a scenario in backend_sim (blobs, dax)."""


@scenario.command("start")
@click.argument("scenario_name", metavar="[NAME]", required=False,
                type=click.Choice(["blobs", "dax"]))  # fmt: skip
@click.option("--rate", type=float, default=10.0, show_default=True, help="Actions per second.")
@click.option("--shmid", type=int, help="Region to use (default: the first).")
@click.option("--seed", type=int, help="Random seed, for a run that can be repeated.")
@target_options
def scenario_start(
    target: Target, scenario_name: str | None, rate: float, shmid: int | None, seed: int | None
) -> None:
    """Start a scenario: NAME, or the one that fits backend_sim's --device (dax for fs,
    blobs for the others)."""
    args: dict[str, Any] = {"rate": rate}
    if scenario_name is not None:
        args["name"] = scenario_name
    if shmid is not None:
        args["shmid"] = shmid
    if seed is not None:
        args["seed"] = seed
    r = target.call("backend", "scenario start", "scenario-start", **args)
    target.out(r, f"scenario {r['name']} running on region {r['shmid']} at {r['rate']:g}/s")


@scenario.command("stop")
@target_options
def scenario_stop(target: Target) -> None:
    """Stop the running scenario (its mappings stay)."""
    r = target.call("backend", "scenario stop", "scenario-stop")
    target.out(r, f"scenario {r['name']} stopped after {r['maps']} maps, {r['unmaps']} unmaps")


@main.command()
@options.pair_name
@click.option("--regions", default="0=8M,2=64K", show_default=True, help="SHMID=SIZE,...")
@click.option("--scenario", "scenario_name", type=click.Choice(["blobs", "dax"]))
@options.shmem_bit
@click.option("--timeout", default=20.0, show_default=True, help="Seconds to wait for it.")
def up(name: str, regions: str, scenario_name: str | None, shmem_bit: int, timeout: float) -> None:
    """Start backend_sim and a front-end in the background; return once connected."""
    from .pair import PairError
    from .pair import up as start_pair

    try:
        parse_regions(regions, PAGE_SIZE)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--regions") from None
    paths = rundir.pair(name)
    try:
        pids = start_pair(
            paths, regions, scenario=scenario_name, shmem_bit=shmem_bit, timeout=timeout
        )
    except PairError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"pair {name} is up: front-end pid {pids['frontend']}, backend_sim pid "
        f"{pids['backend']}; sockets and logs in {paths.dir}"
    )


@main.command()
@options.pair_name
def down(name: str) -> None:
    """Stop the pair's daemons and remove their sockets."""
    from .pair import stop

    paths = rundir.pair(name)
    stopped = stop(paths)
    if stopped:
        click.echo(f"pair {name} is down (stopped " + ", ".join(
            f"{d.role} {d.pid}" for d in stopped) + ")")  # fmt: skip
    else:
        click.echo(f"pair {name} was not up")


@main.command()
@click.option(
    "--frontend",
    "frontend_sock",
    metavar="SOCKET",
    help="Test the front-end on this vhost-user socket (shmemctl plays the back-end).",
)
@click.option(
    "--backend",
    "backend_sock",
    metavar="SOCKET",
    help="Test the back-end on this vhost-user socket (shmemctl plays the front-end).",
)
@click.option("--listen", "mode", flag_value="listen", help="Listen on SOCKET for the peer.")
@click.option("--connect", "mode", flag_value="connect", help="Connect to SOCKET.")
@click.option(
    "--wait",
    default=3.0,
    show_default=True,
    help="Seconds a back-end gets to send its first SHMEM request (the suite goes on once "
    "one is mapped), and to send none it should not: after a reset, and without SHMEM.",
)
@click.option(
    "--timeout",
    default=30.0,
    show_default=True,
    help="Seconds to wait for the peer to connect, and at most for any answer.",
)
@click.option(
    "--regions",
    metavar="SHMID=SIZE,...",
    help="The regions offered to a front-end [default: 0=8M,2=64K]; the map checks need "
    "one of 96 pages or more. Some front-ends constrain layouts: QEMU packs all regions "
    "into one BAR whose size must be a power of two, so the default (8M + 64K) aborts its "
    "realize where 0=4M,2=4M (8M) fits.",
)
@click.option(
    "--no-offer-bit-21",
    is_flag=True,
    help="Do not offer bit 21 to a front-end (one that really uses GPA_ADDRESSES).",
)
@click.option(
    "--require-shmem", is_flag=True, help="Fail, not skip, when the peer does not do SHMEM."
)
@click.option("--recording", metavar="FILE", type=click.Path(exists=True, dir_okay=False),
              help="Check the rules over a tap's recording (tap --record) instead of a live "
              "peer: the same rules a tap judges live.")  # fmt: skip
@click.option("--reply-deadline", default=5.0, show_default=True, type=click.FloatRange(min=0),
              help="With --recording: seconds a request owed a reply may have waited for it "
              "(answered-in-time); 0: not judged.")  # fmt: skip
@click.option("--profile", "profile_name", type=click.Choice(list(PROFILES)), default="strict",
              show_default=True,
              help="With --backend: play this front-end (docs/protocol.md §8), with the checks "
              "its behaviour calls for: qemu answers 1 and announces each mapping on the main "
              "channel (a back-end that stops serving it while a map waits deadlocks); "
              "cloud-hypervisor opens a fresh backend channel at each activation.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for CI.")
def conformance(
    frontend_sock: str | None, backend_sock: str | None, mode: str | None, wait: float,
    timeout: float, regions: str | None, no_offer_bit_21: bool, require_shmem: bool,
    recording: str | None, reply_deadline: float, profile_name: str, as_json: bool,
) -> None:  # fmt: skip
    """Check another implementation against the protocol (docs/protocol.md); exit 1 if a check fails
    or could not run (a peer that hangs up mid-suite fails it).

    A front-end is usually tested by listening for it (the default with --frontend); a
    back-end by connecting to it (the default with --backend)."""
    from .conformance import check_backend, check_frontend, parse_layout

    if (frontend_sock is not None) + (backend_sock is not None) + (recording is not None) != 1:
        raise click.UsageError(
            "give exactly one of --frontend SOCKET, --backend SOCKET or --recording FILE"
        )
    if profile_name != "strict" and backend_sock is None:
        raise click.UsageError("--profile is for --backend: the suite then plays that front-end")
    if recording is not None:
        from .conformance.recording import check_recording
        from .tap.recording import RecordingError

        try:
            report = check_recording(recording, reply_deadline=reply_deadline or None)
        except (RecordingError, OSError) as exc:
            raise click.ClickException(str(exc)) from None
    elif frontend_sock:
        try:
            layout = parse_layout(regions)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--regions") from None
        report = check_frontend(
            frontend_sock, listen=mode != "connect", timeout=timeout,
            offer_bit_21=not no_offer_bit_21, require_shmem=require_shmem, regions=layout,
        )  # fmt: skip
    else:
        assert backend_sock is not None
        if regions is not None:
            raise click.UsageError("--regions is for --frontend: a back-end has its own layout")
        report = check_backend(backend_sock, listen=mode == "listen", wait=wait,
                               timeout=timeout, require_shmem=require_shmem,
                               profile=PROFILES[profile_name])  # fmt: skip
    click.echo(report.to_json() if as_json else report.to_text())
    if not report.ok:
        sys.exit(EXIT_REFUSED)


def _tap_endpoint(_ctx: click.Context, _param: click.Parameter, value: str) -> Any:
    from .tap import Endpoint

    try:
        return Endpoint.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command()
@click.option("--front", required=True, metavar="listen:PATH|connect:PATH",
              callback=_tap_endpoint, help="Where the front-end (the VMM) is met.")  # fmt: skip
@click.option("--back", required=True, metavar="listen:PATH|connect:PATH",
              callback=_tap_endpoint, help="Where the back-end (the device) is met.")  # fmt: skip
@click.option("--retry", default=0.5, show_default=True, type=click.FloatRange(min=0.01),
              help="Seconds between connects to a side that is not there yet.")  # fmt: skip
@click.option("--reply-deadline", default=5.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds a request owed a reply may wait for it before that is reported "
              "as a broken rule (answered-in-time); 0: never.")  # fmt: skip
@click.option("--record", metavar="FILE", type=click.Path(dir_okay=False, writable=True),
              help="Append every message of both channels to FILE, one JSON line each (the "
              "exact bytes, what each fd was, the decoded form): `shmemctl trace --replay "
              "FILE` prints it, `shmemctl conformance --recording FILE` checks it.")  # fmt: skip
@options.shmem_bit
@options.pair_name
@options.control_path
@click.option("-v", "--verbose", is_flag=True, help="Log more.")
def tap(
    front: Any, back: Any, retry: float, reply_deadline: float, record: str | None,
    shmem_bit: int, name: str, control: str | None, verbose: bool,
) -> None:  # fmt: skip
    """Sit between a front-end and a back-end it did not start: relay both channels
    exactly, and report what passes (features, layout, mappings, broken rules) on its
    control socket (tap.ctl in the pair's run directory)."""
    from .tap import TapOptions
    from .tap.daemon import serve

    tap_options = TapOptions(front=front, back=back, shmem_bit=shmem_bit, retry=retry,
                             reply_deadline=reply_deadline or None, record=record)  # fmt: skip
    try:
        serve(tap_options, options.resolve_control(control, name, "tap"), verbose=verbose)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise click.ClickException(f"{exc.strerror or exc}{where}") from None


def _listen_address(_ctx: click.Context, _param: click.Parameter, value: str) -> Any:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{value!r}: write HOST:PORT, e.g. 127.0.0.1:9464 or :9464")
    return host or "0.0.0.0", int(port)


@main.command()
@click.option("--listen", "address", default="127.0.0.1:9464", show_default=True,
              metavar="HOST:PORT", callback=_listen_address,
              help="Where to serve /metrics for Prometheus to scrape.")  # fmt: skip
@click.option("--once", is_flag=True, help="Print one scrape's exposition and exit.")
def metrics(address: tuple[str, int], once: bool) -> None:
    """Every pair and tap in the run directory, in Prometheus' exposition format: state,
    regions (size, mappings, bytes mapped), the front-end's counters, the tap's broken
    rules, the /proc verdict, each process's RSS and fds. Each scrape asks the control
    sockets afresh."""
    from prometheus_client import generate_latest, start_http_server

    from .daemon import Stopper
    from .metrics import registry

    if once:
        click.echo(generate_latest(registry()).decode(), nl=False)
        return
    host, port = address
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry())
    except OSError as exc:
        why = exc.strerror or exc
        raise click.ClickException(f"cannot listen on {host}:{port}: {why}") from None
    click.echo(f"serving http://{host}:{port}/metrics for {rundir.root()}", err=True)
    stopper = Stopper()
    stopper.install_signals()
    stopper.wait()
    server.shutdown()


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script: eval "$(shmemctl completion bash)"."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None
    click.echo(cls(main, {}, "shmemctl", "_SHMEMCTL_COMPLETE").source())
