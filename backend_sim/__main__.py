"""python -m backend_sim: a vhost-user device back-end with VIRTIO Shared Memory regions."""

from __future__ import annotations

import logging
import socket
import sys
import threading
from pathlib import Path

import click

from shmemctl import options
from shmemctl.backend import BackendEndpoint, DeviceModel
from shmemctl.channel import Channel, ChannelError
from shmemctl.daemon import Stopper, connect_unix, listen_unix, profiled, setup_logging
from shmemctl.shmem.libc import PAGE_SIZE
from shmemctl.sizes import human_size, parse_regions
from shmemctl.wire import ChannelKind, WireError

from .device import ScriptError, ScriptRunner, SimDevice, Step, parse_script

log = logging.getLogger("backend")


def _regions(_ctx: click.Context, _param: click.Parameter, value: str) -> dict[int, int]:
    try:
        return parse_regions(value, PAGE_SIZE)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _emit(line: str) -> None:
    print(line, flush=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--listen", "listen", metavar="PATH", help="Listen for a front-end on this socket.")
@click.option("--connect", "connect", metavar="PATH", help="Connect to a listening front-end.")
@click.option(
    "--regions",
    default="0=8M",
    show_default=True,
    callback=_regions,
    help="Shared memory regions as SHMID=SIZE,... (sizes 4096, 0x1000, 64K, 8M, 1G).",
)
@click.option(
    "--queues", default=1, show_default=True, help="Virtqueues reported by GET_QUEUE_NUM."
)
@click.option(
    "--config-size", default=0, show_default=True, help="Bytes of device config space (GET_CONFIG)."
)
@click.option(
    "--reply-timeout",
    default=5.0,
    show_default=True,
    help="Seconds to wait for the front-end's answer to a map or unmap.",
)
@options.shmem_bit
@options.busy_poll
@click.option(
    "--script",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Run these map/unmap/sleep lines once SHMEM is usable; one result line each on stdout.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log every message.")
def main(
    listen: str | None,
    connect: str | None,
    regions: dict[int, int],
    shmem_bit: int,
    queues: int,
    config_size: int,
    reply_timeout: float,
    busy_poll: float,
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
    device = DeviceModel(regions, queues, bytes(config_size), shmem_bit)
    stopper = Stopper()
    stopper.install_signals()
    endpoint = BackendEndpoint(device, reply_timeout=reply_timeout, busy_poll=busy_poll)
    sim = SimDevice(endpoint)
    endpoint.on_forget = sim.forget
    log.info(
        "regions %s",
        ", ".join(f"{s}={human_size(z)}" for s, z in regions.items()) or "none",
    )
    if steps:
        threading.Thread(
            target=profiled(_run_script, "backend-script"),
            args=(endpoint, sim, steps, stopper),
            daemon=True,
            name="script",
        ).start()
    try:
        if listen:
            _serve_listening(listen, endpoint, stopper)
        else:
            assert connect is not None
            try:
                sock = connect_unix(connect)
            except OSError as exc:
                raise click.ClickException(
                    f"cannot connect to {connect}: {exc.strerror}; is a front-end listening "
                    f"there? (shmemctl frontend --listen {connect})"
                ) from None
            _serve_one(sock, endpoint, stopper)
    finally:
        sim.close()


def _serve_listening(path: str, endpoint: BackendEndpoint, stopper: Stopper) -> None:
    try:
        listener = listen_unix(path)
    except OSError as exc:
        raise click.ClickException(str(exc.strerror or exc)) from None
    log.info("listening on %s", path)
    try:
        while stopper.wait_readable(listener, None):
            sock, _ = listener.accept()
            log.info("front-end connected")
            _serve_one(sock, endpoint, stopper)
    finally:
        listener.close()
        Path(path).unlink(missing_ok=True)


def _serve_one(sock: socket.socket, endpoint: BackendEndpoint, stopper: Stopper) -> None:
    main = Channel(sock, ChannelKind.MAIN, replies=False)
    try:
        endpoint.serve(main, stopper)
        log.info("front-end disconnected")
    except (ChannelError, WireError) as exc:
        log.error("dropping the front-end: %s", exc)
    finally:
        main.close()


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
