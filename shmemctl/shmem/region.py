"""VIRTIO Shared Memory Regions of a front-end: reservations, mappings, and the
one place where SHMEM_MAP/SHMEM_UNMAP requests are validated (docs/protocol.md §5, steps 4-12).
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
from collections.abc import Iterator

from ..sizes import hex_range, human_size
from ..wire.messages import MMAP_FLAG_WRITE, ShmemMap
from . import libc
from .index import IntervalIndex
from .mapping import Mapping
from .rules import (
    Refusal,
    ShmemRefused,
    check_flags,
    check_range,
    overlap_detail,
    region_size,
)

PAGE_SIZE = libc.PAGE_SIZE
#: Mappings are refused past these counts unless configured otherwise (docs/protocol.md §5 step 12).
DEFAULT_MAX_PER_REGION = 131_072
DEFAULT_MAX_TOTAL = 262_144
#: Address space the regions of one device may reserve in total.
DEFAULT_MAX_RESERVE = 1 << 40


class ShmemSetupError(Exception):
    """A region layout (GET_SHMEM_CONFIG answer) that cannot be set up."""


def _refuse(reason: Refusal, detail: str) -> ShmemRefused:
    return ShmemRefused(reason, detail)


def check_layout(sizes: dict[int, int], max_reserve: int = DEFAULT_MAX_RESERVE) -> None:
    """Front-end rules for a GET_SHMEM_CONFIG answer (docs/protocol.md §5)."""
    total = 0
    for shmid, size in sizes.items():
        if size % PAGE_SIZE:
            raise ShmemSetupError(
                f"region {shmid} size {size:#x} is not a multiple of the page size {PAGE_SIZE:#x}"
            )
        total += size
        if total > max_reserve:
            raise ShmemSetupError(
                f"regions need {total:#x} bytes of address space by shmid {shmid}; "
                f"the limit is {human_size(max_reserve)} (--max-reserve)"
            )


class Region:
    """One VIRTIO Shared Memory Region: a reserved range and the mappings inside it."""

    def __init__(self, shmid: int, size: int) -> None:
        self.shmid = shmid
        self.size = size
        self.base = libc.reserve(size)
        self.mappings: IntervalIndex[Mapping] = IntervalIndex()

    @property
    def mapped_bytes(self) -> int:
        return sum(m.len for _, _, m in self.mappings)

    def drop_all(self) -> int:
        """Put the whole reservation back in one call; return how many mappings went."""
        count = len(self.mappings)
        if count:
            libc.restore(self.base, self.size)
            self.mappings.clear()
        return count

    def release(self) -> None:
        self.mappings.clear()
        libc.release(self.base, self.size)


class GuestRam:
    """Memory a front-end gives its device as guest RAM (a profile that starts the
    device as a booted guest does): a memfd, mapped shared."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = os.memfd_create("shmemctl-guest-ram", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.base = libc.reserve(size)
        except OSError:
            os.close(self.fd)
            raise
        try:
            libc.map_fd(self.base, size, self.fd, 0, writable=True)
        except OSError:
            libc.release(self.base, size)
            os.close(self.fd)
            raise

    def close(self) -> None:
        libc.release(self.base, self.size)
        os.close(self.fd)


class RegionTable:
    """Every region of one device, the validation of every request, and the mmap calls.

    Thread-safe: the backend channel maps while the control socket reads and resets.
    """

    def __init__(
        self,
        sizes: dict[int, int],
        *,
        max_per_region: int = DEFAULT_MAX_PER_REGION,
        max_total: int = DEFAULT_MAX_TOTAL,
        max_reserve: int = DEFAULT_MAX_RESERVE,
    ) -> None:
        sizes = {shmid: size for shmid, size in sizes.items() if size}
        check_layout(sizes, max_reserve)
        self.max_per_region = max_per_region
        self.max_total = max_total
        self.lock = threading.RLock()
        self.regions: dict[int, Region] = {}
        self._count = 0
        try:
            for shmid, size in sorted(sizes.items()):
                self.regions[shmid] = Region(shmid, size)
        except OSError as exc:
            self.close()
            raise ShmemSetupError(f"cannot reserve the regions: {exc.strerror}") from exc

    @property
    def sizes(self) -> dict[int, int]:
        return {shmid: r.size for shmid, r in self.regions.items()}

    @property
    def count(self) -> int:
        """Mappings in all regions. (Not __len__: an empty table must not be falsy.)"""
        return self._count

    def _region(self, m: ShmemMap, *, is_map: bool) -> Region:
        """Steps 4-9: everything the layout alone decides (shmem/rules.py)."""
        if is_map:
            check_flags(m)
        region = self.regions.get(m.shmid)
        if region is None:
            region_size(self.sizes, m.shmid)  # raises NO_REGION, naming the regions
        assert region is not None
        check_range(region.size, m, check_fd_offset=is_map)
        return region

    def map(self, m: ShmemMap, fd: int) -> Mapping:
        """Validate (docs/protocol.md §5 steps 4-12) and map; the caller still owns `fd`."""
        with self.lock:
            region = self._region(m, is_map=True)
            end = m.shm_offset + m.len
            hit = region.mappings.conflict(m.shm_offset, end)
            if hit is not None:
                raise _refuse(Refusal.OVERLAP, overlap_detail(hit[0], hit[1] - hit[0]))
            try:
                st = os.fstat(fd)
            except OSError as exc:
                raise ShmemRefused(
                    Refusal.MMAP_FAILED, f"fstat of the fd failed: {exc.strerror}", exc.errno
                ) from exc
            if stat.S_ISREG(st.st_mode) and m.fd_offset + m.len > st.st_size:
                raise _refuse(
                    Refusal.FILE_TOO_SHORT,
                    f"the file is {st.st_size:#x} bytes; fd_offset {m.fd_offset:#x} + len "
                    f"{m.len:#x} needs {m.fd_offset + m.len:#x}",
                )
            if len(region.mappings) >= self.max_per_region or self._count >= self.max_total:
                raise _refuse(
                    Refusal.LIMIT_REACHED,
                    f"{len(region.mappings)} mappings in region {region.shmid}, {self._count} in "
                    f"all; the limits are {self.max_per_region} and {self.max_total}",
                )
            addr = region.base + m.shm_offset
            try:
                libc.map_fd(addr, m.len, fd, m.fd_offset, bool(m.flags & MMAP_FLAG_WRITE))
            except OSError as exc:
                self._restore_after_failure(addr, m.len)
                raise ShmemRefused(Refusal.MMAP_FAILED, str(exc.strerror), exc.errno) from exc
            mapping = Mapping.granted(m, dev=st.st_dev, ino=st.st_ino, created=time.time())
            region.mappings.add(m.shm_offset, end, mapping)
            self._count += 1
            return mapping

    @staticmethod
    def _restore_after_failure(addr: int, length: int) -> None:
        """A failed MAP_FIXED may have replaced part of an aligned range: put the
        reservation back over every page it could have touched. At an unaligned
        address the kernel refused before touching anything."""
        if addr % PAGE_SIZE:
            return
        pages = -(-length // PAGE_SIZE) * PAGE_SIZE
        with contextlib.suppress(OSError):  # nothing better to do; the table stays true
            libc.restore(addr, pages)

    def unmap(self, m: ShmemMap) -> Mapping:
        """Validate (steps 5-8, whole mapping) and put the reservation back."""
        with self.lock:
            region = self._region(m, is_map=False)
            found = region.mappings.get(m.shm_offset)
            if found is None or found[0] != m.shm_offset + m.len:
                hit = region.mappings.conflict(m.shm_offset, m.shm_offset + m.len)
                there = (
                    f"the mapping there is {hex_range(hit[0], hit[1] - hit[0])}"
                    if hit
                    else "nothing is mapped there"
                )
                raise _refuse(
                    Refusal.NOT_A_MAPPING,
                    f"{hex_range(m.shm_offset, m.len)} in region {m.shmid} is not one whole "
                    f"mapping; {there}",
                )
            libc.restore(region.base + m.shm_offset, m.len)
            self._count -= 1
            return region.mappings.pop(m.shm_offset)

    def reset(self) -> int:
        """Drop every mapping of every region (device reset, disconnect)."""
        with self.lock:
            dropped = sum(region.drop_all() for region in self.regions.values())
            self._count = 0
            return dropped

    def close(self) -> None:
        with self.lock:
            for region in self.regions.values():
                region.release()
            self.regions.clear()
            self._count = 0

    def mappings(self) -> Iterator[Mapping]:
        with self.lock:
            items = [m for r in self.regions.values() for _, _, m in r.mappings]
        yield from items

    def address_of(self, shmid: int, offset: int) -> int:
        return self.regions[shmid].base + offset
