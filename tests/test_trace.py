"""The protocol trace (`shmemctl trace`): each message once, by the channel that carried it."""

from __future__ import annotations

import re
import socket
import threading
from typing import Any

import pytest

from shmemctl.backend import BackendEndpoint, DeviceModel
from shmemctl.channel import Channel
from shmemctl.events import TRACE, EventHub
from shmemctl.render import render_event
from shmemctl.wire import ChannelKind, FrontendReq, encode
from shmemctl.wire.messages import DeviceConfig

from .conftest import MiB
from .test_real_peers import Monitor, logged_on_main, received_on_main, traced


def mirrored(records: list[dict[str, Any]], direction: str) -> list[tuple]:
    """What one side's trace says went `direction`, per channel, comparable with the
    other side's view of the same messages."""
    skip = {"role", "direction"}
    return [
        tuple(sorted((k, repr(v)) for k, v in r.items() if k not in skip))
        for r in records
        if r["direction"] == direction
    ]


def test_backend_sim_traces_each_message_of_a_handshake_once(spawn, tmp_path) -> None:
    sock, be_ctl = str(tmp_path / "vhost.sock"), str(tmp_path / "be.ctl")
    be = spawn("backend_sim", "--listen", sock, "--control", be_ctl, "--regions", "0=8M", "-v")
    be.wait_state("listening")
    monitor = Monitor.of(be, be_ctl)
    monitor.execute("subscribe", events=[TRACE])
    fe = spawn("frontend", "--connect", sock)
    fe.wait_connected()
    records = traced(monitor, "backend")
    assert received_on_main(records) == logged_on_main(be.log())
    config = [(r["direction"], r["reply"]) for r in records if r["request"] == "GET_SHMEM_CONFIG"]
    assert config == [("in", False), ("out", True)], "the front-end asked once, we answered once"


@pytest.mark.shmem(regions="0=8M")
def test_both_daemons_trace_what_they_exchange_exactly_once(shmem_pair) -> None:
    paths = shmem_pair.paths
    monitors = {role: Monitor(str(paths.control(role))) for role in ("frontend", "backend")}
    for monitor in monitors.values():
        monitor.execute("subscribe", events=[TRACE])
    front, back = monitors["frontend"], monitors["backend"]
    front.execute("get-shmem-config")  # main channel, front-end -> back-end
    back.execute("map", shmid=0, shm_offset=0, len=MiB)  # backend channel, the other way
    back.execute("unmap", shmid=0, shm_offset=0, len=MiB)
    front.execute("reset")
    seen = {role: traced(monitor, role) for role, monitor in monitors.items()}
    # what one side sent is what the other received: each message once on either side
    assert mirrored(seen["frontend"], "out") == mirrored(seen["backend"], "in")
    assert mirrored(seen["backend"], "out") == mirrored(seen["frontend"], "in")
    requests = [r["request"] for r in seen["backend"]]
    assert requests == [
        "GET_SHMEM_CONFIG", "GET_SHMEM_CONFIG",
        "SHMEM_MAP", "SHMEM_MAP",
        "SHMEM_UNMAP", "SHMEM_UNMAP",
        "RESET_DEVICE", "RESET_DEVICE",
    ]  # fmt: skip


def test_no_one_but_a_channel_publishes_the_trace() -> None:
    hub = EventHub()
    got: list[dict[str, Any]] = []
    hub.subscribe(got.append, [TRACE])
    with pytest.raises(ValueError, match="only from the channel"):
        hub.emit(TRACE, {"channel": "main", "request": "GET_FEATURES"})
    assert got == []


def test_a_message_the_codec_refuses_is_traced_once_with_why() -> None:
    """GET_CONFIG past the config space: the protocol's error reply has no payload, which
    the codec does not decode as a config; the trace still shows it, once."""
    ours, theirs = socket.socketpair()
    hub = EventHub()
    got: list[dict[str, Any]] = []
    hub.subscribe(got.append, [TRACE])
    main = Channel(ours, ChannelKind.MAIN, replies=False)
    main.trace, main.trace_role = hub, "backend"
    endpoint = BackendEndpoint(DeviceModel({0: 8 * MiB}, config_space=bytes(8)), hub)
    serving = threading.Thread(target=endpoint.serve, args=(main,), daemon=True)
    serving.start()
    try:
        asked = encode(ChannelKind.MAIN, FrontendReq.GET_CONFIG, DeviceConfig(0, 16, 0, bytes(16)))
        theirs.sendall(asked)
        theirs.settimeout(5)
        assert theirs.recv(64) == asked[:4] + bytes([5, 0, 0, 0]) + bytes(4)  # reply, no payload
    finally:
        theirs.close()
        serving.join(5)
        main.close()
    records = [e["data"] for e in got]
    assert [(r["direction"], r["request"], r["reply"]) for r in records] == [
        ("in", "GET_CONFIG", False),
        ("out", "GET_CONFIG", True),
    ]
    assert "device config needs 12 bytes" in records[1]["undecodable"]
    line = render_event({**got[1], "source": "backend"})
    assert re.search(r"-> main +GET_CONFIG reply +undecodable: .*config needs 12", line), line
