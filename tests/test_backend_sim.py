"""backend_sim as a real process under a front-end the test drives message by message."""

from __future__ import annotations

import os
import socket

import pytest

from shmemctl.channel import Channel, close_fds
from shmemctl.control import ControlClient
from shmemctl.wire import BackendReq, ChannelKind, FrontendReq, Message, ShmemConfig, encode
from shmemctl.wire.constants import (
    SHMEM_SLOTS,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ProtocolFeature,
)
from shmemctl.wire.messages import (
    DeviceConfig,
    MemoryRegion,
    MemoryTable,
    ShmemMap,
    encode_u64_reply,
    spec_of,
)

from .conftest import PATIENCE, MiB, fd_count, wait_until

SHMEM = ProtocolFeature.SHMEM


class HandFrontend:
    """The front-end side of the main channel, one request at a time."""

    def __init__(self, path: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        self.main = Channel(sock, ChannelKind.MAIN, replies=True)
        self.backend: Channel | None = None

    def call(self, req: FrontendReq, payload=None, fds=(), *, need_reply=False) -> Message | None:
        self.main.send(encode(ChannelKind.MAIN, req, payload, need_reply=need_reply), fds)
        if not (need_reply or spec_of(ChannelKind.MAIN, req).own_reply):
            return None
        msg = self.main.recv(timeout=PATIENCE)
        close_fds(msg.fds)
        return msg

    def open_backend_channel(self, *, ack: bool = True) -> Channel:
        ours, theirs = socket.socketpair()
        self.call(FrontendReq.SET_BACKEND_REQ_FD, None, (theirs.fileno(),), need_reply=ack)
        theirs.close()
        self.backend = Channel(ours, ChannelKind.BACKEND, replies=False)
        return self.backend

    def close(self) -> None:
        self.main.close()
        if self.backend is not None:
            self.backend.close()


@pytest.fixture
def backend_sim(spawn, tmp_path):
    def start(script: str = "", *args: str):
        sock = str(tmp_path / "vhost.sock")
        # The test answers backend_sim's maps itself, as fast as the machine lets it: a
        # generous reply timeout, unless a test gives its own in `args` (the last one wins).
        argv = ["--listen", sock, "--regions", "0=8M,2=64K", "--reply-timeout", str(PATIENCE),
                *args]  # fmt: skip
        if script:
            (tmp_path / "script.txt").write_text(script)
            argv += ["--script", str(tmp_path / "script.txt")]
        be = spawn("backend_sim", *argv)
        be.wait_state("listening")
        return be, HandFrontend(sock)

    return start


def test_qemu_style_realize_closes_every_fd_it_does_not_keep(backend_sim) -> None:
    be, fe = backend_sim()
    try:
        features = fe.call(FrontendReq.GET_FEATURES).payload
        baseline = fd_count(be.pid)  # after a round trip: the connection is accepted
        assert features & VHOST_USER_F_PROTOCOL_FEATURES
        offered = fe.call(FrontendReq.GET_PROTOCOL_FEATURES).payload
        assert offered & SHMEM and offered & ProtocolFeature.REPLY_ACK
        assert not offered & ProtocolFeature.GPA_ADDRESSES, "never claims bit 21"
        assert offered & ProtocolFeature.CONFIG, "a config space by default, so CONFIG"
        fe.call(FrontendReq.SET_PROTOCOL_FEATURES, offered)
        assert fe.call(FrontendReq.GET_QUEUE_NUM).payload == 1
        assert fe.call(FrontendReq.GET_MAX_MEM_SLOTS).payload == 32
        fe.open_backend_channel()
        assert fe.call(FrontendReq.SET_OWNER, need_reply=True).payload == 0
        for req in (FrontendReq.SET_VRING_CALL, FrontendReq.SET_VRING_ERR):
            efd = os.eventfd(0, os.EFD_CLOEXEC)
            assert fe.call(req, 0, (efd,), need_reply=True).payload == 0
            os.close(efd)
        fds = [os.memfd_create("guest-ram") for _ in range(2)]
        table = MemoryTable(tuple(MemoryRegion(i << 30, MiB, 0x7000 << 20, 0) for i in range(2)))
        assert fe.call(FrontendReq.SET_MEM_TABLE, table, tuple(fds), need_reply=True).payload == 0
        close_fds(fds)
        reply = fe.call(FrontendReq.GET_SHMEM_CONFIG)
        assert isinstance(reply.payload, ShmemConfig)
        assert reply.payload.nregions == 2
        assert len(reply.payload.sizes) == SHMEM_SLOTS
        assert reply.payload.regions() == {0: 8 * MiB, 2: 64 << 10}
        # NEED_REPLY on a request with its own reply changes nothing: one reply only
        reply = fe.call(FrontendReq.GET_FEATURES, need_reply=True)
        assert reply.payload == features
        # replies come in order: if the next one answers the next request, there was no other
        reply = fe.call(FrontendReq.GET_QUEUE_NUM)
        assert (reply.request, reply.payload) == (FrontendReq.GET_QUEUE_NUM, 1)
        # only the kept backend channel is new
        wait_until(lambda: fd_count(be.pid) == baseline + 1, what="backend_sim fd count")
        assert be.alive()
    finally:
        fe.close()


def test_get_config_answers_the_size_asked(backend_sim) -> None:
    _be, fe = backend_sim("", "--config-size", "16")
    try:
        offered = fe.call(FrontendReq.GET_PROTOCOL_FEATURES).payload
        assert offered & ProtocolFeature.CONFIG
        fe.call(FrontendReq.SET_PROTOCOL_FEATURES, offered)
        reply = fe.call(FrontendReq.GET_CONFIG, DeviceConfig(0, 8, 0, bytes(8)))
        assert reply.payload == DeviceConfig(0, 8, 0, bytes(8))
    finally:
        fe.close()


def test_shmem_config_is_all_zero_without_shmem_negotiated(backend_sim) -> None:
    be, fe = backend_sim()
    try:
        fe.call(FrontendReq.SET_PROTOCOL_FEATURES, int(ProtocolFeature.REPLY_ACK))
        reply = fe.call(FrontendReq.GET_SHMEM_CONFIG)
        assert reply.payload == ShmemConfig.from_regions({})
        be.wait_log("GET_SHMEM_CONFIG without SHMEM negotiated")
    finally:
        fe.close()


def test_no_shmem_request_without_reply_ack(backend_sim) -> None:
    be, fe = backend_sim("map 0 0 64K\n")
    try:
        acked = SHMEM | ProtocolFeature.BACKEND_REQ | ProtocolFeature.BACKEND_SEND_FD
        fe.call(FrontendReq.SET_PROTOCOL_FEATURES, int(acked))
        backend = fe.open_backend_channel(ack=False)  # no REPLY_ACK: no ack owed
        lines = be.wait_lines(1)
        assert lines == [
            "map 0 0 64K: not sent: REPLY_ACK was not negotiated: "
            "the outcome of a map could never be known"
        ]
        assert "no SHMEM request will be sent" in be.log()
        # a request would have been sent before its line was written: no need to wait for it
        assert not backend.wait_readable(0)
    finally:
        fe.close()


def _negotiate_all(fe: HandFrontend) -> Channel:
    offered = fe.call(FrontendReq.GET_PROTOCOL_FEATURES).payload
    fe.call(FrontendReq.SET_PROTOCOL_FEATURES, offered)
    return fe.open_backend_channel()


def test_a_front_end_that_never_answers_fails_the_request(backend_sim) -> None:
    # The short reply timeout is what is tested: this front-end never answers.
    be, fe = backend_sim("map 0 0 64K\nsleep 1\n", "--reply-timeout", "0.5")
    try:
        backend = _negotiate_all(fe)
        msg = backend.recv(timeout=PATIENCE)
        assert msg.request == BackendReq.SHMEM_MAP and msg.need_reply and len(msg.fds) == 1
        assert msg.payload == ShmemMap(0, 0, 64 << 10, 0, 1)
        close_fds(msg.fds)
        lines = be.wait_lines(2)
        assert lines[0] == (
            "map 0 0 64K: failed: no message within 0.5s (request reported failed; buffer kept)"
        )
        assert be.alive()
    finally:
        fe.close()


def test_a_second_answer_is_read_off_and_reported(backend_sim) -> None:
    be, fe = backend_sim("map 0 0 64K\nmap 0 0x10000 64K\n")
    try:
        backend = _negotiate_all(fe)
        ok = encode_u64_reply(BackendReq.SHMEM_MAP, 0)
        for n in range(2):
            msg = backend.recv(timeout=PATIENCE)
            close_fds(msg.fds)
            # answered twice, in one write: the second answer is there before the next map
            backend.send(ok + ok if n == 0 else ok)
        assert be.wait_lines(2) == ["map 0 0 64K: ok", "map 0 0x10000 64K: ok"]
        assert "reply nobody asked for" in be.log()
    finally:
        fe.close()


def test_a_bad_script_is_refused_before_anything_runs(spawn, tmp_path) -> None:
    (tmp_path / "bad.txt").write_text("map 0 0 64K\nmap 0 zero 4K\n")
    be = spawn(
        "backend_sim", "--listen", str(tmp_path / "s.sock"), "--script", str(tmp_path / "bad.txt")
    )
    assert be.wait_exit(PATIENCE) == 2
    assert "line 2: shm_offset: 'zero' is not a size" in be.log()


@pytest.mark.parametrize(
    ("regions", "message"),
    [
        ("0=1000", "not a multiple of the page size"),
        ("300=8M", "outside 0-255"),
        ("0=8M,0=4K", "given twice"),
        ("0:8M", "write each region as SHMID=SIZE"),
    ],
)
def test_bad_regions_are_explained(spawn, tmp_path, regions: str, message: str) -> None:
    be = spawn("backend_sim", "--listen", str(tmp_path / "s.sock"), "--regions", regions)
    assert be.wait_exit(PATIENCE) == 2
    assert message in be.log()
    assert "Traceback" not in be.log()


def test_a_device_preset_sets_the_layout_and_the_scenario_options_override(
    spawn, tmp_path
) -> None:
    sock = str(tmp_path / "vhost.sock")
    gpu = spawn("backend_sim", "--listen", sock, "--device", "gpu", name="gpu")
    status = gpu.wait_state("listening")
    assert status["device"] == "gpu"
    assert status["regions"] == {"1": 192 * MiB, "2": 64 * MiB}  # one 256 MiB BAR's worth
    gpu.stop()
    fs = spawn("backend_sim", "--listen", sock, "--device", "fs", "--regions", "0=64M",
               "--reply-timeout", str(PATIENCE), name="fs")  # fmt: skip
    assert fs.wait_state("listening")["regions"] == {"0": 64 * MiB}
    fe = spawn("frontend", "--connect", sock)
    fe.wait_connected()
    # no scenario named: the one that fits the device, virtiofs' DAX windows of a file
    with ControlClient(str(fs.control)) as client:
        started = client.execute("scenario-start", rate=1000, seed=1)
        assert started["name"] == "dax"
        fs.wait_status(lambda s: s["mapped_count"] > 0, "a DAX window mapped")
        assert client.execute("scenario-stop")["name"] == "dax"
    files = {b["file"] for b in fs.status()["buffers"]}  # type: ignore[index]
    assert files and all(not f.startswith("memfd:") for f in files), files
