"""The control protocol (QEMU's QMP): the server each daemon runs, and the client."""

from .client import ControlClient, DaemonUnreachable
from .protocol import Arg, Command, ControlError, ErrorClass, shmid_arg, u64
from .server import ControlServer, peer_allowed

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
