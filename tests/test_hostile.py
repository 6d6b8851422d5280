"""Hostile peers: after each, the daemon is alive, its fds are back to their baseline,
the kernel holds only what its table holds, and its log says what was wrong."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading

import pytest

from shmemctl.backend import BackendEndpoint, DeviceModel
from shmemctl.channel import Channel, close_fds
from shmemctl.control import ControlClient, ControlError
from shmemctl.daemon import listen_unix
from shmemctl.shmem.procmaps import Segment
from shmemctl.wire import BackendReq, ChannelKind, FrontendReq, ShmemMap, encode
from shmemctl.wire.messages import Message, encode_shmem_request

from .conftest import PAGE, PATIENCE, MiB, fd_count, memfd, region_bases, segments, wait_until


class HostileBackend(BackendEndpoint):
    """Answers the handshake like a device, except GET_SHMEM_CONFIG: those bytes are ours."""

    def __init__(self, path: str, config_reply: bytes | None = None) -> None:
        super().__init__(DeviceModel({0: 8 * MiB}), reply_timeout=PATIENCE)
        self.config_reply = config_reply
        self.listener = listen_unix(path)
        threading.Thread(target=self._serve_all, daemon=True).start()

    def _serve_all(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            # the front-end hanging up on us is the point of these tests
            with contextlib.suppress(Exception):
                self.serve(Channel(sock, ChannelKind.MAIN, replies=False))

    def _handle(self, main: Channel, msg: Message) -> tuple[int, ...]:
        if msg.request == FrontendReq.GET_SHMEM_CONFIG and self.config_reply is not None:
            main.send(self.config_reply)
            return ()
        return super()._handle(main, msg)

    def close(self) -> None:
        self.listener.close()


def config_bytes(payload: bytes) -> bytes:
    return struct.pack("<III", FrontendReq.GET_SHMEM_CONFIG, 0x5, len(payload)) + payload


def sizes(*entries: int, nregions: int | None = None) -> bytes:
    table = list(entries) + [0] * (256 - len(entries))
    count = sum(1 for e in entries if e) if nregions is None else nregions
    return struct.pack("<II256Q", count, 0, *table)


@pytest.mark.parametrize(
    ("reply", "words"),
    [
        (config_bytes(sizes(8 * MiB)[:2048]), "wrong payload size"),
        (config_bytes(sizes(8 * MiB) + b"\0" * 8), "wrong payload size"),
        (config_bytes(sizes(4096 + 512)), "is not a multiple of the page size"),
        (config_bytes(sizes(1 << 63)), "the limit is"),
        (config_bytes(sizes((1 << 64) - 4096, (1 << 64) - 4096)), "the limit is"),
        (config_bytes(sizes(8 * MiB, nregions=300)), "nregions 300 > 256"),
    ],
    ids=["short", "long", "not-page-multiple", "2^63", "sum-overflows", "nregions-300"],
)
def test_hostile_shmem_config(spawn, tmp_path, reply: bytes, words: str) -> None:
    path = str(tmp_path / "vhost.sock")
    backend = HostileBackend(path, reply)
    try:
        fe = spawn("frontend", "--connect", path, "--reconnect", "0.5")
        fe.wait_log(words)
        # it survives the refusal: it comes back for another try and refuses the layout
        # again (a third connection begins only once the second has ended)
        fe.wait_status(lambda s: s["counters"]["connections"] >= 3, "a third connection")
        assert fe.log().count("connection ended") >= 2  # said before each one ends
        assert fe.alive()
        assert "region 0:" not in fe.log(), "nothing may be reserved from a bad layout"
        with ControlClient(str(tmp_path / "run" / "default" / "frontend.ctl")) as c:
            status = c.execute("query-status")
        assert status["regions"] == [] and status["disagreements"] == []
        assert "Traceback" not in fe.log()
    finally:
        backend.close()


def test_nregions_that_disagrees_with_the_sizes_is_logged_not_fatal(spawn, tmp_path) -> None:
    path = str(tmp_path / "vhost.sock")
    backend = HostileBackend(path, config_bytes(sizes(0, 8 * MiB, nregions=2)))
    try:
        fe = spawn("frontend", "--connect", path)
        assert len(fe.wait_connected()["regions"]) == 1
        # said during the handshake, before it is done
        assert "nregions is 2 but 1 sizes are non-zero; the sizes win" in fe.log()
    finally:
        backend.close()


def settled(fe, baseline: int) -> None:
    wait_until(lambda: fd_count(fe.pid) <= baseline, what="fds back to the baseline")
    assert fe.alive()


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (
            struct.pack("<III", 9, 0x5, 8) + b"\0" * 8,
            "REPLY flag on a message that must be a request",
        ),
        (struct.pack("<III", 9, 0x2, 40) + b"\0" * 40, "bad version bits"),
        (struct.pack("<III", 9, 0x41, 40) + b"\0" * 40, "reserved flag bits set"),
        (struct.pack("<III", 9, 0x9, 39) + b"\0" * 39, "wrong payload size"),
        (struct.pack("<III", 9, 0x9, 0xFFFF_FFFF), "payload larger than 4096 bytes"),
        (struct.pack("<II", 9, 0x9), "peer closed the connection inside a message header"),
    ],
    ids=["reply-on-request", "version", "reserved-bits", "short-payload", "4GiB", "half-header"],
)
def test_hostile_backend_channel(driven, data: bytes, words: str) -> None:
    backend, fe = driven()
    backend.wait_ready()
    bases = region_bases(fe)
    buf = memfd(MiB)
    try:
        assert backend.map(ShmemMap(0, 0, MiB, 0), (buf,)) == "ok"
    finally:
        os.close(buf)
    connected = fd_count(fe.pid)
    backend.send_raw(data)
    if words.startswith("peer closed"):
        backend.channel.sock.shutdown(socket.SHUT_WR)
    fe.wait_dropped()
    # both said before the state changes
    assert words in fe.log()
    assert "dropped 1 mappings" in fe.log()
    assert segments(fe.pid, bases[0], 8 * MiB) == [Segment(0, 8 * MiB, "none")]
    # the two channel sockets went with the connection, and nothing else is left open
    wait_until(lambda: fd_count(fe.pid) == connected - 2, what="fds back to the baseline")
    assert fe.alive() and "Traceback" not in fe.log()


def test_unknown_backend_requests_are_refused_and_served_on(driven) -> None:
    backend, fe = driven()
    backend.wait_ready()
    for request in (1, 3, 42, 0xFFFF_FFFF):
        backend.send_raw(struct.pack("<III", request, 0x9, 0))
        assert backend.reply() != 0
    buf = memfd(PAGE)
    try:
        assert backend.map(ShmemMap(0, 0, PAGE, 0), (buf,)) == "ok"
    finally:
        os.close(buf)
    assert "is not supported; refusing it" in fe.log()


def test_a_file_truncated_after_it_was_mapped(driven, tmp_path) -> None:
    """The front-end never touches mapped memory itself: no SIGBUS, and `read` says why."""
    backend, fe = driven()
    backend.wait_ready()
    path = tmp_path / "shrinking"
    path.write_bytes(b"x" * (64 << 10))
    fd = os.open(path, os.O_RDWR)
    try:
        assert backend.map(ShmemMap(0, 0, 64 << 10, 0), (fd,)) == "ok"
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)
    ctl = str(tmp_path / "run" / "default" / "frontend.ctl")
    with ControlClient(ctl) as c:
        with pytest.raises(ControlError) as info:
            c.execute("read", shmid=0, offset=0, length=16)
        assert "its file is shorter" in info.value.desc
        assert c.execute("query-status")["disagreements"] == []
    assert fe.alive()


def test_a_backend_that_stops_reading(driven) -> None:
    """Replies pile up unread until the front-end's send times out: it drops the peer."""
    backend, fe = driven()
    backend.wait_ready()
    buf = memfd(PAGE)
    sock = backend.channel.sock
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        m = encode_shmem_request(BackendReq.SHMEM_MAP, ShmemMap(0, 0, PAGE, 0), need_reply=True)
        u = encode_shmem_request(BackendReq.SHMEM_UNMAP, ShmemMap(0, 0, PAGE), need_reply=True)
        sock.settimeout(PATIENCE)
        try:
            for _ in range(100_000):  # never reads a single reply
                backend.send_raw(m, (buf,))
                backend.send_raw(u)
        except Exception:
            pass  # our own send fails once the front-end hung up
    finally:
        os.close(buf)
    fe.wait_log("peer stopped reading: send timed out")
    assert fe.alive()


# --------------------------------------------------- backend_sim under a hostile front-end


@pytest.fixture
def sim(spawn, tmp_path):
    path = str(tmp_path / "vhost.sock")
    be = spawn("backend_sim", "--listen", path, "--regions", "0=8M")
    be.wait_state("listening")
    baseline = fd_count(be.pid)
    return be, path, baseline


def hostile_frontend(path: str, data: bytes, fds: tuple[int, ...] = ()) -> bytes:
    """Connect, send `data` (with `fds`) and nothing more (a half-close), and return all that
    backend_sim sends before it hangs up: it hangs up once it has dealt with `data`, either
    because `data` broke the protocol or because it then reads the end of the stream."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    ch = Channel(s, ChannelKind.MAIN, replies=True)
    try:
        ch.send(data, fds)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(PATIENCE)
        got = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:  # it hung up with bytes of ours unread
                return got
            if not chunk:
                return got
            got += chunk
    finally:
        s.close()


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"\x13\x37" * 40, "dropping the front-end"),
        (struct.pack("<III", 1, 0x5, 0), "REPLY flag on a message that must be a request"),
        (struct.pack("<III", 1, 0x3, 0), "bad version bits"),
        (struct.pack("<III", 1, 0x101, 0), "reserved flag bits"),
        (struct.pack("<III", 2, 0x1, 0xFFFF_FFFF), "payload larger than 4096 bytes"),
        (struct.pack("<III", 2, 0x1, 4) + b"\0" * 4, "wrong payload size"),
        (struct.pack("<III", 2, 0x1, 8) + b"\0" * 3, "inside a message payload"),
    ],
    ids=["garbage", "reply-on-request", "version", "reserved", "4GiB", "short-u64", "hang-up"],
)
def test_backend_sim_survives_a_hostile_frontend(sim, data: bytes, words: str) -> None:
    be, path, baseline = sim
    hostile_frontend(path, data)
    be.wait_log(words)
    settled(be, baseline)
    # and it serves the next front-end
    reply = hostile_frontend(path, encode(ChannelKind.MAIN, FrontendReq.GET_FEATURES))
    assert len(reply) == 20
    assert "Traceback" not in be.log()


def test_backend_sim_closes_fds_of_messages_it_refuses(sim) -> None:
    be, path, baseline = sim
    fds = tuple(os.eventfd(0) for _ in range(8))
    try:
        hostile_frontend(path, encode(ChannelKind.MAIN, FrontendReq.GET_FEATURES), fds)
        hostile_frontend(path, struct.pack("<III", 99, 0x9, 0), fds[:2])
        hostile_frontend(path, struct.pack("<III", 1, 0x3, 0), fds[:3])
    finally:
        close_fds(fds)
    be.wait_log("carried 8 fds it may not carry")
    settled(be, baseline)


def test_unknown_main_requests(sim) -> None:
    be, path, baseline = sim
    # no reply of its own: a failure ack, and the connection goes on
    reply = hostile_frontend(path, struct.pack("<III", 99, 0x9, 0))
    assert reply == b""  # REPLY_ACK was not negotiated on this connection: nothing owed
    be.wait_log("is not supported; failing it")
    # a getter we do not implement: it cannot be answered, so the connection ends
    hostile_frontend(path, struct.pack("<III", FrontendReq.GET_INFLIGHT_FD, 0x1, 0))
    be.wait_log("needs a reply this device cannot give")
    settled(be, baseline)
