"""A back-end that misbehaves costs its connection, never the front-end: it stays up,
gives back every fd and mapping, and says what was wrong."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from shmemctl.channel import Channel, ChannelError, ChannelTimeout
from shmemctl.daemon import listen_unix
from shmemctl.shmem.procmaps import Segment
from shmemctl.wire import ChannelKind, ShmemMap

from .conftest import (
    PAGE,
    PATIENCE,
    DrivenBackend,
    MiB,
    fd_count,
    memfd,
    region_bases,
    segments,
)


def test_garbage_on_the_backend_channel_drops_the_connection_only(driven) -> None:
    backend, fe = driven()
    backend.wait_ready()
    bases = region_bases(fe)
    buf = memfd(MiB)
    try:
        assert backend.map(ShmemMap(0, 0, MiB, 0), (buf,)) == "ok"
        backend.send_raw(b"\xde\xad\xbe\xef" * 3 + b"garbage", (buf,))
    finally:
        os.close(buf)
    fe.wait_dropped()
    # both said before the state changes
    assert "backend channel: bad version bits" in fe.log()
    assert "dropped 1 mappings" in fe.log()
    assert segments(fe.pid, bases[0], 8 * MiB) == [Segment(0, 8 * MiB, "none")]
    assert fe.alive()


def test_announcing_a_huge_payload_is_refused_without_allocating(driven) -> None:
    backend, fe = driven()
    backend.wait_ready()
    backend.send_raw(struct.pack("<III", 9, 1, 0xFFFF_FFFF))
    fe.wait_log("payload larger than 4096 bytes")
    assert fe.alive()


def test_a_back_end_that_never_answers_the_handshake(spawn, tmp_path) -> None:
    path = str(tmp_path / "silent.sock")
    listener = listen_unix(path)
    listener.settimeout(PATIENCE)
    fe = spawn("frontend", "--connect", path, "--reconnect", "0.2")
    peer, _ = listener.accept()
    try:
        fe.wait_log("no message within 5s")  # the front-end's handshake timeout, under test
        assert fe.alive()
        # and it comes back for another try
        again, _ = listener.accept()
        again.close()
    finally:
        peer.close()
        listener.close()
    fe.wait_status(
        lambda s: s["state"] == "reconnecting" and s["counters"]["connections"] >= 2,
        "a retry after the second connection",
    )
    assert "Traceback" not in fe.log()


def test_a_layout_that_is_not_page_multiples_fails_setup_cleanly(spawn, tmp_path) -> None:
    backend = DrivenBackend(str(tmp_path / "vhost.sock"), {0: PAGE + 512})
    try:
        fe = spawn("frontend", "--connect", str(tmp_path / "vhost.sock"))
        backend.wait_hung_up()
        fe.wait_state("disconnected")  # past the hang-up: the end of that connection
        # said before the state changes
        assert "region 0 size 0x1200 is not a multiple of the page size 0x1000" in fe.log()
        fe.wait_log("staying up disconnected")  # said once the state has changed
        baseline_fds = fd_count(fe.pid)
        assert fe.alive() and baseline_fds < 10
        assert "Traceback" not in fe.log()
    finally:
        backend.close()


def test_a_back_end_that_hangs_up_mid_message(driven) -> None:
    backend, fe = driven()
    backend.wait_ready()
    sock: socket.socket = backend.channel.sock
    sock.send(struct.pack("<III", 9, 9, 40) + b"\0" * 10)  # header and a quarter payload
    sock.shutdown(socket.SHUT_WR)
    fe.wait_log("peer closed the connection inside a message payload")
    assert fe.alive()


def _own_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_fds_of_a_message_cut_short_are_closed_with_it() -> None:
    """A header arrives with an fd, then the peer hangs up inside the payload: the fd that
    came with the header belongs to no message and must not stay open (either daemon reads
    through the same Channel)."""
    ours, theirs = socket.socketpair()
    channel = Channel(ours, ChannelKind.MAIN, replies=False)
    fd = os.memfd_create("cut-short")
    theirs.sendmsg([struct.pack("<III", 12, 0x1, 8) + b"\x90"],  # 1 of 8 payload bytes
                   [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])  # fmt: skip
    theirs.close()
    os.close(fd)
    before = _own_fds()  # the fd in flight is not ours until it is received
    with pytest.raises(ChannelError, match="inside a message payload"):
        channel.recv()
    assert _own_fds() == before
    channel.close()


def test_fds_of_a_message_that_stalls_are_closed_at_the_timeout() -> None:
    ours, theirs = socket.socketpair()
    channel = Channel(ours, ChannelKind.MAIN, replies=False)
    channel.set_recv_timeout(0.2)
    fd = os.memfd_create("stalled")
    theirs.sendmsg([struct.pack("<III", 12, 0x1, 8) + b"\x90"],
                   [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])  # fmt: skip
    os.close(fd)
    before = _own_fds()
    with pytest.raises(ChannelTimeout, match="rest of a message"):
        channel.recv()
    assert _own_fds() == before
    theirs.close()
    channel.close()
