"""The console driven with Textual's pilot against a real pair of daemons.

Every wait is on a condition (a model, a screen, a widget in a given state); the
deadline behind it is a last resort, generous for a loaded machine."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import pytest
from textual.geometry import Region
from textual.widget import Widget
from textual.widgets import Button, DataTable, Input
from textual.widgets.data_table import RowKey

from shmemctl.events import Event
from tui.app import ShmemConsole
from tui.screens import ConfigScreen, Confirm, HelpScreen, MapForm
from tui.widgets import EventLogView, MappingsTable, RegionMap

MiB = 1 << 20
#: Only for what never comes: a wait returns as soon as its condition holds.
DEADLINE = 120.0


class Shell:
    def __init__(self, run_dir: str) -> None:
        self.env = {**os.environ, "SHMEMCTL_RUN_DIR": run_dir}
        self.dir = os.path.join(run_dir, "default")

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "shmemctl", *args],
            capture_output=True, text=True, timeout=120, env=self.env, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def ctl(self, role: str) -> str:
        return os.path.join(self.dir, f"{role}.ctl")


@pytest.fixture
def sh(tmp_path):
    shell = Shell(str(tmp_path / "run"))
    done = shell("up", "--regions", "0=64M,2=8M", "--timeout", str(DEADLINE))
    assert done.returncode == 0, done.stderr
    yield shell
    shell("down")


def console(sh: Shell, **kwargs: object) -> ShmemConsole:
    return ShmemConsole(sh.ctl("frontend"), sh.ctl("backend"), **kwargs)  # type: ignore[arg-type]


async def until(pilot, predicate: Callable[[], object], what: str) -> None:
    """Let the app run until `predicate` holds."""
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still not there after {DEADLINE:g}s")
        await pilot.pause(0.02)


def drawn(widget: Widget) -> list[str]:
    """The widget's lines as they are on screen, inside its border."""
    x, y = widget.content_region.offset - widget.region.offset
    return [strip.text for strip in widget.render_lines(Region(x, y, *widget.content_size))]


def verdict(form: MapForm) -> str:
    return str(form.query_one("#verdict").render())


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def bar(app: ShmemConsole, index: int = 0) -> str:
    region_map = app.query_one("#map", RegionMap)
    return region_map.render_line(index * 3 + 1).text


def test_a_map_from_another_shell_appears(sh) -> None:
    async def go() -> None:
        app = console(sh)
        async with app.run_test(size=(100, 32)) as pilot:
            await until(pilot, lambda: app.model.regions, "regions")
            assert set(bar(app)) <= {" ", "·", "▕", "▏"}
            assert sh("map", "0", "0", "1M").returncode == 0
            # the event arrives on the subscription and is drawn at the next tick
            await until(pilot, lambda: "█" in bar(app), "the mapping drawn")
            assert 0 in app.model.regions[0].mappings
            assert sh("map", "2", "0", "64K", "--ro").returncode == 0
            await until(pilot, lambda: "▒" in bar(app, 1), "the read-only mapping")
            table = app.query_one("#table", MappingsTable)
            assert table.row_count == 1  # region 0 is selected
        # A highlight still queued when the app has torn down its screens: no crash.
        app._row_moved(DataTable.RowHighlighted(table, 0, RowKey("0")))

    run(go)


def test_map_form_checks_as_you_type_and_maps(sh) -> None:
    assert sh("map", "0", "0", "1M").returncode == 0

    async def go() -> None:
        app = console(sh)
        async with app.run_test(size=(100, 32)) as pilot:
            await until(pilot, lambda: app.model.regions.get(0) and app.model.regions[0].mappings,
                        "the existing mapping")  # fmt: skip
            await pilot.press("m")
            await until(pilot, lambda: isinstance(app.screen, MapForm), "the map form")
            form = app.screen
            assert form.query_one("#offset", Input).value == "0x100000"  # first free spot
            form.query_one("#offset", Input).value = "0x80000"
            await until(pilot, lambda: "overlaps 0x0+0x100000" in verdict(form), "the overlap")
            assert form.query_one("#send", Button).disabled
            form.query_one("#offset", Input).value = "0x1000"
            form.query_one("#length", Input).value = "100"
            await until(pilot, lambda: "multiples of the page size 0x1000" in verdict(form),
                        "the alignment")
            form.query_one("#offset", Input).value = "4M"
            form.query_one("#length", Input).value = "64K"
            form.query_one("#ro").value = True
            await until(pilot, lambda: "free: 0x400000+0x10000" in verdict(form), "a free range")
            assert not form.query_one("#send", Button).disabled
            await pilot.click("#send")
            await until(pilot, lambda: not isinstance(app.screen, MapForm), "the form to close")
            await until(pilot, lambda: 4 * MiB in app.model.regions[0].mappings, "the new mapping")
            assert app.model.regions[0].mappings[4 * MiB].writable is False

    run(go)
    status = json.loads(sh("status", "--json").stdout)["frontend"]
    assert [m["shm_offset"] for m in status["regions"][0]["mappings"]] == [0, 4 * MiB]


def test_a_refusal_is_shown_in_the_form(sh) -> None:
    async def go() -> None:
        app = console(sh)
        async with app.run_test(size=(100, 32)) as pilot:
            await until(pilot, lambda: app.model.regions, "regions")
            await pilot.press("m")
            await until(pilot, lambda: isinstance(app.screen, MapForm), "the map form")
            form = app.screen
            # A blocking call: the app's loop stands still until the form is sent, so the
            # console's model cannot know of this mapping yet, and the front-end refuses.
            assert sh("map", "0", "0", "64K").returncode == 0
            form.query_one("#offset", Input).value = "0"
            form.submit()
            await until(pilot, lambda: "refused by the front-end" in verdict(form), "the refusal")
            assert "EEXIST" in verdict(form)
            assert isinstance(app.screen, MapForm)
            assert not form.query_one("#send", Button).disabled  # free to try again
            # The check of the edit made before sending may come after the answer (on a
            # loaded machine it did): it must not replace the answer.
            form.check()
            assert "refused by the front-end" in verdict(form)
            form.query_one("#offset", Input).value = "64K"  # an edit is checked again
            await until(pilot, lambda: "free: 0x10000+0x10000" in verdict(form), "a new check")
            await until(pilot, lambda: 0 in app.model.regions[0].mappings, "the mapping's event")
            form.query_one("#offset", Input).value = "0"
            await until(pilot, lambda: "✗ overlaps 0x0+0x10000" in verdict(form), "the overlap")

    run(go)


def test_unmap_and_reset_ask_first(sh) -> None:
    for offset in ("0", "1M", "2M"):
        assert sh("map", "0", offset, "64K").returncode == 0

    async def go() -> None:
        app = console(sh)
        async with app.run_test(size=(100, 32)) as pilot:
            await until(pilot, lambda: app.model.mapping_count == 3, "three mappings")
            await pilot.press("right")  # the cursor on the first mapping
            await pilot.press("u")
            await until(pilot, lambda: isinstance(app.screen, Confirm), "the question")
            assert "Unmap 0x0+0x10000 from region 0?" in str(
                app.screen.query_one("#question").render()
            )
            await pilot.press("escape")  # no: the question closes and nothing is sent
            await until(pilot, lambda: not isinstance(app.screen, Confirm), "the answer")
            assert 0 in app.model.regions[0].mappings
            await pilot.press("u")
            await until(pilot, lambda: isinstance(app.screen, Confirm), "the question")
            await pilot.press("y")
            await until(pilot, lambda: 0 not in app.model.regions[0].mappings, "the unmap")
            await pilot.press("r")
            await until(pilot, lambda: isinstance(app.screen, Confirm), "the reset question")
            assert "drops all 2 mappings" in str(app.screen.query_one("#question").render())
            await pilot.press("y")
            await until(pilot, lambda: app.model.mapping_count == 0, "the reset")

    run(go)


def test_config_and_help(sh) -> None:
    async def go() -> None:
        app = console(sh)
        async with app.run_test(size=(100, 32)) as pilot:
            await until(pilot, lambda: app.model.regions, "regions")
            await pilot.press("c")
            await until(pilot, lambda: isinstance(app.screen, ConfigScreen), "the config table")
            assert app.screen.answer["sizes"] == {"0": 64 * MiB, "2": 8 * MiB}
            await pilot.press("escape")
            await pilot.press("question_mark")
            await until(pilot, lambda: isinstance(app.screen, HelpScreen), "help")
            keys = {k for k, _ in app.screen.rows}
            assert {"m", "u", "r", "c", "t", "/", "q", "← →", "+", "-"} <= keys

    run(go)


def test_help_names_each_key_once_as_typed_and_in_full(sh) -> None:
    async def go() -> None:
        app = console(sh)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("question_mark")
            await until(pilot, lambda: isinstance(app.screen, HelpScreen), "help")
            rows = app.screen.rows
            keys = [k for k, _ in rows]
            assert len(keys) == len(set(keys)), keys  # no row twice
            assert {"/", "?", "[ ]", "← →", "↑ ↓", "^p"} <= set(keys)
            assert not [k for k in keys if "_" in k or len(k.split()[0]) > 3], keys
            # every description whole on an 80-column terminal: wrapped, never cut
            shown = " ".join(" ".join(drawn(app.screen.query_one("#help-keys"))).split())
            for key, description in rows:
                assert f"{key} {description.split()[0]}" in shown
                assert " ".join(description.split()) in shown

    run(go)


def test_read_only_hides_every_mutating_action(sh) -> None:
    async def go() -> None:
        app = console(sh, read_only=True)
        async with app.run_test(size=(100, 32)) as pilot:
            await until(pilot, lambda: app.model.regions, "regions")
            for key in ("m", "u", "r"):
                await pilot.press(key)
                await pilot.pause()  # every message the key caused is handled
                assert not isinstance(app.screen, (MapForm, Confirm))
            titles = [c.title for c in app.get_system_commands(app.screen)]
            assert "GET_SHMEM_CONFIG" in titles
            assert not {"Map a buffer", "Reset the device"} & set(titles)
            await pilot.press("question_mark")
            await until(pilot, lambda: isinstance(app.screen, HelpScreen), "help")
            assert not {"m", "u", "r"} & {k for k, _ in app.screen.rows}

    run(go)


def test_trace_filter_sort_and_zoom(sh) -> None:
    async def go() -> None:
        app = console(sh)
        async with app.run_test(size=(100, 32)) as pilot:
            await until(pilot, lambda: app.model.regions, "regions")
            await pilot.press("t")
            await until(pilot, lambda: all(Event.MESSAGE in link.subscribed
                                           for link in app.links.values()),
                        "the links subscribed to the trace")  # fmt: skip
            assert sh("map", "0", "0", "4K").returncode == 0
            assert sh("map", "0", "1M", "8K", "--ro").returncode == 0
            log = app.model.log
            await until(pilot, lambda: any("SHMEM_MAP" in e.text for e in log.entries),
                        "a traced SHMEM_MAP")  # fmt: skip
            table = app.query_one("#table", MappingsTable)
            await until(pilot, lambda: table.row_count == 2, "two rows")
            await pilot.press("slash")
            await pilot.press("r", "o")
            await until(pilot, lambda: table.row_count == 1, "the filter")
            await pilot.press("enter")
            await pilot.press("s")  # sort by length
            assert table.sort_key == "length"
            region_map = app.query_one("#map", RegionMap)
            await pilot.press("right", "plus", "plus")
            assert "zoom 4x" in region_map.render_line(0).text

    run(go)


def test_a_daemon_that_goes_away_is_a_notice_not_a_crash(sh) -> None:
    async def go() -> None:
        app = console(sh)
        async with app.run_test(size=(100, 32), notifications=True) as pilot:
            await until(pilot, lambda: app.model.regions, "regions")
            assert sh("down").returncode == 0
            await until(pilot, lambda: not app.model.sides["frontend"].reachable, "the loss")
            # notify() posts a message: the notice is there once the app has handled it
            def told() -> bool:
                return any("stopped answering" in n.message and "shmemctl up" in n.message
                           for n in app._notifications)  # fmt: skip

            await until(pilot, told, "the notice of the loss")
            header = str(app.query_one("#header").render())
            assert "not answering" in header and "retrying in" in header
            await pilot.press("r")  # an action against a dead daemon: told, not crashed
            await until(pilot, lambda: isinstance(app.screen, Confirm), "the question")
            await pilot.press("y")
            await until(pilot, lambda: any("is the pair up?" in n.message
                                           for n in app._notifications), "the notice")  # fmt: skip
            assert app.is_running

    run(go)


def test_a_burst_of_ten_thousand_events_is_drawn_a_few_times(sh) -> None:
    redraws = []

    async def go() -> None:
        app = console(sh)
        async with app.run_test(size=(100, 32)) as pilot:
            await until(pilot, lambda: app.model.regions, "regions")
            original = app._redraw

            def counting(*, regions: bool) -> None:
                if regions:
                    redraws.append(1)
                original(regions=regions)

            app._redraw = counting  # type: ignore[method-assign]
            maps = [f"0:{i * 4096:#x}:4K" for i in range(5000)]
            for chunk in range(0, 5000, 1000):  # 5,000 maps: 10,000 events on two links
                done = await asyncio.to_thread(sh, "batch", *maps[chunk : chunk + 1000])
                assert done.returncode == 0, done.stderr
            await until(pilot, lambda: app.model.mapping_count == 5000, "all 5,000")
            await pilot.press("right", "right")  # and it still answers keys
            region_map = app.query_one("#map", RegionMap)
            assert region_map.cursor[0] == 4096

    run(go)
    assert len(redraws) < 200, f"{len(redraws)} redraws for 10,000 events"


def shown_text(widget: Widget) -> str:
    """What the widget shows, its wrapped lines joined as one text."""
    return " ".join(" ".join(drawn(widget)).split())


def test_a_map_is_one_line_in_the_log_when_both_sides_agree(sh) -> None:
    async def go() -> None:
        app = console(sh)
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.model.regions, "regions")
            view = app.query_one("#log", EventLogView)
            log = app.model.log
            assert sh("map", "0", "0x210000", "1M", "--ro").returncode == 0
            # both daemons report it; the second report turns the first line into one for both
            await until(pilot, lambda: "MAPPED 0:0x210000+0x100000 ro both" in shown_text(view),
                        "one line for the map, drawn whole at 80 columns")  # fmt: skip
            assert [(e.text, e.side) for e in log.entries if "0x210000" in e.text] == [
                ("MAPPED 0:0x210000+0x100000 ro", "both")
            ]
            assert sh("map", "0", "0x280000", "64K").returncode == 1  # overlaps: refused
            await until(pilot, lambda: "REFUSED map 0:0x280000+0x10000 EEXIST: overlaps "
                        "0x210000+0x100000" in shown_text(view), "the refusal")  # fmt: skip
            refusals = [e for e in log.entries if e.text.startswith("REFUSED")]
            await until(pilot, lambda: refusals[0].side == "both", "the other side's refusal")
            assert len([e for e in log.entries if e.text.startswith("REFUSED")]) == 1

    run(go)


@pytest.mark.shmem(regions="0=8M", frontend_args=["--fault", "reply-ok-always"])
def test_two_sides_that_differ_are_two_lines(shmem_pair) -> None:
    """A front-end that answers 0 to what it refuses: the back-end believes a map the
    front-end never made, and the log shows both reports, marked."""
    paths = shmem_pair.paths
    shell = Shell(str(paths.dir.parent))

    async def go() -> None:
        app = ShmemConsole(str(paths.control("frontend")), str(paths.control("backend")))
        async with app.run_test(size=(100, 32)) as pilot:
            await until(pilot, lambda: app.model.regions, "regions")
            assert shell("map", "0", "0", "64K").returncode == 0
            assert shell("map", "0", "0", "64K").returncode == 0  # refused, yet acked
            log = app.model.log
            await until(pilot, lambda: len([e for e in log.entries if e.differs]) == 2,
                        "both reports of the second map")  # fmt: skip
            lines = [(e.text, e.who) for e in log.entries if "0:0x0+0x10000" in e.text]
            assert lines[0] == ("MAPPED 0:0x0+0x10000 rw", "both")
            assert sorted((text.split(":", 2)[0], who) for text, who in lines[1:]) == [
                ("MAPPED 0", "back-end ≠"),
                ("REFUSED map 0", "front-end ≠"),
            ]
            assert "EEXIST: overlaps 0x0+0x10000" in "".join(text for text, _ in lines)

    run(go)
