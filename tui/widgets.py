"""The console's widgets: the region map (line API), the mappings table, the panels."""

from __future__ import annotations

import time
from bisect import bisect_right
from typing import Any

from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import DataTable, Static

from shmemctl.events import Event
from shmemctl.render import per_rule
from shmemctl.shmem.libc import PAGE_SIZE
from shmemctl.shmem.mapping import Mapping
from shmemctl.sizes import hex_range, human_size, mib

from .model import EventLog, LogEntry, PairModel, RegionView

FREE, RO, RW, BOTH = 0, 1, 2, 3
#: Distinguishable without colour: solid for read-write, light shade for read-only.
GLYPHS = {FREE: "·", RO: "▒", RW: "█", BOTH: "▓"}
STYLES = {
    FREE: Style(color="grey42"),
    RO: Style(color="yellow"),
    RW: Style(color="green"),
    BOTH: Style(color="magenta"),
}
CURSOR = Style(reverse=True, bold=True)
STEP = Binding.Group("previous / next mapping in the region")
REGION = Binding.Group("previous / next region")
LINES_PER_REGION = 3


def bar_cells(region: RegionView, start: int, span: int, width: int) -> list[int]:
    """What each of `width` cells over [start, start+span) holds. Any overlap marks a
    cell, so a 4 KiB mapping stays visible in a 1 GiB region. Two bisections per cell
    and kind: 65,536 mappings cost no more than 16."""
    if width <= 0 or span <= 0:
        return [FREE] * max(0, width)
    rw_s, rw_e, ro_s, ro_e = region.by_access
    cells = []
    for c in range(width):
        a = start + c * span // width
        b = max(a + 1, start + (c + 1) * span // width)
        kind = FREE
        i = bisect_right(rw_e, a)  # the first read-write mapping that ends past a
        if i < len(rw_s) and rw_s[i] < b:
            kind |= RW
        i = bisect_right(ro_e, a)
        if i < len(ro_s) and ro_s[i] < b:
            kind |= RO
        cells.append(kind)
    return cells


class RegionMap(Widget, can_focus=True):
    """One bar per region, mapped ranges drawn in place, a cursor that walks the
    mappings, and a zoom around it."""

    # The tooltips are the help screen's descriptions; a group is one row there.
    BINDINGS = [
        Binding("left", "step(-1)", "Prev mapping", show=False, group=STEP),
        Binding("right", "step(1)", "Next mapping", show=False, group=STEP),
        Binding("up", "region(-1)", "Prev region", show=False, group=REGION),
        Binding("down", "region(1)", "Next region", show=False, group=REGION),
        Binding("plus,equals_sign", "zoom(0.5)", "Zoom in", tooltip="zoom in around the cursor"),
        Binding("minus", "zoom(2)", "Zoom out", tooltip="zoom out"),
        Binding("0", "zoom_reset", "Whole region", show=False, tooltip="show the whole region"),
    ]

    selected = reactive(0)

    class Selected(Message):
        """The cursor moved: region and mapping offset (None: no mapping)."""

        def __init__(self, shmid: int | None, offset: int | None) -> None:
            super().__init__()
            self.shmid = shmid
            self.offset = offset

    def __init__(self, model: PairModel, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.views: dict[int, tuple[int, int]] = {}  # shmid -> (start, span)
        self.cursor: dict[int, int | None] = {}
        self._cache: dict[int, tuple[tuple, list[int]]] = {}

    # ------------------------------------------------------------ state

    @property
    def shmids(self) -> list[int]:
        return sorted(self.model.regions)

    @property
    def current(self) -> RegionView | None:
        ids = self.shmids
        if not ids:
            return None
        return self.model.regions[ids[min(self.selected, len(ids) - 1)]]

    def view_of(self, region: RegionView) -> tuple[int, int]:
        start, span = self.views.get(region.shmid, (0, region.size))
        span = min(span, region.size)
        return max(0, min(start, region.size - span)), span

    def cursor_of(self, region: RegionView) -> Mapping | None:
        offset = self.cursor.get(region.shmid)
        return region.mappings.get(offset) if offset is not None else None

    def select(self, shmid: int, offset: int | None) -> None:
        if shmid in self.model.regions:
            self.selected = self.shmids.index(shmid)
            self.cursor[shmid] = offset
            self._follow(self.model.regions[shmid])
            self.refresh()

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return max(1, len(self.model.regions) * LINES_PER_REGION)

    # ------------------------------------------------------------ actions

    def _announce(self) -> None:
        region = self.current
        offset = self.cursor.get(region.shmid) if region else None
        self.post_message(self.Selected(region.shmid if region else None, offset))

    def action_step(self, step: int) -> None:
        region = self.current
        if region is None:
            return
        self.cursor[region.shmid] = region.neighbour(self.cursor.get(region.shmid), step)
        self._follow(region)
        self.refresh()
        self._announce()

    def action_region(self, step: int) -> None:
        if self.model.regions:
            self.selected = (self.selected + step) % len(self.model.regions)
            self._announce()

    def action_zoom(self, factor: float) -> None:
        region = self.current
        if region is None:
            return
        start, span = self.view_of(region)
        width = max(1, self.size.width - 2)
        new_span = int(min(region.size, max(width * PAGE_SIZE, span * factor)))
        m = self.cursor_of(region)
        centre = (m.shm_offset + m.len // 2) if m else start + span // 2
        self.views[region.shmid] = (max(0, centre - new_span // 2), new_span)
        self.refresh()

    def action_zoom_reset(self) -> None:
        region = self.current
        if region is not None:
            self.views.pop(region.shmid, None)
            self.refresh()

    def _follow(self, region: RegionView) -> None:
        """Keep the cursor's mapping inside the zoomed view."""
        m = self.cursor_of(region)
        if m is None:
            return
        start, span = self.view_of(region)
        if m.shm_offset < start or m.shm_offset >= start + span:
            self.views[region.shmid] = (max(0, m.shm_offset - span // 4), span)

    def watch_selected(self) -> None:
        self.refresh()

    # ------------------------------------------------------------ drawing

    def _cells(self, region: RegionView, width: int) -> list[int]:
        start, span = self.view_of(region)
        key = (region.version, start, span, width)
        cached = self._cache.get(region.shmid)
        if cached is None or cached[0] != key:
            cached = (key, bar_cells(region, start, span, width))
            self._cache[region.shmid] = cached
        return cached[1]

    def render_line(self, y: int) -> Strip:
        ids = self.shmids
        index, row = divmod(y, LINES_PER_REGION)
        width = self.size.width
        if index >= len(ids):
            return Strip.blank(width)
        region = self.model.regions[ids[index]]
        chosen = index == min(self.selected, len(ids) - 1)
        start, span = self.view_of(region)
        if row == 0:
            zoom = region.size / span if span else 1
            text = Text.assemble(
                ("▶ " if chosen else "  ", "bold" if chosen else ""),
                (f"region {region.shmid}", "bold"),
                f"  {human_size(region.size)}  {len(region.mappings)} mappings, "
                f"{human_size(region.mapped_bytes)} mapped",
                ("  (first page of a longer table)" if region.truncated else "", "dim"),
                (f"  zoom {zoom:g}x" if zoom > 1 else "", "cyan"),
            )
            return Strip(list(text.render(self.app.console))).adjust_cell_length(width)
        if row == 1:
            bar_width = max(1, width - 2)
            cells = self._cells(region, bar_width)
            cur = self.cursor_of(region) if chosen else None
            lo = hi = -1
            if cur is not None:
                a = max(cur.shm_offset, start) - start
                b = min(cur.end, start + span) - start - 1
                if b >= 0 and a < span:
                    lo, hi = a * bar_width // span, min(bar_width - 1, b * bar_width // span)
            segments = [Segment("▕" if chosen else " ")]
            run_start = 0
            for c in range(1, bar_width + 1):
                if c in (bar_width, lo, hi + 1) or cells[c] != cells[run_start]:
                    kind = cells[run_start]
                    style = STYLES[kind] + CURSOR if lo <= run_start <= hi else STYLES[kind]
                    segments.append(Segment(GLYPHS[kind] * (c - run_start), style))
                    run_start = c
            segments.append(Segment("▏" if chosen else " "))
            return Strip(segments, width)
        left, right = f"{start:#x}", f"{start + span:#x}"
        cur = self.cursor_of(region) if chosen else None
        middle = (
            f" {hex_range(cur.shm_offset, cur.len)} {'rw' if cur.writable else 'ro'} "
            if cur
            else ""
        )
        gap = max(1, width - 2 - len(left) - len(right) - len(middle))
        text = Text.assemble(
            " ", (left, "dim"), " " * (gap // 2), (middle, "bold reverse"), " " * (gap - gap // 2),
            (right, "dim"),
        )  # fmt: skip
        return Strip(list(text.render(self.app.console))).adjust_cell_length(width)


class MappingsTable(DataTable):
    """The selected region's mappings: sortable, filterable, capped for huge regions."""

    MAX_ROWS = 2000
    COLUMNS = ("offset", "length", "fd offset", "access", "file", "age")

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.zebra_stripes = True
        for name in self.COLUMNS:
            self.add_column(name, key=name)
        self.sort_key = "offset"
        self.sort_reverse = False
        self.filter_text = ""
        self.shown: tuple = ()

    def show(self, region: RegionView | None, around: int | None = None) -> None:
        # Ages tick every second; re-listing a huge region each second would not be free,
        # so a region larger than one screenful of rows refreshes on change only.
        tick = int(time.time()) if region and len(region.mappings) <= self.MAX_ROWS else 0
        key = (
            region.shmid if region else None, region.version if region else None,
            self.filter_text, self.sort_key, self.sort_reverse, tick, around,
        )  # fmt: skip
        if key == self.shown:
            return
        self.shown = key
        self.clear()
        if region is None:
            return
        now = time.time()

        def cells(m: Mapping) -> tuple[str, ...]:
            return (
                f"{m.shm_offset:#x}", human_size(m.len), f"{m.fd_offset:#x}",
                "rw" if m.writable else "ro", m.file or "?", f"{now - m.created:.0f}s",
            )  # fmt: skip

        text = self.filter_text
        matches = (lambda m: text in " ".join(cells(m))) if text else None
        shown, total = region.rows(
            sort=self.sort_key, reverse=self.sort_reverse, matches=matches, around=around,
            limit=self.MAX_ROWS,
        )  # fmt: skip
        for m in shown:
            self.add_row(*cells(m), key=str(m.shm_offset))
        self.border_subtitle = (
            f"{len(shown)} of {total} shown" if total > len(shown) else f"{total} mappings"
        ) + (f" matching {text!r}" if text else "")
        if around is not None and str(around) in self.rows:
            self.move_cursor(row=self.get_row_index(str(around)))


def _side_line(model: PairModel, role: str) -> Text:
    side = model.sides[role]
    label = {"frontend": "front-end", "backend": "back-end ", "tap": "tap"}[role]
    if not side.reachable:
        wait = max(0, side.retry_at - time.time())
        return Text.assemble(
            (f"{label} ", "bold"), ("not answering", "bold red"),
            f" — {side.error}; retrying in {wait:.0f}s" if side.error else "",
        )  # fmt: skip
    st = side.status or {}
    state = st.get("state", "?")
    colour = "green" if state == "connected" else "yellow"
    extra = ""
    if role == "frontend" and state == "reconnecting":
        extra = f" (next try in {max(0, side.reconnect_at - time.time()):.0f}s)"
    neg = st.get("negotiated", {})
    features = ",".join(neg.get("protocol_features", [])) or "none"
    pid = st.get("process", {}).get("pid", "?")
    # a front-end that behaves as another VMM does says which (shmemctl frontend --profile)
    profile = st.get("profile", "strict")
    behaves = "" if profile == "strict" else f"as {profile} "
    return Text.assemble(
        (f"{label} ", "bold"), f"pid {pid} ", (behaves, "bold magenta"), (state + extra, colour),
        f"  SHMEM bit {st.get('shmem_bit', '?')}  ", (features, "dim"),
    )  # fmt: skip


def program(cmdline: list[str]) -> str:
    """What a process runs, for people: the module of `python -m MODULE`, the script a
    Python runs, else the executable's name."""
    if not cmdline:
        return "?"
    exe = cmdline[0].rsplit("/", 1)[-1]
    if exe.startswith("python"):
        args = cmdline[1:]
        if "-m" in args[:-1]:
            return args[args.index("-m") + 1]
        script = next((a for a in args if not a.startswith("-")), None)
        if script:
            return script.rsplit("/", 1)[-1]
    return exe


def _peer_name(facts: dict[str, Any] | None) -> str:
    """A peer's pid and program, as a tap's status names it."""
    if not facts:
        return "not attached"
    error = f" ({facts['error']})" if "error" in facts else ""
    return f"pid {facts.get('pid')} {program(facts.get('cmdline') or [])}{error}"


def _tap_lines(model: PairModel) -> list[Text]:
    """A tapped pair: who is on each side, then the tap itself."""
    side = model.sides["tap"]
    if not side.reachable:
        return [_side_line(model, "tap")]
    st = side.status or {}
    sides = st.get("sides", {})
    peers = []
    for name in ("front-end", "back-end"):
        facts = sides.get(name, {}).get("process") if sides.get(name, {}).get("attached") else None
        peers += [(f"{name} ", "bold"), (_peer_name(facts), "green" if facts else "yellow")]
        if name == "front-end":
            peers.append(("  ⇄ tap ⇄  ", "dim"))
    neg = st.get("negotiated", {})
    features = ",".join(neg.get("protocol_features") or []) or "none seen"
    tap = Text.assemble(
        ("tap ", "bold"), f"pid {st.get('process', {}).get('pid', '?')} ",
        (f"{st.get('state', '?')} (connection {st.get('connection', 0)})", "cyan"),
        f"  SHMEM bit {st.get('shmem_bit', '?')}  ", (features, "dim"),
    )  # fmt: skip
    return [Text.assemble(*peers), tap]


class ConnectionHeader(Static):
    def __init__(self, model: PairModel, roles: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.roles = roles

    def update_view(self, refresh_seconds: float, read_only: bool) -> None:
        if self.roles == ["tap"]:
            lines = _tap_lines(self.model)
            mode = "read-only: a tap only watches the pair  "
        else:
            lines = [_side_line(self.model, role) for role in self.roles]
            mode = "read-only  " if read_only else ""
        lines.append(Text(f"{mode}polling every {refresh_seconds:g}s", style="dim"))
        joined = Text("\n", no_wrap=True, overflow="ellipsis").join(lines)
        joined.no_wrap, joined.overflow = True, "ellipsis"  # one line per side, however narrow
        self.update(joined)


class ProcessPanel(Static):
    def __init__(self, model: PairModel, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model

    def update_view(self) -> None:
        if "tap" in self.model.sides:
            self.update(_tap_panel(self.model))
            return
        out = Text(no_wrap=True, overflow="ellipsis")
        for role, side in self.model.sides.items():
            facts = (side.status or {}).get("process") if side.reachable else None
            _process_line(out, "front-end" if role == "frontend" else "back-end", facts)
        _mapped_line(out, self.model)
        fe = self.model.sides["frontend"]
        problems = (fe.status or {}).get("disagreements", []) if fe.reachable else []
        if problems:
            _findings(out, "table", problems)
        elif fe.reachable and self.model.regions:
            out.append("✓ table = /proc/PID/maps", "green")
        self.update(out)


def _process_line(out: Text, name: str, facts: dict[str, Any] | None) -> None:
    """A process's RSS and fds, or a dash (and why, when its status says)."""
    if not facts or facts.get("rss") is None:
        why = (facts or {}).get("error", "")
        out.append(f"{name:9} —{f' {why}' if why else ''}\n", style="dim")
        return
    out.append(f"{name:9} {mib(facts['rss']):>6} {facts['fds']:3} fds\n")


def _mapped_line(out: Text, model: PairModel) -> None:
    mapped = sum(r.mapped_bytes for r in model.regions.values())
    out.append(f"mapped    {human_size(mapped)} in {model.mapping_count}\n")


def _findings(out: Text, what: str, lines: list[str]) -> None:
    """`what` (the front-end's table, the tap's picture) disagrees with /proc: how often,
    and the first few lines of it."""
    out.append(f"⚠ {what} ≠ /proc maps: {len(lines)}\n", "bold red")
    for line in lines[:3]:
        out.append(f"  {line}\n", "red")


def _tap_panel(model: PairModel) -> Text:
    """Both peers' and the tap's processes, what is mapped, the /proc verdict and the
    broken rules, as the tap's status says."""
    out = Text(no_wrap=True, overflow="ellipsis")
    side = model.sides["tap"]
    st = (side.status or {}) if side.reachable else {}
    for name in ("front-end", "back-end"):
        _process_line(out, name, st.get("sides", {}).get(name, {}).get("process"))
    _process_line(out, "tap", st.get("process"))
    _mapped_line(out, model)
    truth = st.get("truth", {})
    verdict = truth.get("verdict")
    if verdict == "agree":
        out.append("✓ picture = front-end's /proc/PID/maps\n", "green")
    elif verdict == "disagree":
        _findings(out, "picture", truth.get("findings", []))
    elif verdict:
        out.append(f"? /proc unknown: {truth.get('why', '')}\n", "yellow")
    broken = st.get("violations", {})
    if broken:
        total = sum(broken.values())
        out.append(f"⚠ {total} broken rules: ", VIOLATION)
        out.append(per_rule(broken), "bold red")
    elif st:
        out.append("no broken rule seen", "green")
    return out


REFUSED = Style(color="red")
#: a broken rule: the one entry that must not scroll by unnoticed among thousands
VIOLATION = Style(color="white", bgcolor="red", bold=True)
SIDE = Style(color="cyan")
DIFFERS = Style(color="yellow", bold=True)
STAMP = Style(dim=True)
INDENT = 2


def entry_lines(entry: LogEntry, width: int) -> list[Strip]:
    """An entry as the log draws it in `width` cells: what happened, then who said it and
    when; broken between words, lines after the first indented so that one entry does
    not read as several. (A hand-made wrap: Rich's costs several times as much, and a
    burst brings hundreds of entries per tick.)"""
    style = (
        VIOLATION if entry.text.startswith("VIOLATION")
        else REFUSED if entry.text.startswith(Event.REFUSED) else None
    )  # fmt: skip
    who = DIFFERS if entry.differs else SIDE
    stamp = time.strftime("%H:%M:%S", time.localtime(entry.timestamp))
    words = [(1, word, style) for word in entry.text.split()]
    words += [(2 if i == 0 else 1, word, who) for i, word in enumerate(entry.who.split())]
    words.append((1, stamp, STAMP))
    indent = INDENT if width > INDENT + 8 else 0
    lines: list[Strip] = []
    segments: list[Segment] = []
    run, run_style = "", style  # text in one style not yet made a segment
    col = start = 0  # the cell reached; where this line's words begin

    def new_line() -> None:
        nonlocal segments, run, col, start
        if run:
            segments.append(Segment(run, run_style))
        lines.append(Strip(segments, col))
        segments, run = [Segment(" " * indent)] if indent else [], ""
        col = start = indent

    for gap, word, word_style in words:
        size = len(word) if word.isascii() else cell_len(word)
        if col > start:
            if col + gap + size > width:
                new_line()
            else:
                run += " " * gap
                col += gap
        if word_style is not run_style:
            if run:
                segments.append(Segment(run, run_style))
            run, run_style = "", word_style
        while col + size > width:  # longer than a line: folded
            cut = width - col
            while cell_len(word[:cut]) > width - col:
                cut -= 1
            run += word[:cut]
            col += cell_len(word[:cut])
            word = word[cut:]
            size = cell_len(word)
            new_line()
        run += word
        col += size
    if run:
        segments.append(Segment(run, run_style))
    lines.append(Strip(segments, col))
    return lines


class EventLogView(ScrollView, can_focus=True):
    """The event log, wrapped to the panel's width: what happened first, then who said
    it and when. An entry the model changes in place (the other side's report of the
    same request arrived) is redrawn in place."""

    def __init__(self, log: EventLog, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.events = log
        self._lines: list[Strip] = []
        # an entry's serial -> (its version, the width, its lines)
        self._wrapped: dict[int, tuple[int, int, list[Strip]]] = {}
        self._shown = (-1, -1)

    def on_resize(self) -> None:
        self.update_view()

    def update_view(self) -> None:
        """Follow the model's log (cheap when nothing changed)."""
        width = self.scrollable_content_region.width
        if width <= 0 or self._shown == (self.events.version, width):
            return
        self._shown = (self.events.version, width)
        following = self.scroll_offset.y >= self.max_scroll_y
        wrapped: dict[int, tuple[int, int, list[Strip]]] = {}
        lines: list[Strip] = []
        for entry in self.events.entries:
            cached = self._wrapped.get(entry.serial)
            if cached is None or cached[:2] != (entry.version, width):
                cached = (entry.version, width, entry_lines(entry, width))
            wrapped[entry.serial] = cached
            lines.extend(cached[2])
        self._wrapped = wrapped
        self._lines = lines
        self.virtual_size = Size(width, len(lines))
        if following:
            self.scroll_end(animate=False, x_axis=False)
        self.refresh()

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        index = self.scroll_offset.y + y
        line = self._lines[index] if index < len(self._lines) else Strip.blank(width)
        return line.crop_extend(0, width, None).apply_style(self.rich_style)
