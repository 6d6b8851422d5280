"""The console's first screen on a host that runs several pairs and taps: one row each
(what `shmemctl ls` prints), live, sortable and filterable; enter opens one.

The rows come from `shmemctl.inventory`, asked in a worker thread at the poll's pace:
a daemon that hangs delays its row, never the screen.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Input, Static

from shmemctl import rundir
from shmemctl.inventory import HEADER, inventory, row_cells

#: per column (HEADER's order): its key, and how a row sorts by it
COLUMNS: dict[str, Any] = {
    "name": lambda r: r["name"],
    "kind": lambda r: r["kind"],
    "peers": lambda r: row_cells(r)[2],
    "state": lambda r: r["state"],
    "mappings": lambda r: r["mappings"] or 0,
    "mapped": lambda r: r["mapped_bytes"] or 0,
    "violations": lambda r: r["violations"] or 0,
    "verdict": lambda r: r["verdict"] or "",
}


class PairList(App[str | None]):
    """Exits with the name to open, or None to quit."""

    CSS = """
    #title { height: 1; padding: 0 1; background: $boost; }
    #pairs { height: 1fr; }
    #filter { dock: bottom; margin-bottom: 1; }
    #empty { padding: 1 2; color: $text-muted; }
    """
    TITLE = "shmemctl"
    SUB_TITLE = "pairs and taps on this host"
    BINDINGS = [
        Binding("enter", "open", "Open", tooltip="open the selected pair or tap"),
        Binding("s", "sort", "Sort", tooltip="sort by the next column (or click a header)"),
        Binding("slash", "filter", "Filter", tooltip="keep the rows with this text"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, *, refresh_seconds: float = 1.0) -> None:
        super().__init__()
        self.refresh_seconds = refresh_seconds
        self.rows: list[dict[str, Any]] = []
        self.sort_key = "name"
        self.sort_reverse = False
        self.filter_text = ""
        self.loaded = False  # the first inventory has arrived

    def compose(self) -> ComposeResult:
        yield Static(id="title")
        yield DataTable(id="pairs", cursor_type="row", zebra_stripes=True)
        yield Static("looking for pairs and taps…", id="empty")
        yield Input(placeholder="filter (enter to keep, esc to clear)", id="filter")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#pairs", DataTable)
        for key, title in zip(COLUMNS, HEADER, strict=True):
            table.add_column(title, key=key)
        self.query_one("#filter", Input).display = False
        self.poll()
        self.set_interval(self.refresh_seconds, self.poll)
        table.focus()

    @work(thread=True, exclusive=True, group="inventory")
    def poll(self) -> None:
        rows = inventory()
        self.call_from_thread(self.show, rows)

    def show(self, rows: list[dict[str, Any]]) -> None:
        self.rows, self.loaded = rows, True
        self._redraw()

    def shown_rows(self) -> list[dict[str, Any]]:
        """The rows shown: filtered, sorted."""
        text = self.filter_text.lower()
        chosen = [r for r in self.rows if not text or any(text in c.lower() for c in row_cells(r))]
        return sorted(chosen, key=COLUMNS[self.sort_key], reverse=self.sort_reverse)

    def _redraw(self) -> None:
        table = self.query_one("#pairs", DataTable)
        selected = self.selected()
        table.clear()
        shown = self.shown_rows()
        for row in shown:
            table.add_row(*row_cells(row), key=row["name"])
        names = [r["name"] for r in shown]
        if selected in names:
            table.move_cursor(row=names.index(selected))
        empty = self.query_one("#empty", Static)
        empty.display = not shown
        if self.loaded and not shown:
            empty.update("no pair or tap matches the filter" if self.rows
                         else "no pair or tap runs here (shmemctl up, shmemctl tap)")  # fmt: skip
        order = "descending" if self.sort_reverse else "ascending"
        matching = f", {len(shown)} matching {self.filter_text!r}" if self.filter_text else ""
        # Text, not markup: a filter or a path may hold brackets
        self.query_one("#title", Static).update(Text.assemble(
            (f"pairs and taps in {rundir.root()}", "bold"),
            f": {len(self.rows)}{matching}, sorted by {self.sort_key} ({order}) · enter opens one",
        ))  # fmt: skip

    def selected(self) -> str | None:
        table = self.query_one("#pairs", DataTable)
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return None if key is None else str(key)

    def action_open(self) -> None:
        name = self.selected()
        if name is not None:
            self.exit(name)

    @on(DataTable.RowSelected, "#pairs")
    def _chosen(self) -> None:
        self.action_open()

    @on(DataTable.HeaderSelected, "#pairs")
    def _sort_by(self, event: DataTable.HeaderSelected) -> None:
        key = str(event.column_key.value)
        self.sort_reverse = not self.sort_reverse if key == self.sort_key else False
        self.sort_key = key
        self._redraw()

    def action_sort(self) -> None:
        keys = list(COLUMNS)
        self.sort_key = keys[(keys.index(self.sort_key) + 1) % len(keys)]
        self.sort_reverse = False
        self._redraw()

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = True
        box.focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value.strip()
        self._redraw()

    @on(Input.Submitted, "#filter")
    def _filter_done(self) -> None:
        self.query_one("#filter", Input).display = False
        self.query_one("#pairs", DataTable).focus()

    def key_escape(self) -> None:
        box = self.query_one("#filter", Input)
        if box.display:
            box.value = ""
            box.display = False
            self.query_one("#pairs", DataTable).focus()
