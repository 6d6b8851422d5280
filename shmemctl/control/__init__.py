"""The control protocol (QEMU's QMP): the server each daemon runs, and the client."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .protocol import Arg, Command, ControlError, DaemonUnreachable, ErrorClass, shmid_arg, u64
from .server import ControlServer, peer_allowed

if TYPE_CHECKING:
    from .client import ControlClient as ControlClient

__all__ = [
    "Arg",
    "Command",
    "ControlClient",
    "ControlError",
    "ControlServer",
    "DaemonUnreachable",
    "ErrorClass",
    "peer_allowed",
    "shmid_arg",
    "u64",
]


def __getattr__(name: str) -> Any:
    """The client, loaded on first use: it brings asyncio and qemu.qmp, which a daemon
    serving its control socket never needs (they would cost its start-up 30 ms)."""
    if name != "ControlClient":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module(".client", __name__).ControlClient
