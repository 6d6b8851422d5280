"""`shmemctl tui`: the live administration console for a pair.

It talks to the daemons' control sockets only. Events arrive on subscriptions
and are drained ten times a second, so a burst costs one redraw; the process
panel is polled at a rate the operator sets.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input

from shmemctl import rundir
from shmemctl.control import ControlError, DaemonUnreachable
from shmemctl.inventory import brief, kind_of
from shmemctl.sizes import hex_range

from .model import REGION_CHANGES, PairModel
from .pairs import PairList
from .screens import ConfigScreen, Confirm, HelpScreen, MapForm
from .source import DaemonLink, call
from .widgets import ConnectionHeader, EventLogView, MappingsTable, ProcessPanel, RegionMap

MUTATING = {"map", "unmap", "reset"}
REFRESH_STEPS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
POLL_RATE = Binding.Group("poll the process panel slower / faster")


class ShmemConsole(App[str | None]):
    # anchored here: a relative path would follow any subclass into its own folder
    CSS_PATH = Path(__file__).with_name("shmemctl.tcss")
    TITLE = "shmemctl"
    # The tooltips are the help screen's descriptions; a group is one row there.
    BINDINGS = [
        Binding("m", "map", "Map", tooltip="map a buffer (a form checked as you type)"),
        Binding("u", "unmap", "Unmap", tooltip="unmap the selected mapping (asks first)"),
        Binding("r", "reset", "Reset", tooltip="reset the device: every mapping dropped (asks)"),
        Binding("c", "config", "Config",
                tooltip="GET_SHMEM_CONFIG beside what the front-end reserved"),
        Binding("t", "toggle_trace", "Trace", tooltip="the protocol trace in the log, on / off"),
        Binding("slash", "filter", "Filter", tooltip="filter the mappings by any text in a row"),
        Binding("s", "sort", "Sort", tooltip="sort the mappings by the next column"),
        Binding("left_square_bracket", "rate(1)", "Slower", show=False, group=POLL_RATE),
        Binding("right_square_bracket", "rate(-1)", "Faster", show=False, group=POLL_RATE),
        Binding("question_mark", "help", "Help", tooltip="this list"),
        Binding("q", "quit", "Quit", tooltip="quit the console (the pair stays up)"),
    ]  # fmt: skip

    def __init__(
        self,
        frontend: str | None,
        backend: str | None,
        *,
        tap: str | None = None,
        read_only: bool = False,
        refresh_seconds: float = 1.0,
        name: str = "",
        back: bool = False,
    ) -> None:
        """A pair's console on its daemons' control sockets, or a tap's (`tap`: its
        control socket; read-only, as the tap changes nothing). `back`: escape leaves
        with "back" (the list of pairs opened this one)."""
        super().__init__()
        self.sockets = {"frontend": frontend, "backend": backend, "tap": tap}
        self.roles = [r for r, path in self.sockets.items() if path]
        self.read_only = read_only or tap is not None
        self.refresh_seconds = refresh_seconds
        self.back = back
        self.model = PairModel(("tap",)) if tap is not None else PairModel()
        if name:
            self.sub_title = f"tap {name}" if tap is not None else f"pair {name}"
        self.inbox: deque[tuple[str, str, Any]] = deque()
        self.links: dict[str, DaemonLink] = {}
        self.trace = False
        self._polling = threading.Lock()

    # ------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield ConnectionHeader(self.model, self.roles, id="header")
        yield RegionMap(self.model, id="map")
        with Horizontal(id="lower"):
            yield MappingsTable(id="table")
            with Vertical(id="side"):
                yield ProcessPanel(self.model, id="process")
                yield EventLogView(self.model.log, id="log")
        yield Input(placeholder="filter mappings (enter to keep, esc to clear)", id="filter")
        yield Footer()

    def on_mount(self) -> None:
        # Held, not queried per event: a message can still arrive while the app tears down.
        self.region_map = self.query_one("#map", RegionMap)
        self.table = self.query_one("#table", MappingsTable)
        self.log_view = self.query_one("#log", EventLogView)
        self.header = self.query_one("#header", ConnectionHeader)
        self.process = self.query_one("#process", ProcessPanel)
        self.filter_box = self.query_one("#filter", Input)
        self.table.border_title = "mappings"
        self.log_view.border_title = "events"
        self.filter_box.display = False
        self.start_links()
        self.set_interval(0.1, self.drain)
        self._poll_timer = self.set_interval(self.refresh_seconds, self.poll)
        self.region_map.focus()
        self._redraw(regions=True)

    def start_links(self) -> None:
        """Open a subscription to each daemon; their answers arrive through `_sink`."""
        for role in self.roles:
            link = DaemonLink(role, self.sockets[role], self._sink)  # type: ignore[arg-type]
            self.links[role] = link
            link.start()

    def on_unmount(self) -> None:
        for link in self.links.values():
            link.stop()

    # ------------------------------------------------------------ data in

    def _sink(self, role: str, kind: str, payload: Any) -> None:
        self.inbox.append((role, kind, payload))  # any thread; drained on the UI's clock

    def drain(self) -> None:
        """Apply everything that arrived since the last tick, then redraw once."""
        if not self.inbox:
            self._redraw(regions=False)
            return
        log = self.model.log
        regions = False
        while self.inbox:
            role, kind, payload = self.inbox.popleft()
            side = self.model.sides[role]
            if kind == "status":
                side.reachable, side.error = True, ""
                {"frontend": self.model.load_frontend, "backend": self.model.load_backend,
                 "tap": self.model.load_tap}[role](payload)  # fmt: skip
                regions = True
                log.note(role, "connected to its control socket")
            elif kind == "poll":
                self.model.poll_update(role, payload)
                regions = regions or role == "tap"  # a tap's poll is its whole picture
            elif kind == "down":
                was = side.reachable
                side.reachable, side.error = False, payload[0]
                side.retry_at = payload[1]
                if was:
                    again = "the tap (shmemctl tap)" if role == "tap" else "the pair (shmemctl up)"
                    self.notify(
                        f"the {role} stopped answering: {payload[0]}. Start {again} again "
                        "or check its log; retrying.",
                        severity="error",
                    )
            elif kind == "event":
                self.model.apply(role, payload)
                regions = regions or payload["event"] in REGION_CHANGES
                log.add(role, payload)
        self._redraw(regions=regions)

    def _redraw(self, *, regions: bool) -> None:
        self.header.update_view(self.refresh_seconds, self.read_only)
        self.process.update_view()
        self.log_view.update_view()
        region_map = self.region_map
        if regions:
            region_map.refresh(layout=True)
        region = region_map.current
        around = region_map.cursor.get(region.shmid) if region else None
        self.table.show(region, around)

    @work(thread=True, exclusive=True, group="poll")
    def poll(self) -> None:
        for role in self.roles:
            if not self.model.sides[role].reachable:
                continue
            try:
                answer = call(self.sockets[role], role, "query-status", **brief(role))  # type: ignore[arg-type]
                self._sink(role, "poll", answer)
            except (ControlError, DaemonUnreachable, OSError):
                pass  # the link notices a daemon that went away, and reports it
            except Exception as exc:  # never a crash: say it and carry on
                self.call_from_thread(self.notify, f"polling the {role} failed: {exc!r}",
                                      severity="error")  # fmt: skip

    # ------------------------------------------------------------ selection

    @on(RegionMap.Selected)
    def _map_moved(self, event: RegionMap.Selected) -> None:
        region = self.model.regions.get(event.shmid) if event.shmid is not None else None
        self.table.show(region, event.offset)

    @on(DataTable.RowHighlighted, "#table")
    def _row_moved(self, event: DataTable.RowHighlighted) -> None:
        region_map = self.region_map
        region = region_map.current
        # has_focus, not app.focused: a highlight can still arrive while the app tears
        # down, and then there is no screen to ask
        if region is not None and event.row_key.value is not None and event.data_table.has_focus:
            region_map.select(region.shmid, int(event.row_key.value))

    @on(DataTable.HeaderSelected, "#table")
    def _sort_by(self, event: DataTable.HeaderSelected) -> None:
        table = self.table
        key = str(event.column_key.value)
        table.sort_reverse = not table.sort_reverse if table.sort_key == key else False
        table.sort_key = key
        self._redraw(regions=False)

    # ------------------------------------------------------------ actions

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in MUTATING and self.read_only:
            return False  # hidden from the footer, the palette and the keys
        owner = "frontend" if action in ("reset", "config") else "backend"
        return not (action in (*MUTATING, "config") and not self.sockets[owner])

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        entries: list[tuple[str, str, str, Callable[[], object]]] = [
            ("map", "Map a buffer", "open the map form", self.action_map),
            ("unmap", "Unmap the selected mapping", "asks first", self.action_unmap),
            ("reset", "Reset the device", "drops every mapping; asks first", self.action_reset),
            ("config", "GET_SHMEM_CONFIG", "ask the back-end for its layout", self.action_config),
            ("toggle_trace", "Toggle the protocol trace", "every message, both channels",
             self.action_toggle_trace),
            ("filter", "Filter mappings", "by any text in a row", self.action_filter),
            ("help", "Keys", "every binding", self.action_help),
        ]  # fmt: skip
        for action, title, help_text, callback in entries:
            if self.check_action(action, ()):
                yield SystemCommand(title, help_text, callback)

    def _selected(self) -> tuple[int, Any]:
        region_map = self.region_map
        region = region_map.current
        if region is None:
            return -1, None
        return region.shmid, region_map.cursor_of(region)

    def action_map(self) -> None:
        region_map = self.region_map
        region = region_map.current
        if region is None:
            self.notify(
                "no region to map into yet: is the front-end connected?", severity="warning"
            )
            return
        m = region_map.cursor_of(region)
        spot = region.free_spot(64 << 10, m.end if m else 0) or region.free_spot(64 << 10) or 0
        backend = self.sockets["backend"]
        assert backend is not None
        self.push_screen(MapForm(self.model, region.shmid, spot,
                                 lambda req: call(backend, "backend", "map", **req)))  # fmt: skip

    def action_unmap(self) -> None:
        shmid, m = self._selected()
        if m is None:
            self.notify("select a mapping first (←/→ on the map, or the table)", severity="warning")
            return
        question = f"Unmap {hex_range(m.shm_offset, m.len)} from region {shmid}?"

        def answer(yes: bool | None) -> None:
            if yes:
                self._run("backend", "unmap", f"unmapped {hex_range(m.shm_offset, m.len)}",
                          shmid=shmid, shm_offset=m.shm_offset, len=m.len)  # fmt: skip

        self.push_screen(Confirm(question), answer)

    def action_reset(self) -> None:
        count = self.model.mapping_count
        question = f"Reset the device? The front-end drops all {count} mappings."

        def answer(yes: bool | None) -> None:
            if yes:
                self._run("frontend", "reset", "device reset")

        self.push_screen(Confirm(question), answer)

    @work(thread=True)
    def _run(self, role: str, command: str, done: str, **arguments: Any) -> None:
        try:
            answer = call(self.sockets[role], role, command, **arguments)  # type: ignore[arg-type]
        except ControlError as exc:
            self.call_from_thread(self.notify, exc.desc, severity="error", timeout=8)
        except DaemonUnreachable as exc:
            self.call_from_thread(self.notify, f"{exc}; is the pair up?", severity="error")
        except Exception as exc:  # never a crash: say it and carry on
            self.call_from_thread(self.notify, f"{command} failed: {exc!r}", severity="error")
        else:
            extra = (
                f": dropped {answer['dropped']} via {answer['via']}" if command == "reset" else ""
            )
            self.call_from_thread(self.notify, done + extra)

    @work(thread=True, exclusive=True, group="config")
    def action_config(self) -> None:
        try:
            answer = call(self.sockets["frontend"], "frontend", "get-shmem-config")  # type: ignore[arg-type]
        except Exception as exc:  # refused, unreachable or worse: a notice, never a crash
            self.call_from_thread(self.notify, str(getattr(exc, "desc", exc)), severity="error")
        else:
            self.call_from_thread(self.push_screen, ConfigScreen(answer))

    def action_toggle_trace(self) -> None:
        self.trace = not self.trace
        for link in self.links.values():
            link.resubscribe(self.trace)
        log = self.log_view
        log.border_title = "events + protocol trace" if self.trace else "events"
        self.notify("protocol trace on" if self.trace else "protocol trace off")

    def action_filter(self) -> None:
        box = self.filter_box
        box.display = True
        box.focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.table.filter_text = event.value.strip()
        self._redraw(regions=False)

    @on(Input.Submitted, "#filter")
    def _filter_done(self) -> None:
        self.filter_box.display = False
        self.region_map.focus()

    def key_escape(self) -> None:
        box = self.filter_box
        if box.display:
            box.value = ""
            box.display = False
            self.region_map.focus()
        elif self.back:
            self.exit("back")

    def action_sort(self) -> None:
        table = self.table
        keys = list(MappingsTable.COLUMNS)
        table.sort_key = keys[(keys.index(table.sort_key) + 1) % len(keys)]
        self.notify(f"sorted by {table.sort_key}")
        self._redraw(regions=False)

    def action_rate(self, step: int) -> None:
        i = min(
            range(len(REFRESH_STEPS)), key=lambda k: abs(REFRESH_STEPS[k] - self.refresh_seconds)
        )
        self.refresh_seconds = REFRESH_STEPS[min(max(i + step, 0), len(REFRESH_STEPS) - 1)]
        self._poll_timer.stop()
        self._poll_timer = self.set_interval(self.refresh_seconds, self.poll)
        self._redraw(regions=False)

    def help_rows(self) -> list[tuple[str, str]]:
        """(keys, what they do) for every binding the operator may use here, keys as
        Textual displays them; the bindings of a group share a row."""
        bindings = [*Binding.make_bindings(RegionMap.BINDINGS)]
        bindings += [
            b for b in Binding.make_bindings(self.BINDINGS)
            if self.check_action(b.action.split("(")[0], ())
        ]  # fmt: skip
        rows: list[tuple[str, str]] = []
        last: Binding | None = None
        for b in bindings:
            if last is not None and b.action == last.action:
                continue  # another key for the same action (= beside +): the first will do
            if b.group is not None and last is not None and b.group == last.group:
                rows[-1] = (f"{rows[-1][0]} {self.get_key_display(b)}", b.group.description)
            else:
                rows.append((self.get_key_display(b), b.tooltip or b.description))
            last = b
        palette = Binding(self.COMMAND_PALETTE_BINDING, "command_palette")
        rows.append((self.get_key_display(palette), "every action, in the command palette"))
        rows.append(("tab", "move between the map, the table and the log"))
        if self.back:
            rows.append(("escape", "back to the list of pairs and taps"))
        return rows

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.help_rows()))


def console_for(name: str, *, read_only: bool, refresh: float, back: bool = False) -> ShmemConsole:
    """The console of the pair or tap called `name` in the run directory."""
    paths = rundir.pair(name)
    if kind_of(paths) == "tap":
        return ShmemConsole(None, None, tap=str(paths.control("tap")), refresh_seconds=refresh,
                            name=name, back=back)  # fmt: skip
    return ShmemConsole(str(paths.control("frontend")), str(paths.control("backend")),
                        read_only=read_only, refresh_seconds=refresh, name=name,
                        back=back)  # fmt: skip


def run_console(
    frontend: str | None, backend: str | None, *, read_only: bool, refresh: float
) -> None:
    ShmemConsole(frontend, backend, read_only=read_only, refresh_seconds=refresh).run()


def run_host(*, read_only: bool, refresh: float) -> None:
    """The list of every pair and tap; enter opens one, and escape there comes back."""
    while True:
        name = PairList(refresh_seconds=refresh).run()
        if name is None:
            return
        if console_for(name, read_only=read_only, refresh=refresh, back=True).run() != "back":
            return
