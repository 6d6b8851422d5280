"""Pictures of the console (SVG snapshots): the main screen, the map form, the help
screen and a crowded region, rendered from a recorded pair state so that pids,
addresses and ages are the same on every run. The live behaviour is tested
against real daemons in test_tui.py."""

from __future__ import annotations

import time

import pytest

import tui.model
import tui.widgets
from shmemctl.events import Event, qmp_timestamp
from tui.app import ShmemConsole

NOW = 1_800_000_000.0
MiB = 1 << 20


def _mapping(offset: int, length: int, writable: bool, n: int, age: float) -> dict:
    return {
        "shmid": 0, "shm_offset": offset, "len": length, "fd_offset": 0, "writable": writable,
        "file": f"/memfd:shmemctl-buffer-{n} (deleted)", "age": age,
    }  # fmt: skip


def frontend_status(mappings: list[dict]) -> dict:
    return {
        "role": "frontend", "state": "connected", "socket": "/run/shmemctl/default/vhost.sock",
        "mode": "connect", "shmem_bit": 22, "reconnect": 0.5,
        "negotiated": {"features": "0x140000000", "shmem": True, "reply_ack": True,
                       "protocol_features": ["MQ", "REPLY_ACK", "BACKEND_REQ", "BACKEND_SEND_FD",
                                             "RESET_DEVICE", "STATUS", "SHMEM"]},
        "counters": {"maps": len(mappings), "unmaps": 0, "refused": 1, "resets": 0},
        "process": {"pid": 4242, "rss": 28 * MiB, "fds": 11},
        "regions": [
            {"shmid": 0, "base": 0x7F3A00000000, "size": 64 * MiB, "count": len(mappings),
             "mapped_bytes": sum(m["len"] for m in mappings), "mappings": mappings,
             "truncated": False},
            {"shmid": 2, "base": 0x7F3A08000000, "size": 8 * MiB, "count": 0,
             "mapped_bytes": 0, "mappings": [], "truncated": False},
        ],
        "disagreements": [],
    }  # fmt: skip


BACKEND = {
    "role": "backend", "state": "connected", "socket": "/run/shmemctl/default/vhost.sock",
    "mode": "listen", "shmem_bit": 22, "regions": {"0": 64 * MiB, "2": 8 * MiB},
    "negotiated": {"protocol_features": ["MQ", "REPLY_ACK", "BACKEND_REQ", "BACKEND_SEND_FD",
                                         "RESET_DEVICE", "STATUS", "SHMEM"],
                   "shmem": True, "reply_ack": True},
    "ready": True, "why_not_ready": None, "buffers": [], "mapped": [], "scenario": None,
    "process": {"pid": 4241, "rss": 27 * MiB, "fds": 19},
}  # fmt: skip


def _reports(name: Event, at: float, front: dict, back: dict) -> list[tuple[str, dict]]:
    """One request as both daemons publish it."""
    sides = (("frontend", front, 0.0), ("backend", back, 0.0004))
    return [(side, {"event": name, "data": data, "timestamp": qmp_timestamp(at + delay)})
            for side, data, delay in sides]  # fmt: skip


#: The last map and a refusal, as a real pair published them.
EVENTS = [
    *_reports(
        Event.MAPPED, NOW - 1,
        {"shmid": 0, "shm_offset": 40 * MiB, "len": 256 << 10, "fd_offset": 0, "writable": True,
         "file": "/memfd:shmemctl-buffer-6 (deleted)"},
        {"shmid": 0, "shm_offset": 40 * MiB, "len": 256 << 10, "fd_offset": 0, "writable": True,
         "buffer": 6, "acked": True},
    ),
    *_reports(
        Event.REFUSED, NOW - 0.5,
        {"request": "SHMEM_MAP", "shmid": 0, "shm_offset": 0x180000, "len": 64 << 10,
         "reason": "OVERLAP", "errno": "EEXIST",
         "detail": "overlaps 0x100000+0x100000; unmap it first or pick a free range"},
        {"request": "map", "shmid": 0, "shm_offset": 0x180000, "len": 64 << 10, "fd_offset": 0,
         "writable": True, "buffer": 7, "errno": "EEXIST",
         "explanation": "overlaps 0x100000+0x100000"},
    ),
]  # fmt: skip


class RecordedConsole(ShmemConsole):
    """The console on a recorded state: no links, no polls."""

    def __init__(self, mappings: list[dict], events: list[tuple[str, dict]] = EVENTS) -> None:
        super().__init__("/run/shmemctl/default/frontend.ctl", "/run/shmemctl/default/backend.ctl")
        self.recorded = mappings
        self.events = events

    def start_links(self) -> None:
        self._sink("frontend", "status", frontend_status(self.recorded))
        self._sink("backend", "status", BACKEND)
        for side, event in self.events:
            self._sink(side, "event", event)

    def poll(self) -> None:  # type: ignore[override]
        pass


FEW = [
    _mapping(0, MiB, True, 1, 42),
    _mapping(MiB, MiB, False, 2, 40),
    _mapping(2 * MiB, 64 << 10, True, 3, 12),
    _mapping(6 * MiB, 2 * MiB, True, 4, 9),
    _mapping(16 * MiB, 4096, False, 5, 3),
    _mapping(40 * MiB, 256 << 10, True, 6, 1),
]
CROWDED = [
    _mapping(i * 16384, 4096 * (1 + i % 3), i % 5 != 0, 100 + i, i % 60) for i in range(4000)
]


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch):
    monkeypatch.setattr(tui.widgets.time, "time", lambda: NOW)
    monkeypatch.setattr(tui.model.time, "time", lambda: NOW)
    monkeypatch.setenv("TZ", "UTC")  # the log's times read the same on every machine
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


async def settle(pilot) -> None:
    """Apply the recorded state now (not on the next tick), then let every redraw happen."""
    pilot.app.drain()
    await pilot.pause()


def test_main_screen(snap_compare) -> None:
    assert snap_compare(RecordedConsole(FEW), terminal_size=(100, 32), press=["right", "right"],
                        run_before=settle)  # fmt: skip


def test_main_screen_at_80x24(snap_compare) -> None:
    assert snap_compare(RecordedConsole(FEW), terminal_size=(80, 24), run_before=settle)


def test_map_form(snap_compare) -> None:
    assert snap_compare(RecordedConsole(FEW), terminal_size=(100, 32), press=["m"],
                        run_before=settle)  # fmt: skip


def test_help_screen(snap_compare) -> None:
    assert snap_compare(RecordedConsole(FEW), terminal_size=(100, 32), press=["question_mark"],
                        run_before=settle)  # fmt: skip


def test_help_screen_at_80x24(snap_compare) -> None:
    assert snap_compare(RecordedConsole(FEW), terminal_size=(80, 24), press=["question_mark"],
                        run_before=settle)  # fmt: skip


def test_crowded_region(snap_compare) -> None:
    assert snap_compare(RecordedConsole(CROWDED, events=[]), terminal_size=(100, 32),
                        press=["right"] * 5 + ["plus"] * 6, run_before=settle)  # fmt: skip
