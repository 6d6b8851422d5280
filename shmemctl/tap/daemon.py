"""The tap as a daemon: a Tap and its control socket, run until a signal stops it."""

from __future__ import annotations

from ..control import ControlServer
from ..daemon import setup_logging
from .control import commands
from .tap import Tap, TapOptions


def serve(options: TapOptions, control_path: str, *, verbose: bool = False) -> None:
    """Run until SIGTERM/SIGINT. OSError when a socket cannot be made."""
    setup_logging("tap", verbose)
    tap = Tap(options)
    tap.install_signals()
    with ControlServer(control_path, "tap", tap.events, commands(tap)):
        tap.run()
