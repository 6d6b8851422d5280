"""The channel over a real socket pair: reading ahead keeps each message's fds with it."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Iterator

import pytest

from shmemctl.channel import Channel, send_with_fds
from shmemctl.wire import BackendReq, ChannelKind, ShmemMap, WireError, encode_shmem_request

PAGE = 4096


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def _shmem(req: BackendReq, offset: int = 0, *, need_reply: bool = False) -> bytes:
    return encode_shmem_request(req, ShmemMap(0, offset, PAGE), need_reply=need_reply)


@contextlib.contextmanager
def reading_ahead() -> Iterator[tuple[Channel, socket.socket, int]]:
    """A channel that reads ahead, the other end of its socket pair (the sender) and a
    memfd to send; all closed after, and no fd of this process left open that was not
    open before."""
    before = _open_fds()
    ours, theirs = socket.socketpair()
    channel = Channel(ours, ChannelKind.BACKEND, replies=False, read_ahead=True)
    memfd = os.memfd_create("shmemctl-test")
    try:
        yield channel, theirs, memfd
    finally:
        channel.close()
        theirs.close()
        os.close(memfd)
    assert _open_fds() == before


def test_reading_ahead_keeps_fds_with_their_message() -> None:
    """Three messages queued at once, the last carrying a memfd: a channel that reads
    ahead takes them in one read (which the memfd ends), hands the fd to that message
    alone, says a message is there while it holds one the socket no longer has, goes
    on with what comes after, and leaks nothing."""
    with reading_ahead() as (channel, theirs, memfd):

        def send(req: BackendReq, offset: int) -> None:
            fds = [memfd] if req == BackendReq.SHMEM_MAP else []
            send_with_fds(theirs, _shmem(req, offset * PAGE), fds)

        for i, req in enumerate([BackendReq.SHMEM_UNMAP, BackendReq.SHMEM_UNMAP,
                                 BackendReq.SHMEM_MAP]):  # fmt: skip
            send(req, i)
        got = [channel.recv(timeout=5)]
        assert channel.holding == 2 * 52
        assert not channel._poll.poll(0)  # the socket is empty...
        assert channel.wait_readable(0)  # ...and yet a message is there
        send(BackendReq.SHMEM_UNMAP, 3)
        got += [channel.recv(timeout=5) for _ in range(3)]
        assert [m.payload.shm_offset // PAGE for m in got] == [0, 1, 2, 3]
        assert [len(m.fds) for m in got] == [0, 0, 1, 0]
        (fd,) = got[2].fds
        assert os.fstat(fd).st_ino == os.fstat(memfd).st_ino
        os.close(fd)
        assert channel.holding == 0 and not channel.wait_readable(0)


def test_a_channel_closed_while_holding_a_message_closes_its_fds() -> None:
    """A message read ahead but never taken still owns its fd: closing the channel
    (as the context ends, before its fds are counted) closes it."""
    with reading_ahead() as (channel, theirs, memfd):
        send_with_fds(theirs, _shmem(BackendReq.SHMEM_UNMAP), [])
        # the map, cut short: still unfinished when the channel is closed
        send_with_fds(theirs, _shmem(BackendReq.SHMEM_MAP)[:30], [memfd])
        assert channel.recv(timeout=5).fds == ()
        assert channel.holding == 30


def test_reading_past_a_refused_message_keeps_the_next_one() -> None:
    """A refused header (version 2) sent with an fd, then its payload and a good
    message with an fd of its own in one more send: reading past the refused payload
    reads ahead into the good message, which the next recv still gets, fd and all."""
    with reading_ahead() as (channel, theirs, memfd):
        send_with_fds(theirs, struct.pack("<III", 9, 0x2, 40), [memfd])
        good = _shmem(BackendReq.SHMEM_MAP, need_reply=True)
        send_with_fds(theirs, bytes(40) + good, [memfd])
        with pytest.raises(WireError):
            channel.recv(timeout=5)
        message = channel.recv(timeout=5)
        assert message.request == BackendReq.SHMEM_MAP and len(message.fds) == 1
        os.close(message.fds[0])


def test_the_start_of_a_header_read_ahead_waits_for_its_rest() -> None:
    """A message and the first bytes of the next one's header arrive in one read: the
    first is there at once, the second only once the rest of its header comes."""
    with reading_ahead() as (channel, theirs, _memfd):
        unmap = _shmem(BackendReq.SHMEM_UNMAP)
        theirs.sendall(unmap + unmap[:8])
        assert channel.recv(timeout=5).request == BackendReq.SHMEM_UNMAP
        assert channel.holding == 8
        assert not channel.wait_readable(0)  # part of a header: nothing to take yet
        theirs.sendall(unmap[8:])
        assert channel.wait_readable(5)
        assert channel.recv(timeout=5).request == BackendReq.SHMEM_UNMAP


def test_a_send_that_may_not_wait_sends_what_goes_at_once_and_no_fd_without_a_byte() -> None:
    """What a relay sends while others wait on it: into a socket with no room, nothing
    goes, not even the fd; once there is room, bytes and fd go together."""
    before = _open_fds()
    ours, theirs = socket.socketpair()
    memfd = os.memfd_create("shmemctl-test")
    try:
        filler = _shmem(BackendReq.SHMEM_UNMAP)
        queued = 0
        while send_with_fds(ours, filler, [], wait=False):  # until the peer's side is full
            queued += 1
        message = _shmem(BackendReq.SHMEM_MAP)
        assert send_with_fds(ours, message, [memfd], wait=False) == 0
        theirs.settimeout(5)
        drained = b""
        while len(drained) < queued * len(filler):
            chunk, ancdata, _, _ = theirs.recvmsg(65536, socket.CMSG_SPACE(4))
            assert chunk and not ancdata  # the fd of the map that did not go never came
            drained += chunk
        assert drained == filler * queued
        assert send_with_fds(ours, message, [memfd], wait=False) == len(message)
        data, ancdata, _, _ = theirs.recvmsg(len(message), socket.CMSG_SPACE(4))
        assert data == message
        ((_, _, rights),) = ancdata
        (fd,) = struct.unpack("i", rights)
        assert os.fstat(fd).st_ino == os.fstat(memfd).st_ino
        os.close(fd)
    finally:
        ours.close()
        theirs.close()
        os.close(memfd)
    assert _open_fds() == before
