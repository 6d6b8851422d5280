"""What the console knows of a pair: status answers and events in, regions and mappings out.

Pure data: no Textual, no sockets. Events are applied as they are drained (a
burst of ten thousand costs one redraw, not ten thousand), and the sorted
view of a region's mappings is rebuilt lazily, once per redraw.
"""

from __future__ import annotations

import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shmemctl.shmem.libc import PAGE_SIZE


@dataclass
class MappingView:
    shm_offset: int
    len: int
    fd_offset: int
    writable: bool
    file: str = ""
    created: float = field(default_factory=time.time)

    @property
    def end(self) -> int:
        return self.shm_offset + self.len


@dataclass
class RegionView:
    shmid: int
    size: int
    base: int = 0
    mappings: dict[int, MappingView] = field(default_factory=dict)
    truncated: bool = False
    version: int = 0  # bumped on every change: widgets cache their drawing by it
    _starts: list[int] | None = None
    _by_access: tuple[list[int], list[int], list[int], list[int]] | None = None

    @property
    def starts(self) -> list[int]:
        if self._starts is None:
            self._starts = sorted(self.mappings)
        return self._starts

    @property
    def by_access(self) -> tuple[list[int], list[int], list[int], list[int]]:
        """(rw starts, rw ends, ro starts, ro ends), sorted. Mappings never overlap, so
        ends sort like starts, and 'anything in [a, b)?' is one bisection per kind."""
        if self._by_access is None:
            rw_s: list[int] = []
            rw_e: list[int] = []
            ro_s: list[int] = []
            ro_e: list[int] = []
            mappings = self.mappings
            for start in self.starts:
                m = mappings[start]
                if m.writable:
                    rw_s.append(start)
                    rw_e.append(m.end)
                else:
                    ro_s.append(start)
                    ro_e.append(m.end)
            self._by_access = (rw_s, rw_e, ro_s, ro_e)
        return self._by_access

    def changed(self) -> None:
        self._starts = None
        self._by_access = None
        self.version += 1

    @property
    def mapped_bytes(self) -> int:
        return sum(m.len for m in self.mappings.values())

    def in_range(self, start: int, end: int) -> list[MappingView]:
        """Mappings overlapping [start, end), in order."""
        starts = self.starts
        i = max(0, bisect_right(starts, start) - 1)
        out = []
        while i < len(starts) and starts[i] < end:
            m = self.mappings[starts[i]]
            if m.end > start:
                out.append(m)
            i += 1
        return out

    def neighbour(self, offset: int | None, step: int) -> int | None:
        """The mapping start `step` places from `offset` (or the first / last)."""
        starts = self.starts
        if not starts:
            return None
        if offset is None:
            return starts[0] if step > 0 else starts[-1]
        i = bisect_left(starts, offset)
        if i < len(starts) and starts[i] == offset:
            i += step
        elif step < 0:
            i -= 1
        return starts[min(max(i, 0), len(starts) - 1)]

    def rows(
        self,
        *,
        sort: str = "offset",
        reverse: bool = False,
        matches: Callable[[MappingView], bool] | None = None,
        around: int | None = None,
        limit: int = 2000,
    ) -> tuple[list[MappingView], int]:
        """The mappings a table shows: filtered, sorted, at most `limit` around `around`;
        and how many matched in all. Offset order needs no sort: `starts` has it."""
        if sort == "offset" and matches is None:
            chosen = [self.mappings[s] for s in self.starts]
        else:
            chosen = [m for m in self.mappings.values() if matches is None or matches(m)]
            chosen.sort(key=SORT_KEYS[sort])
        if reverse:
            chosen.reverse()
        total = len(chosen)
        if total > limit:
            at = 0
            if around is not None:
                at = next((i for i, m in enumerate(chosen) if m.shm_offset == around), 0)
            first = max(0, min(at - limit // 2, total - limit))
            chosen = chosen[first : first + limit]
        return chosen, total

    def problem(self, offset: int, length: int, fd_offset: int) -> str:
        """Why a map of [offset, offset+length) would be refused, as far as we can see."""
        if length <= 0:
            return "length must be at least one page"
        if (offset | length | fd_offset) % PAGE_SIZE:
            return f"offset, length and fd offset must be multiples of {PAGE_SIZE:#x}"
        if offset + length > self.size:
            return f"{offset:#x}+{length:#x} ends past the region's size {self.size:#x}"
        for m in self.in_range(offset, offset + length):
            return f"overlaps {m.shm_offset:#x}+{m.len:#x}"
        return ""

    def free_spot(self, length: int, after: int = 0) -> int | None:
        """The first page-aligned place at or after `after` where `length` fits."""
        pos = after - after % PAGE_SIZE
        for m in self.in_range(pos, self.size):
            if m.shm_offset - pos >= length:
                return pos
            pos = max(pos, m.end)
        return pos if self.size - pos >= length else None


SORT_KEYS: dict[str, Callable[[MappingView], Any]] = {
    "offset": lambda m: m.shm_offset,
    "length": lambda m: m.len,
    "fd offset": lambda m: m.fd_offset,
    "access": lambda m: m.writable,
    "file": lambda m: m.file,
    "age": lambda m: -m.created,
}


@dataclass
class SideState:
    """One daemon as the console sees it."""

    role: str
    status: dict[str, Any] | None = None
    reachable: bool = False
    error: str = ""
    retry_at: float = 0.0  # when the console tries the control socket again
    reconnect_at: float = 0.0  # when the front-end tries its back-end again


class PairModel:
    def __init__(self) -> None:
        self.sides = {"frontend": SideState("frontend"), "backend": SideState("backend")}
        self.regions: dict[int, RegionView] = {}

    # ------------------------------------------------------------ status answers

    def load_frontend(self, status: dict[str, Any]) -> None:
        """A full status: the truth the events then keep up to date."""
        self.sides["frontend"].status = status
        regions = {}
        for r in status["regions"]:
            view = self.regions.get(r["shmid"]) or RegionView(r["shmid"], r["size"])
            view.size, view.base = r["size"], r["base"]
            now = time.time()
            view.mappings = {
                m["shm_offset"]: MappingView(
                    m["shm_offset"], m["len"], m["fd_offset"], m["writable"], m["file"],
                    now - m["age"],
                )
                for m in r["mappings"]
            }  # fmt: skip
            view.truncated = r["truncated"]
            view.changed()
            regions[r["shmid"]] = view
        self.regions = regions

    def load_backend(self, status: dict[str, Any]) -> None:
        self.sides["backend"].status = status
        if not self.regions and status.get("regions"):
            # no front-end to ask: show the layout the back-end advertises
            for shmid, size in status["regions"].items():
                self.regions[int(shmid)] = RegionView(int(shmid), size)

    def poll_update(self, role: str, status: dict[str, Any]) -> None:
        """A cheap periodic status (no mapping list): processes, counters, agreement."""
        side = self.sides[role]
        if side.status is None:
            side.status = status
            return
        for key in ("process", "state", "negotiated", "counters", "disagreements", "scenario",
                    "ready", "why_not_ready", "buffers"):  # fmt: skip
            if key in status:
                side.status[key] = status[key]

    # ------------------------------------------------------------ events

    def apply(self, source: str, event: dict[str, Any]) -> None:
        name = event["event"]
        data = event.get("data", {})
        if source != "frontend":
            return  # mappings are the front-end's truth; the back-end's events are logged only
        status = self.sides["frontend"].status
        if name in ("mapped", "unmapped") and data.get("shmid") in self.regions:
            region = self.regions[data["shmid"]]
            if name == "mapped":
                region.mappings[data["shm_offset"]] = MappingView(
                    data["shm_offset"], data["len"], data["fd_offset"], data["writable"],
                    data.get("file", ""), event.get("timestamp", time.time()),
                )  # fmt: skip
            else:
                region.mappings.pop(data["shm_offset"], None)
            region.changed()
        elif name in ("reset", "disconnected"):
            for region in self.regions.values():
                region.mappings.clear()
                region.changed()
        states = ("connected", "disconnected", "handshake", "reconnecting")
        if status is not None and name in states:
            status["state"] = name
            if name == "reconnecting":
                self.sides["frontend"].reconnect_at = time.time() + data.get("retry_in", 0)

    @property
    def mapping_count(self) -> int:
        return sum(len(r.mappings) for r in self.regions.values())
