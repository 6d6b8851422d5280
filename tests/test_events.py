"""The event registry: every event a daemon publishes is an `Event`, with the record its
data carries from each publisher; nothing publishes a name that is not there."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shmemctl.events import (
    NAMES,
    PAYLOADS,
    TRACE,
    Event,
    EventHub,
    UnknownEvent,
    payload_keys,
)

from .conftest import PATIENCE, MiB
from .test_real_peers import Monitor

ROOT = Path(__file__).resolve().parent.parent
#: Functions that take an event (or its name) and pass it on to `EventHub.emit`.
FORWARDERS = {"_set_state", "_report"}


def _names(node: ast.expr, forwarded: set[str], where: str) -> Iterator[str]:
    """The event names a call's first argument can be, as far as the source says."""
    match node:
        case ast.Constant(value=str(name)):
            yield name
        case ast.Attribute(value=ast.Name(id="Event"), attr=member):
            assert member in Event.__members__, f"{where}: no Event.{member}"
            yield Event[member].value
        case ast.IfExp(body=body, orelse=orelse):
            yield from _names(body, forwarded, where)
            yield from _names(orelse, forwarded, where)
        case ast.Call(func=ast.Name(id="Event"), args=[arg]):
            yield from _names(arg, forwarded, where)
        case ast.Name(id=parameter) if parameter in forwarded:
            pass  # a forwarder's parameter: its callers are read instead
        case _:
            raise AssertionError(f"{where}: an event this scan cannot read: {ast.unparse(node)}")


def emitted_in_source() -> dict[str, list[str]]:
    """Every event name any emitter in the daemons' code passes to `emit` (directly or
    through a forwarder), with where; and who calls `trace_message`."""
    found: dict[str, list[str]] = {}
    files = [p for d in ("shmemctl", "backend_sim", "tui") for p in (ROOT / d).rglob("*.py")]
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            forwarded = set()
            if function.name in FORWARDERS:
                forwarded = {a.arg for a in function.args.args}
            for call in ast.walk(function):
                if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Attribute):
                    continue
                name = call.func.attr
                where = f"{path.relative_to(ROOT)}:{call.lineno}"
                if name == "trace_message":
                    found.setdefault(TRACE.value, []).append(where)
                elif (name == "emit" or name in FORWARDERS) and call.args:
                    for event in _names(call.args[0], forwarded, where):
                        found.setdefault(event, []).append(where)
    return found


def test_every_name_an_emitter_uses_is_registered_and_every_event_is_emitted() -> None:
    found = emitted_in_source()
    unregistered = {name: where for name, where in found.items() if name not in NAMES}
    assert unregistered == {}, "emitted but not in shmemctl.events.Event"
    assert set(found) == set(NAMES), "in the registry, but nothing publishes it"
    # the trace has one source: the channel that carried the message
    assert {w.split(":")[0] for w in found[TRACE.value]} == {"shmemctl/channel.py"}


def test_the_registry_is_whole() -> None:
    assert set(PAYLOADS) == set(Event)
    for event in Event:
        assert set(event.payloads) <= {"frontend", "backend", "tap"} and event.payloads, event
        for record in event.payloads.values():
            required, optional = payload_keys(record)
            assert not required & optional, record


def test_the_hub_refuses_a_name_not_in_the_registry() -> None:
    hub = EventHub()
    got: list[dict[str, Any]] = []
    hub.subscribe(got.append)
    with pytest.raises(UnknownEvent, match="no event 'mapd'; the events are: MAPPED, UNMAPPED"):
        hub.emit("mapd", {})
    with pytest.raises(UnknownEvent, match="no event 'mapd'"):
        hub.subscribe(got.append, ["MAPPED", "mapd"])
    with pytest.raises(UnknownEvent, match="no event 'mapped'"):  # the names are QMP's
        hub.emit("mapped", {})
    hub.emit("MAPPED", {"shmid": 0})  # a registered name still goes through, as its member
    hub.emit(Event.UNMAPPED, {"shmid": 0})
    assert [(e["event"], type(e["event"])) for e in got] == [
        (Event.MAPPED, str),
        (Event.UNMAPPED, str),
    ]
    # QMP's event record: the time in seconds and microseconds, and nothing else
    for record in got:
        assert set(record) == {"event", "data", "timestamp"}
        assert set(record["timestamp"]) == {"seconds", "microseconds"}
        assert 0 <= record["timestamp"]["microseconds"] < 1_000_000


def fits(event: dict[str, Any], role: str) -> str:
    """What is wrong with a daemon's event against the registry, or ''."""
    name, data = event["event"], event["data"]
    if name not in NAMES:
        return f"{role} published {name!r}, which is not an Event"
    record = Event(name).payloads.get(role)
    if record is None:
        return f"{role} published {name!r}, which the registry says only {Event(name).payloads} do"
    required, optional = payload_keys(record)
    keys = set(data)
    if not required <= keys <= required | optional:
        return (
            f"{role}'s {name!r} carries {sorted(keys)}; {record.__name__} says "
            f"{sorted(required)} and maybe {sorted(optional)}"
        )
    return ""


def wait_event(monitor: Monitor, name: str, after: int = 0) -> int:
    """Read a monitor's events until one named `name` arrives past index `after`; its index."""
    while True:
        for i in range(after, len(monitor.events)):
            if monitor.events[i]["event"] == name:
                return i
        answer = monitor._read()
        if "event" in answer:
            monitor.events.append(answer)


def test_a_pair_publishes_what_the_registry_says_and_nothing_else(spawn, tmp_path) -> None:
    """Both daemons, driven through every event: each one is registered, published by a
    daemon the registry names, with the keys its record gives; and every (event,
    publisher) of the registry is seen."""
    sock = str(tmp_path / "vhost.sock")
    every = [*NAMES]
    be1_ctl, be2_ctl, fe_ctl = (str(tmp_path / n) for n in ("be1.ctl", "be2.ctl", "fe.ctl"))
    be1 = spawn("backend_sim", "--listen", sock, "--control", be1_ctl, "--regions", "0=8M",
                "--reply-timeout", str(PATIENCE), name="be1")  # fmt: skip
    be1.wait_state("listening")
    back1 = Monitor.of(be1, be1_ctl, PATIENCE)
    back1.execute("subscribe", events=every)
    fe = spawn("frontend", "--connect", sock, "--reconnect", "0.05", "--control", fe_ctl)
    fe.wait_connected()
    front = Monitor.of(fe, fe_ctl, PATIENCE)
    front.execute("subscribe", events=every)

    back1.execute("map", shmid=0, shm_offset=0, len=MiB)
    with pytest.raises(AssertionError, match=r"GenericError.*refused by the front-end: ENOENT"):
        back1.execute("unmap", shmid=0, shm_offset=MiB, len=MiB)  # the device believes none
    with pytest.raises(AssertionError, match=r"GenericError.*refused by the front-end: EEXIST"):
        back1.execute("map", shmid=0, shm_offset=0, len=2 * MiB)  # refused for the overlap
    back1.execute("unmap", shmid=0, shm_offset=0, len=MiB)
    front.execute("reset")
    wait_event(back1, Event.RESET)
    seen = [("backend", e) for e in back1.events]

    be1.stop()  # the front-end loses it, and tries again where nothing listens
    gone = wait_event(front, Event.DISCONNECTED)
    wait_event(front, Event.RECONNECTING, gone)
    be2 = spawn("backend_sim", "--listen", sock, "--control", be2_ctl, "--regions", "0=8M",
                name="be2")  # fmt: skip
    back2 = Monitor.of(be2, be2_ctl, PATIENCE)
    back2.execute("subscribe", events=every)
    wait_event(front, Event.CONNECTED, gone)  # after a handshake with the new one
    fe.stop()
    wait_event(back2, Event.DISCONNECTED)
    seen += [("frontend", e) for e in front.events] + [("backend", e) for e in back2.events]

    wrong = sorted({fits(e, role) for role, e in seen} - {""})
    assert wrong == []
    published = {(role, e["event"]) for role, e in seen}
    registered = {(role, event.value) for event in Event for role in event.payloads
                  if role != "tap"}  # the tap's own are checked in test_tap.py  # fmt: skip
    assert registered - published == set(), "registered, but the pair never published it"
