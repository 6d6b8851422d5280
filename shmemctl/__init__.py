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

if TYPE_CHECKING:  # what `import shmemctl` offers: shmemctl.api's names (its __all__)
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


def __getattr__(name: str) -> Any:
    """shmemctl.api, loaded on first use: the daemons import this package too, and need
    none of it."""
    api = importlib.import_module(".api", __name__)
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'shmemctl' has no attribute {name!r}")
