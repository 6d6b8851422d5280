"""The mmap engine: regions reserved PROT_NONE, fds mapped MAP_FIXED into them, validation."""

from .libc import PAGE_SIZE
from .region import (
    Mapping,
    Refusal,
    Region,
    RegionTable,
    ShmemRefused,
    ShmemSetupError,
    check_layout,
)

__all__ = [
    "PAGE_SIZE",
    "Mapping",
    "Refusal",
    "Region",
    "RegionTable",
    "ShmemRefused",
    "ShmemSetupError",
    "check_layout",
]
