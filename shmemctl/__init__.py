"""shmemctl: the vhost-user VIRTIO Shared Memory extension, both sides.

From a shell: the `shmemctl` command. From Python, the typed API (shmemctl/api.py):

    from shmemctl import Pair

    with Pair.start(regions="0=8M") as pair:
        mapping = pair.backend.map(0, 0, 1 << 20)
        assert pair.frontend.wait_for(lambda s: s.holds(mapping)).agrees
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .api import BackendSim as BackendSim
    from .api import ControlError as ControlError
    from .api import DaemonEvent as DaemonEvent
    from .api import DaemonUnreachable as DaemonUnreachable
    from .api import Frontend as Frontend
    from .api import Mapping as Mapping
    from .api import MapRefused as MapRefused
    from .api import Pair as Pair
    from .api import ShmemConfig as ShmemConfig
    from .api import Status as Status
    from .api import Tap as Tap
    from .api import Timeout as Timeout


#: What `import shmemctl` offers, from shmemctl.api, which is loaded on first use of one
#: of these names (and only then: `from . import rundir` asks this module for a name too).
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
    "Tap",
    "Timeout",
]


def __getattr__(name: str) -> Any:
    """shmemctl.api's names, loaded on first use: the daemons import this package too,
    and need none of it."""
    if name not in __all__:
        raise AttributeError(f"module 'shmemctl' has no attribute {name!r}")
    return getattr(importlib.import_module(".api", __name__), name)
