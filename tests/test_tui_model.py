"""The console's model and its drawing arithmetic, against straightforward versions."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tui.model import MappingView, RegionView
from tui.widgets import FREE, RO, RW, bar_cells

PAGE = 4096


def region_from(layout: list[tuple[int, bool]]) -> RegionView:
    """Pages 0..63; each (length in pages, writable or not) laid out with a page gap."""
    region = RegionView(0, 64 * PAGE)
    pos = 0
    for pages, writable in layout:
        if pos + pages > 64:
            break
        region.mappings[pos * PAGE] = MappingView(pos * PAGE, pages * PAGE, 0, writable)
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
