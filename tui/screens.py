"""Modal screens: the map form, confirmations, help, and the GET_SHMEM_CONFIG table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.table import Table
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, DataTable, Input, Label, Static

from shmemctl.control import ControlError, DaemonUnreachable
from shmemctl.sizes import hex_range, human_size, parse_size

from .model import PairModel


class MapForm(ModalScreen[None]):
    """shmid, offset, length, fd offset, read-only; checked against the live region
    as you type; the front-end's answer shown in place."""

    BINDINGS = [Binding("escape", "dismiss", "Cancel")]

    def __init__(
        self, model: PairModel, shmid: int, offset: int, send: Callable[[dict[str, Any]], Any]
    ) -> None:
        super().__init__()
        self.model = model
        self.defaults = (shmid, offset)
        self.send = send
        self.sent: tuple[object, ...] | None = None  # the fields as they were last sent

    def compose(self) -> ComposeResult:
        shmid, offset = self.defaults
        with Vertical(id="form"):
            yield Label("Map a buffer (backend_sim asks, the front-end answers)", id="form-title")
            with Grid(id="fields"):
                yield Label("shmid")
                yield Input(str(shmid), id="shmid")
                yield Label("offset")
                yield Input(f"{offset:#x}", id="offset")
                yield Label("length")
                yield Input("64K", id="length")
                yield Label("fd offset")
                yield Input("0", id="fd_offset")
            yield Checkbox("read-only", id="ro")
            yield Static("", id="verdict")
            with Horizontal(id="buttons"):
                yield Button("Map", variant="primary", id="send")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        for field in self.query(Input):
            field.cursor_blink = False  # steady: a form is read, not watched
        self.check()

    def fields(self) -> tuple[object, ...]:
        read_only = self.query_one("#ro", Checkbox).value
        return (*(field.value for field in self.query(Input)), read_only)

    def values(self) -> tuple[dict[str, Any] | None, str]:
        """The request, or None and what is wrong with the fields."""
        try:
            shmid = int(self.query_one("#shmid", Input).value, 0)
        except ValueError:
            return None, "shmid is a number, e.g. 0"
        try:
            offset = parse_size(self.query_one("#offset", Input).value)
            length = parse_size(self.query_one("#length", Input).value)
            fd_offset = parse_size(self.query_one("#fd_offset", Input).value or "0")
        except ValueError as exc:
            return None, str(exc)
        region = self.model.regions.get(shmid)
        if region is None:
            known = ", ".join(str(s) for s in sorted(self.model.regions)) or "none"
            return None, f"no region {shmid} (regions: {known})"
        problem = region.problem(offset, length, fd_offset)
        if problem:
            return None, problem
        request = {"shmid": shmid, "shm_offset": offset, "len": length}
        if fd_offset:
            request["fd_offset"] = fd_offset
        if self.query_one("#ro", Checkbox).value:
            request["ro"] = True
        return request, f"free: {hex_range(offset, length)} in region {shmid}"

    @on(Input.Changed)
    @on(Checkbox.Changed)
    def check(self) -> None:
        fields = self.fields()
        if fields == self.sent:
            return  # a check of what was sent, come late: the front-end's answer stands
        self.sent = None
        request, message = self.values()
        verdict = self.query_one("#verdict", Static)
        verdict.update(("✓ " if request else "✗ ") + message)
        verdict.set_class(request is None, "bad")
        self.query_one("#send", Button).disabled = request is None

    @on(Button.Pressed, "#cancel")
    def cancel(self) -> None:
        self.dismiss()

    @on(Button.Pressed, "#send")
    @on(Input.Submitted)
    def submit(self) -> None:
        request, _ = self.values()
        if request is not None:
            self.sent = self.fields()
            self.query_one("#send", Button).disabled = True
            self.query_one("#verdict", Static).update("… asking the front-end")
            self.do_map(request)

    @work(thread=True, exclusive=True)
    def do_map(self, request: dict[str, Any]) -> None:
        try:
            answer = self.send(request)
        except (ControlError, DaemonUnreachable) as exc:
            self.app.call_from_thread(self._refused, str(getattr(exc, "desc", exc)))
        except Exception as exc:  # never a crash: the form says it
            self.app.call_from_thread(self._refused, f"failed: {exc!r}")
        else:
            self.app.call_from_thread(self._done, answer)

    def _refused(self, why: str) -> None:
        verdict = self.query_one("#verdict", Static)
        verdict.update(f"✗ {why}")
        verdict.add_class("bad")
        self.query_one("#send", Button).disabled = False

    def _done(self, answer: dict[str, Any]) -> None:
        kind = "rw" if answer.get("flags", 1) & 1 else "ro"
        self.app.notify(
            f"mapped {hex_range(answer['shm_offset'], answer['len'])} in region "
            f"{answer['shmid']} ({kind})"
        )
        self.dismiss()


class Confirm(ModalScreen[bool]):
    BINDINGS = [Binding("escape", "dismiss(False)", "No"), Binding("y", "dismiss(True)", "Yes")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm"):
            yield Static(self.question, id="question")
            with Horizontal(id="buttons"):
                yield Button("Yes (y)", variant="error", id="yes")
                yield Button("No (esc)", id="no")

    @on(Button.Pressed)
    def answer(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "Close")]

    def __init__(self, rows: list[tuple[str, str]]) -> None:
        super().__init__()
        self.rows = rows

    def compose(self) -> ComposeResult:
        # A grid that wraps its descriptions, where a table would cut them at its width.
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold", no_wrap=True)
        table.add_column(ratio=1)
        for key, description in self.rows:
            table.add_row(key, description)
        with VerticalScroll(id="help"):  # scrolls only where a terminal is too short for it
            yield Static("Keys (the mouse works too; esc closes this)", id="help-title")
            yield Static(table, id="help-keys")


class ConfigScreen(ModalScreen[None]):
    """GET_SHMEM_CONFIG as the back-end answers it now, beside what the front-end reserved."""

    BINDINGS = [Binding("escape,c,q", "dismiss", "Close")]

    def __init__(self, answer: dict[str, Any]) -> None:
        super().__init__()
        self.answer = answer

    def compose(self) -> ComposeResult:
        with Vertical(id="config"):
            yield Label(f"GET_SHMEM_CONFIG: nregions {self.answer['nregions']}", id="config-title")
            table: DataTable = DataTable(show_cursor=False)
            table.add_columns("shmid", "size asked", "reserved at", "reserved size", "")
            reserved = self.answer["reserved"]
            for shmid in sorted({*self.answer["sizes"], *reserved}, key=int):
                size = self.answer["sizes"].get(shmid)
                got = reserved.get(shmid)
                same = got is not None and size == got["size"]
                table.add_row(
                    shmid,
                    human_size(size) if size else "—",
                    f"{got['base']:#x}" if got else "—",
                    human_size(got["size"]) if got else "—",
                    "ok" if same else "differs",
                )
            yield table
