"""A tiny VIRTIO Shared Memory device, built on shmemctl's back-end endpoint.

It connects to a front-end (a VMM) on SOCKET, offers one 1 MiB shared memory
region, and once SHMEM is usable places a 4 KiB blob that starts with a
greeting at the start of that region, then serves the front-end until it goes.
It prints `mapped` once the front-end acked the map, or `refused ERRNO`.

    python examples/tiny_device.py /run/vm.sock

Its tests, examples/test_tiny_device.py, run it against shmemctl's front-end with
the pytest plugin's `shmem_frontend` fixture.
"""

from __future__ import annotations

import argparse
import errno
import os
import threading

from shmemctl.backend import BackendEndpoint, DeviceModel
from shmemctl.channel import Channel
from shmemctl.daemon import connect_unix
from shmemctl.wire import BackendReq, ChannelKind, ShmemMap
from shmemctl.wire.messages import MMAP_FLAG_WRITE

REGION = 1 << 20
BLOB = 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("socket", help="the front-end's vhost-user socket")
    parser.add_argument("--greeting", default="hello from a tiny device")
    args = parser.parse_args()

    # the protocol is the endpoint's: handshake, GET_SHMEM_CONFIG, the backend channel
    endpoint = BackendEndpoint(DeviceModel({0: REGION}, config_space=b""))
    main_channel = Channel(connect_unix(args.socket), ChannelKind.MAIN, replies=False)
    serving = threading.Thread(target=endpoint.serve, args=(main_channel,), daemon=True)
    serving.start()
    if not endpoint.wait_ready(timeout=30):
        raise SystemExit(f"SHMEM never became usable: {endpoint.why_not_ready()}")

    blob = os.memfd_create("tiny-device-blob")
    try:
        os.ftruncate(blob, BLOB)
        os.pwrite(blob, args.greeting.encode(), 0)
        mapping = ShmemMap(shmid=0, shm_offset=0, len=BLOB, fd_offset=0, flags=MMAP_FLAG_WRITE)
        result = endpoint.shmem_request(BackendReq.SHMEM_MAP, mapping, blob)
    finally:
        os.close(blob)  # the front-end holds the file now; so does nobody else
    if result:  # the reply's u64: a negated errno, or a bare non-zero value
        code = (1 << 64) - result if result > 1 << 63 else result
        print(f"refused {errno.errorcode.get(code, code)}", flush=True)
    else:
        print("mapped", flush=True)
    serving.join()


if __name__ == "__main__":
    main()
