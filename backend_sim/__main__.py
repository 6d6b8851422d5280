"""python -m backend_sim: a vhost-user device back-end with VIRTIO Shared Memory regions."""

from __future__ import annotations

import logging
import socket
import sys
import threading
from pathlib import Path

import click

from shmemctl import options
from shmemctl.backend import MAX_CONFIG_SIZE, BackendEndpoint, DeviceModel
from shmemctl.channel import Channel, ChannelError
from shmemctl.control import ControlError, ControlServer
from shmemctl.daemon import Stopper, connect_unix, listen_unix, profiled, setup_logging
from shmemctl.events import Event
from shmemctl.faults import BACKEND, Fault
from shmemctl.shmem.libc import PAGE_SIZE
from shmemctl.sizes import human_size, parse_regions, parse_size
from shmemctl.wire import ChannelKind, WireError

from .control import BackendState, commands, scenario_start
from .device import (
    DEFAULT_MAX_BUFFER,
    ScriptError,
    ScriptRunner,
    SimDevice,
    Step,
    parse_script,
)
from .presets import DEFAULT, PRESETS
from .scenarios import SCENARIOS

log = logging.getLogger("backend")


def _regions(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> dict[int, int] | None:
    if value is None:  # the device preset's
        return None
    try:
        return parse_regions(value, PAGE_SIZE)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _size(_ctx: click.Context, _param: click.Parameter, value: str) -> int:
    try:
        size = parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if size < PAGE_SIZE:
        raise click.BadParameter(f"{value}: at least one page ({PAGE_SIZE})")
    return size


def _emit(line: str) -> None:
    print(line, flush=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--listen", "listen", metavar="PATH", help="Listen for a front-end on this socket.")
@click.option("--connect", "connect", metavar="PATH", help="Connect to a listening front-end.")
@click.option(
    "--device",
    "device_name",
    type=click.Choice(list(PRESETS)),
    default=DEFAULT,
    show_default=True,
    help="What to stand in for: the queues, config space, virtio features, regions and "
    "scenario of that device type, as QEMU 7.2's vhost-user-NAME-pci expects them "
    "(gpu, fs, media: the shapes of the SHMEM devices in the field). The options below "
    "override its values.",
)
@click.option(
    "--regions",
    default=None,
    callback=_regions,
    help="Shared memory regions as SHMID=SIZE,... (sizes 4096, 0x1000, 64K, 8M, 1G) "
    "[default: the device's; generic: 0=8M].",
)
@click.option(
    "--queues", type=click.IntRange(1, 1024), default=None,
    help="Virtqueues reported by GET_QUEUE_NUM [default: the device's].",
)  # fmt: skip
@click.option(
    "--config-size",
    type=click.IntRange(0, MAX_CONFIG_SIZE),
    default=None,
    help="Bytes of device config space (all zero) that GET_CONFIG reads; a read past them "
    "gets the protocol's error reply [default: the device's; generic: the most GET_CONFIG "
    "carries, which answers every device type that reads its config space]. 0: no config "
    "space and CONFIG not offered (QEMU 7.2 warns when a device without one, such as "
    "vhost-user-rng, is offered CONFIG).",
)
@click.option(
    "--reply-timeout",
    default=5.0,
    show_default=True,
    help="Seconds to wait for the front-end's answer to a map or unmap.",
)
@click.option(
    "--max-buffer",
    default=human_size(DEFAULT_MAX_BUFFER),
    show_default=True,
    callback=_size,
    help="The most one map's buffer (fd_offset + len, every page written) may cost; a "
    "control map past it is refused before anything is allocated.",
)
@options.shmem_bit
@options.busy_poll
@options.pair_name
@options.control_path
@click.option(
    "--scenario",
    type=click.Choice(sorted(SCENARIOS)),
    help="Start this scenario once SHMEM is usable.",
)
@click.option("--scenario-rate", default=10.0, show_default=True, help="Scenario actions/s.")
@options.faults(BACKEND)
@click.option(
    "--script",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Run these map/unmap/sleep lines once SHMEM is usable; one result line each on stdout.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log every message.")
def main(
    listen: str | None,
    connect: str | None,
    device_name: str,
    regions: dict[int, int] | None,
    shmem_bit: int,
    queues: int | None,
    config_size: int | None,
    reply_timeout: float,
    max_buffer: int,
    busy_poll: float,
    name: str,
    control: str | None,
    scenario: str | None,
    scenario_rate: float,
    faults: frozenset[Fault],
    script: Path | None,
    verbose: bool,
) -> None:
    """A back-end that behaves like a device daemon: answers the handshake, advertises
    REGIONS, owns memfd buffers and asks the front-end to map and unmap them."""
    if bool(listen) == bool(connect):
        raise click.UsageError("give exactly one of --listen PATH or --connect PATH")
    steps = []
    if script is not None:
        try:
            steps = parse_script(script.read_text().splitlines())
        except ScriptError as exc:
            raise click.UsageError(f"{script}: {exc}") from None
    setup_logging("backend_sim", verbose)
    preset = PRESETS[device_name]
    if regions is None:
        regions = parse_regions(preset.regions, PAGE_SIZE)
    config = preset.config if config_size is None else bytes(config_size)
    device = DeviceModel(regions, queues or preset.queues, config, shmem_bit, faults,
                         features=preset.features)  # fmt: skip
    if faults:
        log.warning("deliberate faults on: %s", ", ".join(sorted(f.option for f in faults)))
    stopper = Stopper()
    stopper.install_signals()
    endpoint = BackendEndpoint(device, reply_timeout=reply_timeout, busy_poll=busy_poll)
    sim = SimDevice(endpoint, max_buffer=max_buffer)
    endpoint.on_forget = sim.forget
    state = BackendState(endpoint, sim, listen or connect or "", "listen" if listen else "connect",
                         preset)  # fmt: skip
    server = ControlServer(
        options.resolve_control(control, name, "backend"), "backend", endpoint.events,
        commands(state),
    )  # fmt: skip
    log.info(
        "%s device, regions %s", preset.name,
        ", ".join(f"{s}={human_size(z)}" for s, z in regions.items()) or "none",
    )  # fmt: skip
    if scenario:
        threading.Thread(
            target=_start_scenario, args=(state, scenario, scenario_rate, stopper), daemon=True
        ).start()
    if steps:
        threading.Thread(
            target=profiled(_run_script, "backend-script"),
            args=(endpoint, sim, steps, stopper),
            daemon=True,
            name="script",
        ).start()
    try:
        server.start()
        if listen:
            _serve_listening(listen, state, stopper)
        else:
            assert connect is not None
            try:
                sock = connect_unix(connect)
            except OSError as exc:
                raise click.ClickException(
                    f"cannot connect to {connect}: {exc.strerror}; is a front-end listening "
                    f"there? (shmemctl frontend --listen {connect})"
                ) from None
            _serve_one(sock, state, stopper)
    finally:
        server.close()
        if state.scenario is not None:
            state.scenario.stop()
        sim.close()


def _serve_listening(path: str, state: BackendState, stopper: Stopper) -> None:
    try:
        listener = listen_unix(path)
    except OSError as exc:
        raise click.ClickException(str(exc.strerror or exc)) from None
    log.info("listening on %s", path)
    state.state = "listening"
    try:
        while stopper.wait_readable(listener, None):
            sock, _ = listener.accept()
            log.info("front-end connected")
            _serve_one(sock, state, stopper)
            state.state = "listening"
    finally:
        listener.close()
        Path(path).unlink(missing_ok=True)


def _serve_one(sock: socket.socket, state: BackendState, stopper: Stopper) -> None:
    endpoint = state.endpoint
    main = Channel(sock, ChannelKind.MAIN, replies=False)
    main.trace, main.trace_role = endpoint.events, "backend"
    state.state = "connected"
    endpoint.events.emit(Event.CONNECTED, {})
    reason = "front-end disconnected"
    try:
        endpoint.serve(main, stopper)
        log.info("front-end disconnected")
    except (ChannelError, WireError) as exc:
        reason = str(exc)
        log.error("dropping the front-end: %s", exc)
    except Exception as exc:  # a bug must cost the connection, never the daemon
        reason = f"internal error: {exc!r}"
        log.exception("dropping the front-end after an internal error")
    finally:
        main.close()
        state.state = "disconnected"
        endpoint.events.emit(Event.DISCONNECTED, {"reason": reason})


def _start_scenario(state: BackendState, name: str, rate: float, stopper: Stopper) -> None:
    while not stopper.stopped and not state.endpoint.wait_ready(0.5):
        pass
    if not stopper.stopped:
        try:
            scenario_start(state, name, rate)
            log.info("scenario %s started at %g actions/s", name, rate)
        except ControlError as exc:
            log.error("scenario %s: %s", name, exc.desc)


def _run_script(
    endpoint: BackendEndpoint, sim: SimDevice, steps: list[Step], stopper: Stopper
) -> None:
    while not stopper.stopped and not endpoint.wait_ready(0.5):
        pass
    if stopper.stopped:
        return
    why = endpoint.why_not_ready()
    if why is not None:
        log.warning("script: no SHMEM request will be sent: %s", why)
    ScriptRunner(sim, _emit).run(steps)
    log.info("script done (%d lines)", len(steps))


if __name__ == "__main__":
    sys.exit(main())
