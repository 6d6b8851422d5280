"""Byte layouts of the header and every payload of docs/protocol.md §2.

Each layout is declared once, in `construct`. The codec packs and unpacks
with `struct.Struct` twins derived from those declarations (`fixed`), since a
construct parse costs tens of microseconds against well under one for
`struct` (`shmemctl bench --codec` prints the figures); tests/test_wire.py
proves each twin byte-identical to a construct parse and build of its
layout.
"""

from __future__ import annotations

import struct

from construct import (
    Array,
    Bytes,
    Construct,
    FormatField,
    Int8ul,
    Int32ul,
    Int64ul,
    Padded,
    Padding,
    Renamed,
    Struct,
    this,
)

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
#: a header and its u64 as one layout: every reply on the backend channel
ReplyU64 = Struct("header" / Header, "value" / Int64ul)
#: a header and its VhostUserMMap as one layout: every SHMEM_MAP/UNMAP request
RequestMMap = Struct("header" / Header, "mmap" / VhostUserMMap)


def fixed(*layouts: Construct) -> struct.Struct:
    """The `struct.Struct` of fixed-size construct layouts laid end to end: the hot
    path's packer and unpacker, derived from the one declaration above, never written
    beside it. Only fixed-size fields may appear (a size that depends on the data, as in
    DeviceConfig, has no struct form)."""
    return struct.Struct("<" + "".join(_format(layout) for layout in layouts))


def _format(layout: Construct) -> str:
    match layout:
        case Struct():
            return "".join(_format(sub) for sub in layout.subcons)
        case Renamed():
            return _format(layout.subcon)
        case FormatField():
            return str(layout.fmtstr).lstrip("<")
        case Padded() if isinstance(layout.length, int):
            return f"{layout.length}x"
        case Array() if isinstance(layout.count, int):
            return _format(layout.subcon) * layout.count if isinstance(layout.subcon, Struct) else (
                f"{layout.count}{_format(layout.subcon)}"
            )
    raise TypeError(f"{layout!r} has no fixed struct form")


# The hot path's twins, each derived from its layout (tests/test_wire.py proves each
# byte-identical to a construct parse and build).
HEADER = fixed(Header)
U64_STRUCT = fixed(U64)
MMAP_STRUCT = fixed(VhostUserMMap)
SHMEM_CONFIG_STRUCT = fixed(VhostUserShMemConfig)
VRING_STATE_STRUCT = fixed(VringState)
VRING_ADDR_STRUCT = fixed(VringAddr)
MEMORY_REGION_STRUCT = fixed(MemoryRegion)
MEMORY_TABLE_HEADER_STRUCT = fixed(MemoryTableHeader)
DEVICE_CONFIG_HEADER_STRUCT = fixed(DeviceConfigHeader)
REPLY_U64 = fixed(ReplyU64)  # built in one pack
REQUEST_MMAP = fixed(RequestMMap)  # built in one pack

TWINS = {
    "header": (Header, HEADER),
    "u64": (U64, U64_STRUCT),
    "mmap": (VhostUserMMap, MMAP_STRUCT),
    "shmem_config": (VhostUserShMemConfig, SHMEM_CONFIG_STRUCT),
    "vring_state": (VringState, VRING_STATE_STRUCT),
    "vring_addr": (VringAddr, VRING_ADDR_STRUCT),
    "memory_region": (MemoryRegion, MEMORY_REGION_STRUCT),
    "memory_table_header": (MemoryTableHeader, MEMORY_TABLE_HEADER_STRUCT),
    "device_config_header": (DeviceConfigHeader, DEVICE_CONFIG_HEADER_STRUCT),
    "single_memory_region": (SingleMemoryRegion, fixed(SingleMemoryRegion)),
    "reply_u64": (ReplyU64, REPLY_U64),
    "request_mmap": (RequestMMap, REQUEST_MMAP),
}
