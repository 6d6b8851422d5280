"""The mmap engine: regions reserved PROT_NONE, fds mapped MAP_FIXED into them, validation."""

from .libc import PAGE_SIZE
from .mapping import Mapping, MappingJSON, RangeJSON
from .region import (
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
    "MappingJSON",
    "RangeJSON",
    "Refusal",
    "Region",
    "RegionTable",
    "ShmemRefused",
    "ShmemSetupError",
    "check_layout",
]
