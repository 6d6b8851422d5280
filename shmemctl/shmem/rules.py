"""The SHMEM_MAP/SHMEM_UNMAP rules that need nothing but the request and the region
layout (docs/protocol.md §5, steps 4-9): pure functions, so the front-end's validation and the
device's own reading of a request apply the same rule in the same order.

Each check raises ShmemRefused with the reason and the errno a front-end replies.
What only the kernel or the live table can say (overlap, the file's real size, limits,
mmap itself) stays in RegionTable.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Callable, Iterable, Mapping

from ..sizes import hex_range
from ..wire.messages import MMAP_FLAG_WRITE, ShmemMap
from .libc import PAGE_SIZE

U64_MAX = (1 << 64) - 1


class Refusal(enum.Enum):
    """Why a SHMEM request was refused: the rule, where docs/protocol.md states it, and
    the errno the front-end replies (negated). The conformance suite names its checks'
    passages from here, and the front-end's log and events its refusals."""

    NOT_NEGOTIATED = ("SHMEM not negotiated", errno.EOPNOTSUPP, "§5 step 1")
    BAD_FD_COUNT = ("wrong number of fds", errno.EBADF, "§5 step 2, §6.5")
    BAD_FLAGS = ("unknown flag bits", errno.EINVAL, "§5 step 4, §2")
    NO_REGION = ("no such region", errno.ENODEV, "§5 step 5")
    ZERO_LENGTH = ("zero length", errno.EINVAL, "§5 step 6")
    OVERFLOW = ("offset + length overflows u64", errno.EOVERFLOW, "§5 step 7")
    OUT_OF_BOUNDS = ("out of the region's bounds", errno.EINVAL, "§5 step 8")
    MISALIGNED = ("not page aligned", errno.EINVAL, "§5 step 9")
    OVERLAP = ("overlaps an existing mapping", errno.EEXIST, "§5 step 10")
    FILE_TOO_SHORT = ("file shorter than fd_offset + len", errno.ENXIO, "§5 step 11")
    LIMIT_REACHED = ("mapping limit reached", errno.ENOSPC, "§5 step 12")
    NOT_A_MAPPING = ("not one whole existing mapping", errno.ENOENT, "§5 UNMAP")
    MMAP_FAILED = ("the kernel refused the mapping", errno.EIO, "§5 (the mmap)")
    NOT_STARTED = ("the device is not started", errno.EAGAIN, "§8 (QEMU: device start)")

    def __init__(self, summary: str, err: int, passage: str) -> None:
        self.summary = summary
        self.errno = err
        self.passage = passage


class ShmemRefused(Exception):
    """A request refused before any effect: nothing mapped, nothing unmapped."""

    def __init__(self, reason: Refusal, detail: str, err: int | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.errno = reason.errno if err is None else err

    @property
    def errno_name(self) -> str:
        return errno.errorcode.get(self.errno, str(self.errno))


def check_fd_count(carried: int) -> None:
    """Step 2 (§6.5): a SHMEM_MAP carries exactly one fd. (A SHMEM_UNMAP that brings one
    is still served: the stray fd is closed as surplus.)"""
    if carried != 1:
        raise ShmemRefused(
            Refusal.BAD_FD_COUNT, f"SHMEM_MAP carries {carried} fds; it needs exactly one"
        )


def check_flags(m: ShmemMap) -> None:
    """Step 4: only bit 0 (read-write) is defined."""
    if m.flags & ~MMAP_FLAG_WRITE:
        raise ShmemRefused(
            Refusal.BAD_FLAGS, f"flags {m.flags:#x}: only bit 0 (read-write) is defined"
        )


def region_size(sizes: Mapping[int, int], shmid: int) -> int:
    """Step 5: the size of a region that exists and is not empty."""
    size = sizes.get(shmid, 0)
    if not size:
        known = ", ".join(str(s) for s, z in sorted(sizes.items()) if z) or "none"
        raise ShmemRefused(
            Refusal.NO_REGION, f"shmid {shmid} is not a region of this device (regions: {known})"
        )
    return size


def check_range(size: int, m: ShmemMap, *, check_fd_offset: bool) -> None:
    """Steps 6-9 for a request inside a region of `size` bytes; shared by map and unmap
    (an unmap has no fd_offset to check)."""
    if m.len == 0:
        raise ShmemRefused(Refusal.ZERO_LENGTH, "len is 0; a mapping needs at least one page")
    if m.shm_offset + m.len > U64_MAX or (check_fd_offset and m.fd_offset + m.len > U64_MAX):
        raise ShmemRefused(
            Refusal.OVERFLOW,
            f"shm_offset {m.shm_offset:#x}, fd_offset {m.fd_offset:#x} + len {m.len:#x} "
            "overflow 64 bits",
        )
    if m.shm_offset + m.len > size:
        raise ShmemRefused(
            Refusal.OUT_OF_BOUNDS,
            f"{hex_range(m.shm_offset, m.len)} ends past region {m.shmid}'s size {size:#x}",
        )
    fd_offset = m.fd_offset if check_fd_offset else 0
    if (m.shm_offset | m.len | fd_offset) % PAGE_SIZE:
        raise ShmemRefused(
            Refusal.MISALIGNED,
            f"shm_offset {m.shm_offset:#x}, fd_offset {fd_offset:#x} and len {m.len:#x} "
            f"must be multiples of the page size {PAGE_SIZE:#x}",
        )


def check_request(sizes: Mapping[int, int], m: ShmemMap, *, is_map: bool) -> None:
    """Steps 4-9 in order against a region layout alone."""
    if is_map:
        check_flags(m)
    check_range(region_size(sizes, m.shmid), m, check_fd_offset=is_map)


def overlap_detail(start: int, length: int) -> str:
    return f"overlaps {hex_range(start, length)}; unmap it first or pick a free range"


#: The held mapping that overlaps [start, end), as (shm_offset, len), or None. Held
#: mappings never overlap each other, so an unmap names one whole mapping exactly when
#: the overlap of its range is that range.
Overlap = Callable[[int, int], "tuple[int, int] | None"]


def overlap_in(held: Iterable[tuple[int, int]]) -> Overlap:
    """An `Overlap` over a few (shm_offset, len) pairs, by scanning them; an index
    (`IntervalIndex.conflict`) answers the same question for many."""
    pairs = list(held)

    def overlap(start: int, end: int) -> tuple[int, int] | None:
        for at, length in pairs:
            if at < end and start < at + length:
                return at, length
        return None

    return overlap


def must_refuse(sizes: Mapping[int, int], overlap: Overlap, m: ShmemMap, *, is_map: bool) -> str:
    """Why a front-end following the rules must refuse `m` (steps 4-11), judged from the
    region layout and the mappings held in `m`'s region (`overlap` finds them); "" when
    nothing there forbids it (the file's size, limits and mmap are the kernel's to say).
    The device's reading of a refusal, the observer and the console's map form use it."""
    try:
        check_request(sizes, m, is_map=is_map)
    except ShmemRefused as exc:
        return exc.detail
    hit = overlap(m.shm_offset, m.shm_offset + m.len)
    if is_map:
        return "" if hit is None else overlap_detail(*hit)
    if hit == (m.shm_offset, m.len):
        return ""
    return f"{hex_range(m.shm_offset, m.len)} is not one whole mapping"
