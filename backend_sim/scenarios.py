"""Scenarios: a device that lives on its own, so a demo shows life without typing.

* `blobs`: a GPU-like device allocating and freeing buffers of varied sizes at a
  steady rate, some read-only, placed first-fit in the region.
* `dax`: a virtiofs-like device mapping windows of a real file on disk, evicting
  the oldest window when the region is full.
"""

from __future__ import annotations

import abc
import logging
import os
import random
import tempfile
import threading
import time
from collections import deque
from typing import Any

from shmemctl.backend import NotReady
from shmemctl.channel import ChannelError
from shmemctl.shmem.libc import PAGE_SIZE
from shmemctl.wire import ShmemMap
from shmemctl.wire.messages import MMAP_FLAG_WRITE

from .device import NOT_SENT, Buffer, SimDevice, page_tag

log = logging.getLogger("backend")

BLOB_SIZES = (4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 2 << 20)
DAX_WINDOW = 2 << 20


class Scenario(abc.ABC):
    """A thread that acts `rate` times a second until stopped."""

    name = ""

    def __init__(self, device: SimDevice, shmid: int, rate: float, seed: int | None) -> None:
        self.device = device
        self.shmid = shmid
        self.size = device.endpoint.device.regions[shmid]
        self.rate = rate
        self.random = random.Random(seed)
        self.stats = {"maps": 0, "unmaps": 0, "refused": 0, "failed": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"scenario-{self.name}")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shmid": self.shmid,
            "rate": self.rate,
            "running": self.running,
            **self.stats,
        }

    def _run(self) -> None:
        period = 1 / self.rate
        next_tick = time.monotonic()
        while not self._stop.is_set():
            try:
                self.step()
            except NotReady as exc:
                log.info("scenario %s waits: %s", self.name, exc)
                endpoint = self.device.endpoint
                if endpoint.wait_ready(0):  # a channel is there: what is missing won't come
                    self._stop.wait(1)
                else:  # until the front-end opens one (a second at most: stop is heard)
                    endpoint.wait_ready(1)
            except ChannelError as exc:
                self.stats["failed"] += 1
                log.warning("scenario %s: %s", self.name, exc)
                self._stop.wait(1)
            next_tick = max(next_tick + period, time.monotonic() - period)
            self._stop.wait(max(0.0, next_tick - time.monotonic()))
        self.finish()

    def _count(self, result: int | None, ok_key: str) -> bool:
        if result == NOT_SENT:
            return False  # a reset dropped it first: nothing to unmap
        if result:
            self.stats["refused"] += 1
            return False
        self.stats[ok_key] += 1
        return True

    @abc.abstractmethod
    def step(self) -> None:
        """One action of the device (a map, an unmap, or nothing)."""

    def finish(self) -> None:  # noqa: B027 - most scenarios have nothing to tidy
        """Leave the mappings where they are: stopping a scenario is not a reset."""


class Blobs(Scenario):
    name = "blobs"

    def __init__(self, *args: Any, max_live: int = 48, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_live = max_live
        self.live: list[tuple[int, int]] = []  # (shm_offset, len) this scenario mapped

    def _free_spot(self, length: int) -> int | None:
        """First fit among everything the device believes is mapped in the region."""
        with self.device.lock:
            taken = sorted(
                (b.shm_offset, b.shm_offset + b.len)
                for b in self.device.mapped.values()
                if b.shmid == self.shmid
            )
        pos = 0
        for start, end in taken:
            if start - pos >= length:
                return pos
            pos = max(pos, end)
        return pos if self.size - pos >= length else None

    def _still_mapped(self) -> None:
        """Forget what a reset or disconnect dropped: those must not be unmapped (§5)."""
        with self.device.lock:
            mapped = self.device.mapped
            self.live = [(o, n) for o, n in self.live if (self.shmid, o) in mapped]

    def step(self) -> None:
        self._still_mapped()
        grow = len(self.live) < self.max_live and self.random.random() < 0.55
        if grow or not self.live:
            length = self.random.choice([s for s in BLOB_SIZES if s <= self.size] or [PAGE_SIZE])
            where = self._free_spot(length)
            if where is not None:
                ro = self.random.random() < 0.3
                m = ShmemMap(self.shmid, where, length, 0, 0 if ro else MMAP_FLAG_WRITE)
                if self._count(self.device.map(m), "maps"):
                    self.live.append((where, length))
                return
            if not self.live:
                return
        where, length = self.live.pop(self.random.randrange(len(self.live)))
        m = ShmemMap(self.shmid, where, length)
        self._count(self.device.unmap(m, only_if_believed=True), "unmaps")


class Dax(Scenario):
    name = "dax"

    def __init__(self, *args: Any, file_size: int = 64 << 20, directory: str | None = None,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        if self.size < DAX_WINDOW:
            raise ValueError(
                f"dax maps {DAX_WINDOW >> 20} MiB windows; region {self.shmid} has only "
                f"{self.size:#x} bytes (give it at least 2M, e.g. --regions 0=64M)"
            )
        self.windows = max(1, file_size // DAX_WINDOW)
        self.slots = max(1, self.size // DAX_WINDOW)
        handle, path = tempfile.mkstemp(prefix="shmemctl-dax-", suffix=".img", dir=directory)
        try:
            os.ftruncate(handle, self.windows * DAX_WINDOW)
            for window in range(self.windows):  # a readable tag opens every window
                os.pwrite(handle, page_tag(0, window * DAX_WINDOW // PAGE_SIZE),
                          window * DAX_WINDOW)  # fmt: skip
        finally:
            os.close(handle)
        self.path = path
        self.file: Buffer = self.device.new_buffer(self.windows * DAX_WINDOW, path=path)
        self.placed: dict[int, int] = {}  # slot -> file window
        self.order: deque[int] = deque()  # slots, oldest first

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "file": self.path, "windows_mapped": len(self.placed)}

    def step(self) -> None:
        with self.device.lock:  # what a reset or disconnect dropped is gone (§5)
            mapped = self.device.mapped
            self.placed = {s: w for s, w in self.placed.items()
                           if (self.shmid, s * DAX_WINDOW) in mapped}  # fmt: skip
        self.order = deque(s for s in self.order if s in self.placed)
        window = self.random.randrange(self.windows)
        if window in self.placed.values():
            return  # already in the cache window: a hit
        free = [s for s in range(self.slots) if s not in self.placed]
        if not free:
            slot = self.order.popleft()
            del self.placed[slot]
            window_range = ShmemMap(self.shmid, slot * DAX_WINDOW, DAX_WINDOW)
            self._count(self.device.unmap(window_range, only_if_believed=True), "unmaps")
            free = [slot]
        slot = free[0]
        m = ShmemMap(self.shmid, slot * DAX_WINDOW, DAX_WINDOW, window * DAX_WINDOW)
        if self._count(self.device.map(m, buffer=self.file), "maps"):
            self.placed[slot] = window
            self.order.append(slot)

    def finish(self) -> None:
        # The file goes; mappings of it stay valid in the front-end (the mapping holds it),
        # and the device keeps it open only while it believes some of them live.
        os.unlink(self.path)
        self.device.release_buffer(self.file)


SCENARIOS: dict[str, type[Scenario]] = {"blobs": Blobs, "dax": Dax}
