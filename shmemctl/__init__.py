"""shmemctl: the vhost-user VIRTIO Shared Memory extension, both sides.

From a shell: the `shmemctl` command. From Python, the typed API (shmemctl/api.py):

    from shmemctl import Pair

    with Pair.start(regions="0=8M") as pair:
        mapping = pair.backend.map(0, 0, 1 << 20)
        assert pair.frontend.wait_for(lambda s: s.holds(mapping)).agrees
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .api import (
        BackendSim,
        ControlError,
        DaemonEvent,
        DaemonUnreachable,
        Frontend,
        Mapping,
        MapRefused,
        Pair,
        ShmemConfig,
        Status,
        Timeout,
    )

#: What `import shmemctl` offers (shmemctl.api), loaded on first use: the daemons import
#: this package too, and need none of it.
__all__ = [
    "BackendSim",
    "ControlError",
    "DaemonEvent",
    "DaemonUnreachable",
    "Frontend",
    "MapRefused",
    "Mapping",
    "Pair",
    "ShmemConfig",
    "Status",
    "Timeout",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'shmemctl' has no attribute {name!r}")
