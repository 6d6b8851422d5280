"""Byte layouts of the header and every payload of docs/protocol.md §2.

`construct` definitions are the schema: readable, and used to decode the
rarer payloads. The per-message hot path (header, u64, VhostUserMMap) uses
precompiled `struct.Struct` twins instead, since a construct parse costs
tens of microseconds against well under one for `struct`; `bench codec`
prints the figures and tests/test_wire.py proves each twin byte-identical
to its schema.
"""

from __future__ import annotations

import struct

from construct import Array, Bytes, Int8ul, Int32ul, Int64ul, Padding, Struct, this

from .constants import SHMEM_SLOTS

Header = Struct("request" / Int32ul, "flags" / Int32ul, "size" / Int32ul)
U64 = Struct("value" / Int64ul)
VringState = Struct("index" / Int32ul, "num" / Int32ul)
VringAddr = Struct(
    "index" / Int32ul,
    "flags" / Int32ul,
    "descriptor" / Int64ul,
    "used" / Int64ul,
    "available" / Int64ul,
    "log" / Int64ul,
)
# The 7 pad bytes are sent as zero and ignored on receive (Padding skips them).
VhostUserMMap = Struct(
    "shmid" / Int8ul,
    Padding(7),
    "fd_offset" / Int64ul,
    "shm_offset" / Int64ul,
    "len" / Int64ul,
    "flags" / Int64ul,
)
VhostUserShMemConfig = Struct(
    "nregions" / Int32ul,
    "padding" / Int32ul,
    "memory_sizes" / Array(SHMEM_SLOTS, Int64ul),
)
DeviceConfigHeader = Struct("offset" / Int32ul, "size" / Int32ul, "flags" / Int32ul)
DeviceConfig = Struct(
    "offset" / Int32ul, "size" / Int32ul, "flags" / Int32ul, "data" / Bytes(this.size)
)
MemoryRegion = Struct(
    "guest_phys_addr" / Int64ul,
    "memory_size" / Int64ul,
    "userspace_addr" / Int64ul,
    "mmap_offset" / Int64ul,
)
MemoryTableHeader = Struct("nregions" / Int32ul, "padding" / Int32ul)
MemoryTable = Struct(
    "nregions" / Int32ul, "padding" / Int32ul, "regions" / Array(this.nregions, MemoryRegion)
)
SingleMemoryRegion = Struct("padding" / Int64ul, "region" / MemoryRegion)

# Hot-path twins; tests assert each matches its schema above.
HEADER = struct.Struct("<III")
U64_STRUCT = struct.Struct("<Q")
MMAP_STRUCT = struct.Struct("<B7xQQQQ")
SHMEM_CONFIG_STRUCT = struct.Struct(f"<II{SHMEM_SLOTS}Q")
VRING_STATE_STRUCT = struct.Struct("<II")
VRING_ADDR_STRUCT = struct.Struct("<IIQQQQ")
MEMORY_REGION_STRUCT = struct.Struct("<QQQQ")
MEMORY_TABLE_HEADER_STRUCT = struct.Struct("<II")
DEVICE_CONFIG_HEADER_STRUCT = struct.Struct("<III")
#: header + u64: every reply on the backend channel, built in one pack.
REPLY_U64 = struct.Struct("<IIIQ")
#: header + VhostUserMMap: every SHMEM_MAP/UNMAP request, built in one pack.
REQUEST_MMAP = struct.Struct("<IIIB7xQQQQ")

TWINS = {
    "header": (Header, HEADER),
    "u64": (U64, U64_STRUCT),
    "mmap": (VhostUserMMap, MMAP_STRUCT),
    "shmem_config": (VhostUserShMemConfig, SHMEM_CONFIG_STRUCT),
    "vring_state": (VringState, VRING_STATE_STRUCT),
    "vring_addr": (VringAddr, VRING_ADDR_STRUCT),
    "memory_region": (MemoryRegion, MEMORY_REGION_STRUCT),
}
