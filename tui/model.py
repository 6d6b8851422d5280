"""What the console knows of a pair: status answers and events in, regions and mappings out.

Pure data: no Textual, no sockets. Events are applied as they are drained (a
burst of ten thousand costs one redraw, not ten thousand), and the sorted
view of a region's mappings is rebuilt lazily, once per redraw.
"""

from __future__ import annotations

import itertools
import time
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shmemctl.events import DROPS_ALL, OUTCOMES, STATES, Event, event_time, state_named
from shmemctl.render import trace_arrow
from shmemctl.shmem.libc import PAGE_SIZE
from shmemctl.shmem.mapping import Mapping
from shmemctl.shmem.rules import must_refuse, overlap_in
from shmemctl.sizes import hex_range
from shmemctl.wire import ShmemMap


@dataclass
class RegionView:
    shmid: int
    size: int
    base: int = 0
    mappings: dict[int, Mapping] = field(default_factory=dict)
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

    def in_range(self, start: int, end: int) -> list[Mapping]:
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
        matches: Callable[[Mapping], bool] | None = None,
        around: int | None = None,
        limit: int = 2000,
    ) -> tuple[list[Mapping], int]:
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
        """Why a map of [offset, offset+length) would be refused, as far as the console
        can see: the rulebook's steps 4-11 against this region and its mappings."""
        if min(offset, length, fd_offset) < 0:
            return "offset, length and fd offset cannot be negative"
        m = ShmemMap(self.shmid, offset, length, fd_offset)
        held = [(v.shm_offset, v.len) for v in self.in_range(offset, offset + length)]
        return must_refuse({self.shmid: self.size}, overlap_in(held), m, is_map=True)

    def free_spot(self, length: int, after: int = 0) -> int | None:
        """The first page-aligned place at or after `after` where `length` fits."""
        pos = after - after % PAGE_SIZE
        for m in self.in_range(pos, self.size):
            if m.shm_offset - pos >= length:
                return pos
            pos = max(pos, m.end)
        return pos if self.size - pos >= length else None


SORT_KEYS: dict[str, Callable[[Mapping], Any]] = {
    "offset": lambda m: m.shm_offset,
    "length": lambda m: m.len,
    "fd offset": lambda m: m.fd_offset,
    "access": lambda m: m.writable,
    "file": lambda m: m.file,
    "age": lambda m: -m.created,
}


#: The events that change what the region map shows.
REGION_CHANGES: frozenset[Event] = frozenset({Event.MAPPED, Event.UNMAPPED}) | DROPS_ALL


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
    """`roles`: the daemons the console talks to: a pair's front-end and back-end, or
    one tap (whose status holds the picture of a pair it only watches)."""

    def __init__(self, roles: tuple[str, ...] = ("frontend", "backend")) -> None:
        self.sides = {role: SideState(role) for role in roles}
        self.regions: dict[int, RegionView] = {}
        self.log = EventLog()

    # ------------------------------------------------------------ status answers

    def load_frontend(self, status: dict[str, Any]) -> None:
        """A full status: the truth the events then keep up to date."""
        self.sides["frontend"].status = status
        regions = {}
        for r in status["regions"]:
            view = self.regions.get(r["shmid"]) or RegionView(r["shmid"], r["size"])
            view.size, view.base = r["size"], r["base"]
            now = time.time()
            view.mappings = {m["shm_offset"]: Mapping.from_json(m, now) for m in r["mappings"]}
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

    def load_tap(self, status: dict[str, Any]) -> None:
        """A tap's status: the picture of the pair it watches, whole each time (the tap
        publishes no mapping events: the picture is read at the poll's pace). A region
        sits at the base the tap inferred from the front-end's maps, 0 when none is
        known; one whose size no layout reply gave is as long as its last mapping."""
        self.sides["tap"].status = status
        bases = {p["shmid"]: p["base"] for p in status["truth"]["regions"] if p.get("base")}
        now = time.time()
        regions = {}
        for r in status["regions"]:
            mappings = {m["shm_offset"]: Mapping.from_json(m, now) for m in r["mappings"]}
            size = r["size"] or max((m.end for m in mappings.values()), default=PAGE_SIZE)
            view = self.regions.get(r["shmid"]) or RegionView(r["shmid"], size)
            view.size, view.base = size, bases.get(r["shmid"], 0)
            view.mappings = mappings
            view.changed()
            regions[r["shmid"]] = view
        self.regions = regions

    def poll_update(self, role: str, status: dict[str, Any]) -> None:
        """A cheap periodic status (no mapping list): processes, counters, agreement.
        A tap's is its whole status."""
        if role == "tap":
            self.load_tap(status)
            return
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
        if name in (Event.MAPPED, Event.UNMAPPED) and data.get("shmid") in self.regions:
            region = self.regions[data["shmid"]]
            if name == Event.MAPPED:
                region.mappings[data["shm_offset"]] = Mapping.from_json(data, event_time(event))
            else:
                region.mappings.pop(data["shm_offset"], None)
            region.changed()
        elif name in DROPS_ALL:
            for region in self.regions.values():
                region.mappings.clear()
                region.changed()
        if status is not None and name in STATES:
            status["state"] = state_named(name)
            if name == Event.RECONNECTING:
                self.sides["frontend"].reconnect_at = time.time() + data.get("retry_in", 0)

    @property
    def mapping_count(self) -> int:
        return sum(len(r.mappings) for r in self.regions.values())


# ---------------------------------------------------------------- the event log

SIDE_NAMES = {"frontend": "front-end", "backend": "back-end", "both": "both", "tap": "tap"}
#: How far apart (by the daemons' own clocks) two reports of one request may be.
PAIR_WINDOW = 10.0


def describe(name: str, data: dict[str, Any]) -> str:
    """An event in a line, the fields that matter first: what happened, to which range, how.
    Who said it and when come after (see LogEntry), so a narrow panel loses only those."""
    if name == Event.VIOLATION:  # what a watcher is there for: first words say so
        return (f"VIOLATION {data.get('by')} broke {data.get('rule')} ({data.get('passage')}): "
                f"{data.get('detail')} [{data.get('channel')} {data.get('request')}]")  # fmt: skip
    if name == Event.MESSAGE:  # the protocol trace
        payload = data.get("payload")
        parts = (
            trace_arrow(data),
            data.get("channel"),
            data.get("request"),
            "reply" if data.get("reply") else ("need_reply" if data.get("need_reply") else ""),
            "" if payload is None else payload,
            f"fds={data['fds']}" if data.get("fds") else "",
        )
        return " ".join(str(p) for p in parts if p not in ("", None))
    if "shm_offset" in data:
        where = f"{data['shmid']}:{hex_range(data['shm_offset'], data['len'])}"
        if name == Event.REFUSED:
            why = data.get("detail") or data.get("explanation") or ""
            text = f"{name} {_request_kind(name, data)} {where} {data.get('errno', '')}"
            return f"{text}: {why}" if why else text
        access = "" if "writable" not in data else " rw" if data["writable"] else " ro"
        return f"{name} {where}{access}"
    return " ".join([name, *(f"{k}={v}" for k, v in data.items())])


def _request_kind(name: str, data: dict[str, Any]) -> str:
    if name == Event.REFUSED:  # the front-end names the message, the back-end the request
        return "unmap" if "UNMAP" in str(data.get("request", "")).upper() else "map"
    return "map" if name == Event.MAPPED else "unmap"


def _pairing_key(name: str, data: dict[str, Any]) -> tuple[Any, ...] | None:
    """What a front-end's and a back-end's report of one request share, or None."""
    if name not in OUTCOMES or "shm_offset" not in data:
        return None
    return (_request_kind(name, data), data["shmid"], data["shm_offset"], data["len"])


def _outcome(name: str, data: dict[str, Any]) -> tuple[Any, ...]:
    """What both sides must say alike for one line to stand for both."""
    if name == Event.MAPPED:
        return (name, data.get("fd_offset"), data.get("writable"))
    if name == Event.REFUSED:
        return (name, data.get("errno"))
    return (name,)


@dataclass(eq=False)
class LogEntry:
    text: str  # the essential fields (describe)
    side: str  # "frontend", "backend", or "both" when the two reported the same
    timestamp: float
    serial: int
    differs: bool = False  # the other side reported this request otherwise (its own entry)
    version: int = 0  # bumped when the entry changes: the panel caches its wrapping by it
    waiting: tuple[Any, ...] | None = None  # its key among those waiting for a counterpart

    @property
    def who(self) -> str:
        return SIDE_NAMES[self.side] + (" ≠" if self.differs else "")


class EventLog:
    """The console's log: one entry per event, except that the front-end's and the
    back-end's reports of one map or unmap become a single entry when they agree,
    and stay two, marked, when they differ.

    The two arrive on separate sockets, in either order and maybe in different
    drains, so an unpaired report waits, by its key, for the other side's. A wait
    costs nothing: the entry is shown at once and changed in place when the
    counterpart arrives."""

    def __init__(self, limit: int = 2000, window: float = PAIR_WINDOW) -> None:
        self.entries: deque[LogEntry] = deque()
        self.limit = limit
        self.window = window
        self.version = 0  # bumped on every change
        self._serials = itertools.count(1)
        # (side, key) -> entries of that side still waiting, oldest first, with their event
        self._waiting: dict[tuple[Any, ...], deque[tuple[LogEntry, str, dict[str, Any]]]] = {}

    def note(self, side: str, text: str, timestamp: float | None = None) -> None:
        """A line of the console's own (not a daemon's event)."""
        self._append(side, text, time.time() if timestamp is None else timestamp)

    def add(self, source: str, event: dict[str, Any]) -> None:
        name = event["event"]
        data = event.get("data", {})
        timestamp = event_time(event)
        key = _pairing_key(name, data)
        if key is None:
            self._append(source, describe(name, data), timestamp)
            return
        other = "backend" if source == "frontend" else "frontend"
        found = self._counterpart((other, *key), timestamp)
        if found is None:
            entry = self._append(source, describe(name, data), timestamp)
            entry.waiting = (source, *key)
            self._waiting.setdefault(entry.waiting, deque()).append((entry, name, data))
            return
        entry, other_name, other_data = found
        if _outcome(name, data) == _outcome(other_name, other_data):
            if source == "frontend":  # the front-end's words: it is the one that maps
                entry.text = describe(name, data)
            entry.side = "both"
        else:
            entry.differs = True
            self._append(source, describe(name, data), timestamp).differs = True
        entry.version += 1
        self.version += 1

    def _counterpart(
        self, waiting: tuple[Any, ...], timestamp: float
    ) -> tuple[LogEntry, str, dict[str, Any]] | None:
        queue = self._waiting.get(waiting)
        found = None
        while queue and found is None:
            item = queue.popleft()
            item[0].waiting = None
            if abs(item[0].timestamp - timestamp) <= self.window:
                found = item  # else too far apart to be one request: it stays alone
        if queue is not None and not queue:
            del self._waiting[waiting]
        return found

    def _append(self, side: str, text: str, timestamp: float) -> LogEntry:
        entries = self.entries
        if len(entries) >= self.limit:
            gone = entries.popleft()
            if gone.waiting is not None:  # the oldest entry is the oldest of its key
                queue = self._waiting[gone.waiting]
                queue.popleft()
                if not queue:
                    del self._waiting[gone.waiting]
        entry = LogEntry(text, side, timestamp, next(self._serials))
        entries.append(entry)
        self.version += 1
        return entry
