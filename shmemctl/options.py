"""Command-line options both daemons take, defined once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from . import rundir
from .channel import DEFAULT_BUSY_POLL
from .faults import Fault
from .sizes import parse_size
from .wire.constants import ACCEPTED_SHMEM_BITS, SHMEM_BIT


class Size(click.ParamType):
    """A size or offset as people type it: 4096, 0x1000, 64K, 8M, 1G."""

    name = "SIZE"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE = Size()

shmem_bit = click.option(
    "--shmem-bit",
    type=click.Choice([str(b) for b in ACCEPTED_SHMEM_BITS]),
    default=str(SHMEM_BIT),
    show_default=True,
    callback=lambda _ctx, _param, value: int(value),
    help="Protocol feature bit for SHMEM (21 only for rust-vmm vhost 0.16 peers).",
)

busy_poll = click.option(
    "--busy-poll-us",
    "busy_poll",
    default=int(DEFAULT_BUSY_POLL * 1e6),
    show_default=True,
    callback=lambda _ctx, _param, value: value / 1e6,
    help="Microseconds to poll for the next SHMEM message before sleeping (0: never poll).",
)


def _check_name(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    try:
        return rundir.check_name(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


pair_name = click.option(
    "--name",
    default=rundir.DEFAULT_NAME,
    show_default=True,
    callback=_check_name,
    help="The pair this daemon belongs to: its run directory is ROOT/NAME.",
)

control_path = click.option(
    "--control",
    metavar="PATH",
    help="Control socket (default: the pair's run directory, ROLE.ctl).",
)


def resolve_control(control: str | None, name: str, role: str) -> str:
    """--control, or ROLE.ctl in the pair's run directory (created 0700)."""
    if control:
        return control
    return str(rundir.pair(name).ensure().control(role))


def faults(role: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--fault NAME (repeatable): the faults of `role` (see shmemctl.faults), as Fault
    members."""
    return click.option(
        "--fault",
        "faults",
        multiple=True,
        type=click.Choice(sorted(f.option for f in Fault if f.role == role)),
        callback=lambda _ctx, _param, value: Fault.named(role, value),
        help="Break one protocol rule on purpose (to test a conformance suite); repeatable.",
    )
