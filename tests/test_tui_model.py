"""The console's model and its drawing arithmetic, against straightforward versions."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shmemctl.events import Event, qmp_timestamp
from shmemctl.shmem.mapping import Mapping
from tui.model import EventLog, RegionView
from tui.widgets import FREE, RO, RW, bar_cells

PAGE = 4096


def region_from(layout: list[tuple[int, bool]]) -> RegionView:
    """Pages 0..63; each (length in pages, writable or not) laid out with a page gap."""
    region = RegionView(0, 64 * PAGE)
    pos = 0
    for pages, writable in layout:
        if pos + pages > 64:
            break
        region.mappings[pos * PAGE] = Mapping(0, pos * PAGE, pages * PAGE, 0, writable)
        pos += pages + 1
    region.changed()
    return region


def plain_cells(region: RegionView, start: int, span: int, width: int) -> list[int]:
    cells = []
    for c in range(width):
        a = start + c * span // width
        b = max(a + 1, start + (c + 1) * span // width)
        kind = FREE
        for m in region.mappings.values():
            if m.shm_offset < b and a < m.end:
                kind |= RW if m.writable else RO
        cells.append(kind)
    return cells


@settings(max_examples=300)
@given(
    layout=st.lists(st.tuples(st.integers(1, 6), st.booleans()), max_size=20),
    start_page=st.integers(0, 63),
    width=st.integers(1, 120),
    data=st.data(),
)
def test_bar_cells_match_a_plain_scan(layout, start_page, width, data) -> None:
    region = region_from(layout)
    span = data.draw(st.integers(1, 64 * PAGE - start_page * PAGE))
    start = start_page * PAGE
    assert bar_cells(region, start, span, width) == plain_cells(region, start, span, width)


@given(layout=st.lists(st.tuples(st.integers(1, 6), st.booleans()), max_size=20))
def test_neighbours_and_free_spots(layout) -> None:
    region = region_from(layout)
    starts = sorted(region.mappings)
    offset = None
    walked = []
    for _ in starts:
        offset = region.neighbour(offset, 1)
        walked.append(offset)
    assert walked == starts
    spot = region.free_spot(2 * PAGE)
    if spot is not None:
        assert region.problem(spot, 2 * PAGE, 0) == ""
    for m in region.mappings.values():
        assert region.problem(m.shm_offset, PAGE, 0).startswith("overlaps")


# ---------------------------------------------------------------- the event log

T = 1_800_000_000.0


def mapped(side: str, offset: int = 0, *, writable: bool = True, t: float = T) -> dict:
    """A MAPPED event as each daemon publishes it."""
    data = {"shmid": 0, "shm_offset": offset, "len": 0x10000, "fd_offset": 0, "writable": writable}
    data |= {"file": "/memfd:b (deleted)"} if side == "frontend" else {"buffer": 1, "acked": True}
    return {"event": Event.MAPPED.value, "data": data, "timestamp": qmp_timestamp(t)}


def unmapped(side: str, offset: int = 0, t: float = T) -> dict:
    data = {"shmid": 0, "shm_offset": offset, "len": 0x10000}
    if side == "frontend":
        data |= {"fd_offset": 0, "writable": True}
    return {"event": Event.UNMAPPED.value, "data": data, "timestamp": qmp_timestamp(t)}


def refused(side: str, errno: str = "EEXIST") -> dict:
    data = {"shmid": 0, "shm_offset": 0x20000, "len": 0x10000, "errno": errno}
    if side == "frontend":
        data |= {"request": "SHMEM_MAP", "reason": "OVERLAP",
                 "detail": "overlaps 0x0+0x20000; unmap it first"}  # fmt: skip
    else:
        data |= {"request": "map", "fd_offset": 0, "writable": True,
                 "explanation": "overlaps 0x0+0x20000"}  # fmt: skip
    return {"event": Event.REFUSED.value, "data": data, "timestamp": qmp_timestamp(T)}


def lines(log: EventLog) -> list[tuple[str, str]]:
    return [(e.text, e.who) for e in log.entries]


@given(st.booleans())
def test_a_map_both_sides_report_alike_is_one_line(front_end_first) -> None:
    log = EventLog()
    reports = [("frontend", mapped("frontend")), ("backend", mapped("backend"))]
    for side, event in reports if front_end_first else reports[::-1]:
        log.add(side, event)
    assert lines(log) == [("MAPPED 0:0x0+0x10000 rw", "both")]


def test_reports_that_differ_stay_two_lines_both_marked() -> None:
    log = EventLog()
    log.add("frontend", mapped("frontend", writable=False))
    log.add("backend", mapped("backend", writable=True))
    log.add("frontend", refused("frontend"))  # the front-end refused what the back-end
    log.add("backend", mapped("backend", 0x20000))  # believes mapped
    assert lines(log) == [
        ("MAPPED 0:0x0+0x10000 ro", "front-end ≠"),
        ("MAPPED 0:0x0+0x10000 rw", "back-end ≠"),
        ("REFUSED map 0:0x20000+0x10000 EEXIST: overlaps 0x0+0x20000; unmap it first",
         "front-end ≠"),
        ("MAPPED 0:0x20000+0x10000 rw", "back-end ≠"),
    ]  # fmt: skip


def test_a_refusal_both_report_is_one_line_in_the_front_ends_words() -> None:
    log = EventLog()
    log.add("backend", refused("backend"))
    assert lines(log) == [("REFUSED map 0:0x20000+0x10000 EEXIST: overlaps 0x0+0x20000",
                           "back-end")]  # fmt: skip
    log.add("frontend", refused("frontend"))
    assert lines(log) == [
        ("REFUSED map 0:0x20000+0x10000 EEXIST: overlaps 0x0+0x20000; unmap it first", "both")
    ]
    log.add("frontend", refused("frontend", "EINVAL"))  # and a different errno is another story
    log.add("backend", refused("backend", "EEXIST"))
    assert [who for _, who in lines(log)[1:]] == ["front-end ≠", "back-end ≠"]


def test_the_same_range_again_pairs_in_order() -> None:
    """Map, unmap, map the same range: each side's reports pair in the order they came,
    however the two streams interleave."""
    log = EventLog()
    front = [mapped("frontend"), unmapped("frontend"), mapped("frontend")]
    back = [mapped("backend"), unmapped("backend"), mapped("backend")]
    for event in front[:2]:
        log.add("frontend", event)
    for event in back:
        log.add("backend", event)
    log.add("frontend", front[2])
    assert lines(log) == [
        ("MAPPED 0:0x0+0x10000 rw", "both"),
        ("UNMAPPED 0:0x0+0x10000 rw", "both"),
        ("MAPPED 0:0x0+0x10000 rw", "both"),
    ]


def test_reports_far_apart_are_not_one_request() -> None:
    log = EventLog(window=10)
    log.add("frontend", mapped("frontend", t=T))
    log.add("backend", mapped("backend", t=T + 60))
    assert lines(log) == [("MAPPED 0:0x0+0x10000 rw", "front-end"),
                          ("MAPPED 0:0x0+0x10000 rw", "back-end")]  # fmt: skip


def test_other_events_are_a_line_each_and_the_log_is_bounded() -> None:
    log = EventLog(limit=50)
    log.note("frontend", "connected to its control socket")
    log.add("frontend", {"event": Event.RESET.value, "data": {"dropped": 2, "via": "RESET_DEVICE"},
                         "timestamp": qmp_timestamp(T)})  # fmt: skip
    assert lines(log) == [("connected to its control socket", "front-end"),
                          ("RESET dropped=2 via=RESET_DEVICE", "front-end")]  # fmt: skip
    for i in range(1000):  # reports nobody answers: the log and what waits stay bounded
        log.add("backend", mapped("backend", i * 0x10000))
    assert len(log.entries) == 50
    assert sum(len(q) for q in log._waiting.values()) <= 50
    log.add("frontend", mapped("frontend", 999 * 0x10000))  # the newest still pairs
    assert lines(log)[-1] == ("MAPPED 0:0x3e70000+0x10000 rw", "both")


def test_the_fields_that_matter_come_first() -> None:
    """In a narrow panel an event loses its tail: the tail is who said it and when."""
    data = {"shmid": 0, "shm_offset": 0x210000, "len": 0x100000, "fd_offset": 0, "writable": False}
    log = EventLog()
    log.add("frontend", {"event": Event.MAPPED.value, "timestamp": qmp_timestamp(T), "data": data})
    assert log.entries[0].text == "MAPPED 0:0x210000+0x100000 ro"
    trace = {"event": Event.MESSAGE.value, "timestamp": qmp_timestamp(T), "data": {
        "channel": "backend", "direction": "out", "request": "SHMEM_MAP", "need_reply": True,
        "payload": {"shmid": 0}, "fds": 1}}  # fmt: skip
    log.add("backend", trace)
    assert log.entries[1].text == "-> backend SHMEM_MAP need_reply {'shmid': 0} fds=1"
