"""CPU cost of one SHMEM_MAP + SHMEM_UNMAP round trip through both endpoints' code,
in one thread (no scheduler wake-ups), so code changes show up undiluted.

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


def main(pairs: int = 20000) -> None:
    a, b = socket.socketpair()
    fe = Frontend(FrontendOptions(connect="unused"))
    fe.negotiated.shmem = fe.negotiated.reply_ack = True
    fe.regions = RegionTable({0: 64 << 20})
    fe_channel = Channel(a, ChannelKind.BACKEND, replies=False)
    be = BackendChannel(b)
    fd = os.memfd_create("hot-path")
    os.ftruncate(fd, 4096)
    m = ShmemMap(0, 0x10000, 4096, 0)
    # Each request is written first, then served, then its reply read: the same
    # calls the two threads make, minus the waiting.
    send, recv = be.channel.send, be.channel.recv
    from shmemctl.wire.messages import encode_shmem_request

    handle = fe._handle_backend
    start = time.process_time()  # CPU, not wall: a busy machine must not inflate it
    for _ in range(pairs):
        send(encode_shmem_request(BackendReq.SHMEM_MAP, m, need_reply=True), (fd,))
        handle(fe_channel, fe_channel.recv())
        recv(timeout=1)
        send(encode_shmem_request(BackendReq.SHMEM_UNMAP, m, need_reply=True))
        handle(fe_channel, fe_channel.recv())
        recv(timeout=1)
    elapsed = time.process_time() - start
    print(f"{elapsed / pairs * 1e6:.1f} us CPU per map+unmap pair, both sides, {pairs} pairs")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20000)
