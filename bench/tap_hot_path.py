"""CPU cost of relaying one SHMEM_MAP + SHMEM_UNMAP round trip through the tap, in one
thread (no scheduler wake-ups), beside what the two endpoints spend on it: the tap's
share of each hop (read, frame, judge, send on) undiluted by waiting.

    python bench/tap_hot_path.py [PAIRS]
"""

from __future__ import annotations

import socket
import sys
import time

from hot_path import MAPPING, REGIONS, mapped_file, served_frontend

from shmemctl.backend import BackendChannel
from shmemctl.session.observer import BACKEND, FRONTEND
from shmemctl.tap.link import Link
from shmemctl.tap.tap import Endpoint, Tap, TapOptions
from shmemctl.wire import BackendReq, ChannelKind, ProtocolFeature, ShmemConfig
from shmemctl.wire.constants import SHMEM_BIT
from shmemctl.wire.messages import encode_shmem_request


def main(pairs: int = 20000) -> None:
    # the device's socket to the tap, and the tap's to the front-end
    device_sock, tap_back = socket.socketpair()
    tap_front, fe_sock = socket.socketpair()
    tap = Tap(TapOptions(Endpoint.parse("listen:unused"), Endpoint.parse("connect:unused")))
    state = tap.watch.observer.state  # as if the pair had negotiated SHMEM and its layout
    state.offered = state.acked = (1 << SHMEM_BIT) | int(ProtocolFeature.REPLY_ACK)
    state.config = ShmemConfig.from_regions(REGIONS)
    state.sizes = dict(REGIONS)
    state.backend_channel = True
    link = Link(tap, ChannelKind.BACKEND, tap_front, tap_back, lambda *_: None, tap.events)
    fe, fe_channel = served_frontend(fe_sock)
    device = BackendChannel(device_sock)
    fd = mapped_file("tap-hot-path")
    m = MAPPING
    requests = [
        (encode_shmem_request(BackendReq.SHMEM_MAP, m, need_reply=True), (fd,)),
        (encode_shmem_request(BackendReq.SHMEM_UNMAP, m, need_reply=True), ()),
    ]
    clock = time.perf_counter_ns
    tap_ns = rest_ns = 0
    start = time.process_time()
    for _ in range(pairs):
        for data, fds in requests:
            t0 = clock()
            device.channel.send(data, fds)
            t1 = clock()
            link._turn(BACKEND)  # the request, on to the front-end
            t2 = clock()
            fe._handle_backend(fe_channel, fe_channel.recv(), time.perf_counter())
            t3 = clock()
            link._turn(FRONTEND)  # its answer, back to the device
            t4 = clock()
            device.channel.recv(timeout=1)
            tap_ns += t2 - t1 + t4 - t3
            rest_ns += t1 - t0 + t3 - t2 + clock() - t4
    elapsed = time.process_time() - start
    broken = sum(tap.watch.violations.values())
    print(
        f"{elapsed / pairs * 1e6:.1f} us CPU per map+unmap pair, {pairs} pairs: "
        f"tap {tap_ns / pairs / 1e3:.1f} us ({tap_ns / pairs / 4e3:.1f} per message), "
        f"both endpoints {rest_ns / pairs / 1e3:.1f} us; violations seen: {broken}"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20000)
