"""The shmemctl command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import options


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="shmemctl")
def main() -> None:
    """Drive both sides of the vhost-user VIRTIO Shared Memory extension."""


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
@options.shmem_bit
@options.busy_poll
@options.pair_name
@options.control_path
@click.option("-v", "--verbose", is_flag=True, help="Log every map and unmap.")
def frontend(
    connect: str | None,
    listen: str | None,
    shmem_bit: int,
    reconnect: float | None,
    max_mappings: int,
    max_mappings_per_region: int,
    max_reserve: int,
    busy_poll: float,
    name: str,
    control: str | None,
    verbose: bool,
) -> None:
    """Run a front-end that maps what the back-end asks into reserved regions."""
    from .control import ControlServer
    from .daemon import setup_logging
    from .frontend import Frontend, FrontendOptions
    from .frontend.control import commands

    if bool(connect) == bool(listen):
        raise click.UsageError("give exactly one of --connect PATH or --listen PATH")
    if reconnect is not None and reconnect <= 0:
        raise click.UsageError("--reconnect takes a positive number of seconds, e.g. 1")
    setup_logging("frontend", verbose)
    fe_options = FrontendOptions(
        connect=connect,
        listen=listen,
        shmem_bit=shmem_bit,
        reconnect=reconnect,
        max_total=max_mappings,
        max_per_region=max_mappings_per_region,
        max_reserve=max_reserve,
        busy_poll=busy_poll,
    )
    fe = Frontend(fe_options)
    fe.stopper.install_signals()
    server = ControlServer(
        options.resolve_control(control, name, "frontend"), "frontend", fe.events, commands(fe)
    )
    try:
        server.start()
        fe.run()
    except OSError as exc:
        raise click.ClickException(str(exc.strerror or exc)) from None
    finally:
        server.close()


@main.command()
@click.option("--pause", default=0.4, show_default=True, help="Seconds between steps.")
def demo(pause: float) -> None:
    """Run both daemons through a scripted tour and show the kernel's view of each step."""
    from .demo import run_demo

    run_demo(pause)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--quick", is_flag=True, help="Fewer pairs per cell: a smoke run, noisy figures.")
@click.option("--codec", is_flag=True, help="Measure the wire codec alone (no processes).")
@click.option(
    "--floor",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Build and run this C floor (shmem_floor.c) too and print our ratio to it.",
)
def bench(as_json: bool, quick: bool, codec: bool, floor: Path | None) -> None:
    """Measure map+unmap round trips between the real daemons."""
    from . import bench as bench_mod

    if codec:
        bench_mod.codec_bench(as_json)
    else:
        bench_mod.pair_bench(as_json=as_json, quick=quick, floor=floor)


if __name__ == "__main__":
    sys.exit(main())
