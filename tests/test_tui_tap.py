"""The console on a tap (read-only, both peers named, the /proc verdict, broken rules
standing out in the log) and the list of every pair and tap on a host, against real
daemons and a real tap."""

from __future__ import annotations

import asyncio

import pytest
from textual.widgets import DataTable

from shmemctl.events import Event
from tui.app import ShmemConsole, console_for
from tui.model import PairModel
from tui.pairs import PairList
from tui.widgets import VIOLATION, EventLogView, entry_lines

from .conftest import MiB
from .test_tap import start_pair
from .test_tui import DEADLINE, Shell, drawn, until

READ_ONLY_HIDDEN = ("map", "unmap", "reset", "config")


@pytest.fixture
def run_dir(tmp_path, monkeypatch) -> str:
    """The run directory the tap (named "t") and any pair of the test live in; the
    console finds them by name there."""
    path = str(tmp_path / "run")
    monkeypatch.setenv("SHMEMCTL_RUN_DIR", path)
    return path


def test_the_console_on_a_tap_shows_the_pair_it_watches_read_only(spawn, tmp_path, run_dir):
    pair = start_pair(spawn, tmp_path, "listen", "connect")
    assert pair.fe is not None and pair.be is not None
    pair.monitor("be").execute("map", shmid=0, shm_offset=0, len=MiB, ro=True)

    async def go() -> None:
        app = console_for("t", read_only=False, refresh=0.1)
        assert isinstance(app, ShmemConsole) and app.roles == ["tap"]
        async with app.run_test(size=(110, 34)) as pilot:
            await until(pilot, lambda: app.model.regions.get(0) and app.model.regions[0].mappings,
                        "the tap's picture")  # fmt: skip
            region = app.model.regions[0]
            (m,) = region.mappings.values()
            assert (m.shm_offset, m.len, m.writable) == (0, MiB, False)
            assert region.size == 8 * MiB  # from the layout reply the tap saw
            await until(pilot, lambda: "read-only" in "\n".join(drawn(app.header)), "the header")
            header = "\n".join(drawn(app.header))
            assert f"front-end pid {pair.fe.pid} shmemctl" in header
            assert f"back-end pid {pair.be.pid} backend_sim" in header
            assert "read-only: a tap only watches the pair" in header
            # nothing that would change the pair, not even asking it for its layout
            assert not [a for a in READ_ONLY_HIDDEN if app.check_action(a, ())]
            await until(pilot, lambda: "✓ picture" in "\n".join(drawn(app.process)),
                        "the /proc verdict")  # fmt: skip
            panel = "\n".join(drawn(app.process))
            assert "no broken rule seen" in panel
            await pilot.press("m", "r")  # the keys do nothing on a tap
            assert len(app.screen_stack) == 1
            # a change of the pair reaches the console at the poll's pace: no event says it
            pair.monitor("be").execute("unmap", shmid=0, shm_offset=0, len=MiB)
            await until(pilot, lambda: not app.model.regions[0].mappings, "the unmap")

    asyncio.run(go())


def test_a_broken_rule_stands_out_in_the_consoles_log(spawn, tmp_path, run_dir) -> None:
    pair = start_pair(spawn, tmp_path, "listen", "connect",
                      be_args=("--fault", "map-out-of-bounds"))  # fmt: skip

    async def go() -> None:
        app = console_for("t", read_only=False, refresh=0.1)
        async with app.run_test(size=(110, 34)) as pilot:
            # subscribed, not only reachable: the link reads a status before it subscribes,
            # and a violation published in between would never reach the log
            await until(pilot, lambda: app.links["tap"].subscribed, "the tap's events")
            refused = r"GenericError.*refused by the front-end: EINVAL"
            with pytest.raises(AssertionError, match=refused):
                pair.monitor("be").execute("map", shmid=0, shm_offset=0, len=MiB)
            log = app.model.log

            def violation():
                return next((e for e in log.entries if e.text.startswith("VIOLATION")), None)

            await until(pilot, violation, "the violation in the log")
            entry = violation()
            assert "back-end broke map-valid (§5)" in entry.text and entry.side == "tap"
            first = entry_lines(entry, 60)[0]
            assert first.text.startswith("VIOLATION")
            assert all(seg.style == VIOLATION for seg in first if seg.text.strip())
            await until(pilot, lambda: "map-valid 1" in "\n".join(drawn(app.process)),
                        "the count per rule")  # fmt: skip
            assert app.query_one("#log", EventLogView).border_title == "events"

    asyncio.run(go())


def test_the_list_shows_pairs_and_taps_sorts_filters_and_opens_one(spawn, tmp_path, run_dir):
    start_pair(spawn, tmp_path, "listen", "connect")
    sh = Shell(run_dir)
    assert sh("up", "--regions", "0=8M", "--timeout", str(DEADLINE)).returncode == 0
    try:

        async def go() -> None:
            app = PairList(refresh_seconds=0.1)
            async with app.run_test(size=(110, 20)) as pilot:
                table = app.query_one("#pairs", DataTable)
                await until(pilot, lambda: table.row_count == 2, "both rows")
                assert [r["name"] for r in app.shown_rows()] == ["default", "t"]
                tap = next(r for r in app.rows if r["name"] == "t")
                assert (tap["kind"], tap["state"], tap["violations"]) == ("tap", "relaying", 0)
                await pilot.press("s")  # by kind
                assert app.sort_key == "kind"
                await pilot.click("#pairs", offset=(2, 0))  # the NAME header: by name
                assert app.sort_key == "name"
                await pilot.click("#pairs", offset=(2, 0))  # again: the other way
                assert [r["name"] for r in app.shown_rows()] == ["t", "default"]
                await pilot.press("slash", *"relay", "enter")
                assert [r["name"] for r in app.shown_rows()] == ["t"]
                await pilot.press("enter")
            assert app.return_value == "t"

        asyncio.run(go())
    finally:
        sh("down")


def test_escape_on_a_console_opened_from_the_list_goes_back(spawn, tmp_path, run_dir) -> None:
    start_pair(spawn, tmp_path, "listen", "connect")

    async def go(back: bool) -> str | None:
        app = console_for("t", read_only=False, refresh=0.1, back=back)
        async with app.run_test(size=(110, 34)) as pilot:
            await until(pilot, lambda: app.model.sides["tap"].reachable, "the tap")
            await pilot.press("escape")
            if not back:
                assert app.is_running  # escape alone does not quit a console
                await pilot.press("q")
        return app.return_value

    assert asyncio.run(go(True)) == "back"
    assert asyncio.run(go(False)) is None


def test_a_taps_picture_places_regions_it_could_and_sizes_those_no_layout_gave() -> None:
    model = PairModel(("tap",))
    mapping = {"shmid": 3, "shm_offset": 0x2000, "len": 0x3000, "fd_offset": 0,
               "writable": True, "dev": "00:01", "ino": 9, "age": 1.0}  # fmt: skip
    status = {
        "regions": [
            {"shmid": 0, "size": 8 * MiB, "mappings": []},
            {"shmid": 3, "size": None, "mappings": [mapping]},  # no layout reply seen
        ],
        "truth": {"verdict": "agree", "regions": [{"shmid": 3, "base": 0x7F0000000000},
                                                   {"shmid": 0, "base": None, "why": "none"}]},
    }  # fmt: skip
    model.poll_update("tap", status)
    assert (model.regions[0].size, model.regions[0].base) == (8 * MiB, 0)
    assert (model.regions[3].size, model.regions[3].base) == (0x5000, 0x7F0000000000)
    assert model.regions[3].mappings[0x2000].ino == 9
    status["regions"][1]["mappings"] = []
    version = model.regions[3].version
    model.poll_update("tap", status)
    assert model.regions[3].mappings == {} and model.regions[3].version > version
    # the tap's events only go to the log: the picture is the status's
    model.apply("tap", {"event": Event.VIOLATION, "data": {}})
    assert model.mapping_count == 0
