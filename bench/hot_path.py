"""CPU cost of one SHMEM_MAP + SHMEM_UNMAP round trip through both endpoints' code,
in one thread (no scheduler wake-ups), so code changes show up undiluted; and each
side's share of it (the front-end serving the request, the device sending it and
reading the answer).

    python bench/hot_path.py [PAIRS]
"""

from __future__ import annotations

import os
import socket
import sys
import time

from shmemctl.backend import BackendChannel
from shmemctl.channel import Channel
from shmemctl.frontend.endpoint import Frontend, FrontendOptions
from shmemctl.shmem import RegionTable
from shmemctl.wire import BackendReq, ChannelKind, ShmemMap
from shmemctl.wire.messages import encode_shmem_request

#: the one region both scripts map into, and the one mapping they make and unmake
REGIONS = {0: 64 << 20}
MAPPING = ShmemMap(0, 0x10000, 4096, 0)


def served_frontend(sock: socket.socket) -> tuple[Frontend, Channel]:
    """A front-end past its handshake (SHMEM and REPLY_ACK negotiated, REGIONS laid
    out) and its backend channel on `sock`, as it serves one."""
    fe = Frontend(FrontendOptions(connect="unused"))
    fe.negotiated.shmem = fe.negotiated.reply_ack = True
    fe.regions = RegionTable(REGIONS)
    return fe, Channel(sock, ChannelKind.BACKEND, replies=False, read_ahead=True)


def mapped_file(name: str) -> int:
    """A memfd as long as MAPPING, for its SHMEM_MAPs."""
    fd = os.memfd_create(name)
    os.ftruncate(fd, MAPPING.len)
    return fd


def main(pairs: int = 20000) -> None:
    a, b = socket.socketpair()
    fe, fe_channel = served_frontend(a)
    be = BackendChannel(b)
    fd = mapped_file("hot-path")
    m = MAPPING
    # Each request is written first, then served, then its reply read: the same
    # calls the two threads make, minus the waiting. Each side's share is timed apart.
    send, recv = be.channel.send, be.channel.recv
    handle, clock = fe._handle_backend, time.perf_counter_ns
    fe_ns = be_ns = 0
    start = time.process_time()  # CPU, not wall: a busy machine must not inflate it
    for _ in range(pairs):
        for req, fds in ((BackendReq.SHMEM_MAP, (fd,)), (BackendReq.SHMEM_UNMAP, ())):
            t0 = clock()
            send(encode_shmem_request(req, m, need_reply=True), fds)
            t1 = clock()
            handle(fe_channel, fe_channel.recv(), time.perf_counter())
            t2 = clock()
            recv(timeout=1)
            be_ns += t1 - t0 + clock() - t2
            fe_ns += t2 - t1
    elapsed = time.process_time() - start
    print(
        f"{elapsed / pairs * 1e6:.1f} us CPU per map+unmap pair, both sides, {pairs} pairs: "
        f"front-end {fe_ns / pairs / 1e3:.1f} us, device {be_ns / pairs / 1e3:.1f} us"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20000)
