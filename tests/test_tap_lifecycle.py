"""The tap across restarts of the pair it watches: a device that connects to the tap
(`--back listen:`) is let go with the front-end and the next one is taken; a side the
tap connects to that is not up yet is an event, once per wait, and the tap connects as
soon as it is there."""

from __future__ import annotations

from shmemctl.events import Event

from .conftest import MiB
from .test_events import fits, wait_event
from .test_real_peers import Monitor
from .test_tap import REGIONS, region_mappings, start_tap


def test_a_device_that_connects_to_the_tap_is_let_go_with_the_front_end_and_the_next_taken(
    spawn, tmp_path
) -> None:
    front, back = str(tmp_path / "front.sock"), str(tmp_path / "back.sock")
    tap_proc, tap_ctl = start_tap(spawn, tmp_path, f"listen:{front}", f"listen:{back}")
    tap = Monitor.of(tap_proc, tap_ctl, 60)
    tap.execute("subscribe", events=[Event.ATTACHED, Event.DETACHED])

    def pair(n: int):
        be = spawn("backend_sim", "--connect", back, "--regions", REGIONS, "--control",
                   str(tmp_path / f"be{n}.ctl"), name=f"backend{n}")  # fmt: skip
        fe = spawn("frontend", "--connect", front, "--control", str(tmp_path / f"fe{n}.ctl"),
                   name=f"frontend{n}")  # fmt: skip
        fe.wait_connected()
        return fe, be

    fe1, be1 = pair(1)
    fe1.stop()
    # the device sees the VMM leave: its connection through the tap ends with it (a
    # connecting backend_sim serves one connection, then exits)
    assert be1.wait_exit(60) == 0
    first = wait_event(tap, Event.DETACHED)
    wait_event(tap, Event.DETACHED, first + 1)
    detached = [e["data"] for e in tap.events if e["event"] == Event.DETACHED]
    assert {d["side"] for d in detached} == {"front-end", "back-end"}
    assert all(d["connection"] == 1 for d in detached)
    seen = len(tap.events)
    _fe2, be2 = pair(2)
    assert tap.execute("query-status")["connection"] == 2
    first = wait_event(tap, Event.ATTACHED, seen)
    second = wait_event(tap, Event.ATTACHED, first + 1)
    assert [(tap.events[i]["data"]["side"], tap.events[i]["data"]["connection"])
            for i in (first, second)] == [("front-end", 2), ("back-end", 2)]  # fmt: skip
    # the second pair works through the tap as the first did
    Monitor.of(be2, str(tmp_path / "be2.ctl"), 60).execute("map", shmid=0, shm_offset=0, len=MiB)
    status = tap.execute("query-status")
    assert [m["shm_offset"] for m in region_mappings(status, 0)] == [0]


def test_a_side_not_up_yet_is_one_event_and_the_tap_connects_when_it_comes(
    spawn, tmp_path
) -> None:
    front, back = str(tmp_path / "front.sock"), str(tmp_path / "back.sock")
    tap_proc, tap_ctl = start_tap(spawn, tmp_path, f"listen:{front}", f"connect:{back}",
                                  "--retry", "0.05")  # fmt: skip
    tap = Monitor.of(tap_proc, tap_ctl, 60)
    tap.execute("subscribe", events=[Event.RECONNECTING, Event.ATTACHED])
    fe = spawn("frontend", "--connect", front, "--control", str(tmp_path / "fe.ctl"))
    event = tap.events[wait_event(tap, Event.RECONNECTING)]
    assert fits(event, "tap") == ""  # the record the registry gives the tap's
    waiting = event["data"]
    assert waiting == {"side": "back-end", "socket": back, "mode": "connect", "retry_in": 0.05,
                       "reason": "No such file or directory"}  # fmt: skip
    tap_proc.wait_status(lambda s: s["state"] == "connecting to the back-end", "waiting")
    be = spawn("backend_sim", "--listen", back, "--regions", REGIONS)
    fe.wait_connected()
    assert be.alive()
    first = wait_event(tap, Event.ATTACHED)
    second = wait_event(tap, Event.ATTACHED, first + 1)
    assert [tap.events[i]["data"]["side"] for i in (first, second)] == ["front-end", "back-end"]
    # many attempts failed meanwhile; the wait was said once, before the back-end came
    assert [e["event"] for e in tap.events].count(Event.RECONNECTING) == 1
