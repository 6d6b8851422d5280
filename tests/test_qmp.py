"""The control sockets are QMP: QEMU's own tools drive our daemons with no adapter.

`qmp-shell` (the `qemu.qmp` package's shell, as a QEMU user runs it) and that
package's asynchronous `QMPClient` each take map, unmap, status and a
subscription through both daemons of a real pair."""

from __future__ import annotations

import ast
import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

from shmemctl.control import ControlClient
from shmemctl.events import Event

from .conftest import PATIENCE

PROMPT = "(QEMU) "


def region(status: dict[str, Any], shmid: int) -> dict[str, Any]:
    """One region of a front-end's status."""
    found: dict[str, Any] = next(r for r in status["regions"] if r["shmid"] == shmid)
    return found


MAP = {"shmid": 0, "shm_offset": 0x10000, "len": 4096}


class Shell:
    """qmp-shell on a control socket, its stdin and stdout piped: each command's
    answer is the next JSON line; events come out (as Python reprs) when it is
    sent an empty line."""

    def __init__(self, socket: Path, home: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qemu.qmp.qmp_shell", str(socket)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={"HOME": str(home), "PATH": "/usr/bin:/bin"},  # its history file goes there
        )
        self.banner = [self._line(), self._line()]
        self.events: list[dict[str, Any]] = []

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"qmp-shell ended: {self.proc.stderr.read() if self.proc.stderr else ''}"
        while line.startswith(PROMPT):
            line = line[len(PROMPT) :]
        return line.strip()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def ask(self, command: str) -> dict[str, Any]:
        """One command line; its answer. Events printed before it are kept in `events`."""
        self.send(command)
        while True:
            line = self._line()
            if line.startswith("{'event'"):
                self.events.append(ast.literal_eval(line))
            elif line.startswith("{"):
                answer: dict[str, Any] = json.loads(line)
                return answer

    def take_events(self) -> list[dict[str, Any]]:
        """What the shell has received since it was last asked (an empty line prints
        them), fenced by a query-version so that every one has been read."""
        self.send("")
        assert "return" in self.ask("query-version")
        taken, self.events = self.events, []
        return taken

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(PATIENCE)


@pytest.fixture
def shells(tmp_path: Path) -> Any:
    made: list[Shell] = []

    def open_shell(socket: Path) -> Shell:
        made.append(Shell(socket, tmp_path))
        return made[-1]

    yield open_shell
    for shell in made:
        shell.close()
        assert shell.proc.returncode == 0


@pytest.mark.shmem(regions="0=8M,2=64K")
def test_qmp_shell_drives_both_daemons(shmem_pair, shells) -> None:
    paths = shmem_pair.paths
    backend, frontend = shells(paths.control("backend")), shells(paths.control("frontend"))
    assert backend.banner == ["Welcome to the QMP low-level shell!", "Connected to QEMU 0.1.0"]

    for shell, role in ((backend, "backend"), (frontend, "frontend")):
        status = shell.ask("query-status")["return"]
        assert (status["role"], status["state"]) == (role, "connected")
        assert shell.ask('subscribe events=["MAPPED","UNMAPPED","RESET"]') == {
            "return": {"events": ["MAPPED", "UNMAPPED", "RESET"]}
        }

    mapped = backend.ask("map shmid=0 shm_offset=65536 len=4096")["return"]
    assert (mapped["result"], mapped["shmid"], mapped["shm_offset"], mapped["len"]) == (
        "ok", 0, 0x10000, 4096,
    )  # fmt: skip
    status = frontend.ask("query-status")["return"]
    assert [(m["shm_offset"], m["len"]) for m in region(status, 0)["mappings"]] == [(0x10000, 4096)]
    assert status["disagreements"] == []  # and /proc/PID/maps shows it so

    assert backend.ask("unmap shmid=0 shm_offset=65536 len=4096")["return"]["result"] == "ok"
    assert region(frontend.ask("query-status")["return"], 0)["count"] == 0

    for shell in (backend, frontend):  # each saw both outcomes, in QMP's form
        events = shell.take_events()
        assert [e["event"] for e in events] == [Event.MAPPED, Event.UNMAPPED]
        assert all(e["data"]["shm_offset"] == 0x10000 for e in events)
        stamp = events[0]["timestamp"]
        assert set(stamp) == {"seconds", "microseconds"} and 0 <= stamp["microseconds"] < 10**6

    # the front-end's own command, and QMP's errors, as the shell shows them
    assert frontend.ask("reset")["return"]["via"] == "RESET_DEVICE"
    assert [e["event"] for e in frontend.take_events()] == [Event.RESET]
    unknown = backend.ask("format-disk")["error"]
    assert unknown["class"] == "CommandNotFound" and "format-disk" in unknown["desc"]
    assert backend.ask("map shmid=0 shm_offset=0")["error"] == {
        "class": "GenericError", "desc": "map needs the argument 'len'",
    }  # fmt: skip


async def _drive_with_qmp_client(backend: Path, frontend: Path) -> None:
    clients = {"backend": QMPClient("backend"), "frontend": QMPClient("frontend")}
    listeners = {role: EventListener() for role in clients}
    for role, client in clients.items():
        await client.connect(str(backend if role == "backend" else frontend))
        assert client.greeting is not None and client.greeting.QMP.capabilities == []
        client.register_listener(listeners[role])
        await client.execute("subscribe", {"events": ["MAPPED", "UNMAPPED"]})
        names = {c["name"] for c in await client.execute("query-commands")}  # type: ignore[union-attr]
        assert {"query-status", "subscribe", "qmp_capabilities"} <= names
    be, fe = clients["backend"], clients["frontend"]
    assert "map" in {c["name"] for c in await be.execute("query-commands")}  # type: ignore[union-attr]

    assert (await be.execute("map", MAP))["result"] == "ok"  # type: ignore[index]
    with pytest.raises(ExecuteError) as refused:
        await be.execute("map", MAP)  # the same range again: the front-end refuses it
    assert refused.value.error_class == "GenericError"
    assert "EEXIST" in str(refused.value)
    fe_status: Any = await fe.execute("query-status")
    assert region(fe_status, 0)["count"] == 1
    assert (await be.execute("unmap", {k: MAP[k] for k in ("shmid", "shm_offset", "len")}))[  # type: ignore[index]
        "result"
    ] == "ok"
    for role, listener in listeners.items():
        got = [await asyncio.wait_for(listener.get(), PATIENCE) for _ in range(2)]
        assert [e["event"] for e in got] == [Event.MAPPED, Event.UNMAPPED], role
    with pytest.raises(ExecuteError) as missing:
        await fe.execute("map", MAP)
    assert missing.value.error_class == "CommandNotFound"
    for client in clients.values():
        await client.disconnect()


@pytest.mark.shmem(regions="0=8M")
def test_qemu_qmp_client_drives_both_daemons(shmem_pair) -> None:
    paths = shmem_pair.paths
    asyncio.run(_drive_with_qmp_client(paths.control("backend"), paths.control("frontend")))
    # and our own client, built on the same library, sees the same table
    with ControlClient(str(paths.control("frontend"))) as client:
        assert region(client.execute("query-status"), 0)["count"] == 0


@pytest.mark.shmem(regions="0=8M")
def test_a_subscription_to_no_event_gets_none(shmem_pair) -> None:
    paths = shmem_pair.paths
    with ControlClient(str(paths.control("backend"))) as quiet:
        quiet.subscribe([])
        assert quiet.execute("subscribe", events=[]) == {"events": []}
        with ControlClient(str(paths.control("backend"))) as driver:
            driver.execute("map", **MAP)
        # a fence: an event published before the map's answer is queued to this
        # connection ahead of this answer, so it would be read by now
        quiet.execute("query-version")
        assert quiet.next_event(timeout=0.5) is None
