"""The front-end daemon: a Frontend and its control socket, run until a signal stops it.
`shmemctl frontend` parses the options and calls `serve`; the back-end's counterpart is
`python -m backend_sim`."""

from __future__ import annotations

from ..control import ControlServer
from ..daemon import setup_logging
from .control import commands
from .endpoint import Frontend, FrontendOptions


def serve(options: FrontendOptions, control_path: str, *, verbose: bool = False) -> None:
    """Run until SIGTERM/SIGINT. Raises OSError when the control socket cannot be made
    or the very first connect fails without --reconnect."""
    setup_logging("frontend", verbose)
    fe = Frontend(options)
    fe.stopper.install_signals()
    with ControlServer(control_path, "frontend", fe.events, commands(fe)):
        fe.run()
