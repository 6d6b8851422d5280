"""relay_floor.c, line for line in Python: the least a relay written in Python costs.

    python bench/relay_floor.py [-B SPIN_US] FRONT_SOCKET BACK_SOCKET

The same reads, sends, SET_BACKEND_REQ_FD rewrite and waiting as relay_floor.c, with
nothing decoded, checked or recorded (see there). `shmemctl bench --tap --floor
bench/relay_floor.py` runs it in the tap's place: beside the C floor, it tells what the
interpreter costs a relay from what the tap's own work costs.
"""

from __future__ import annotations

import argparse
import array
import os
import select
import socket
import struct
import time

HEADER = 12
FLAG_REPLY = 0x4
SET_BACKEND_REQ_FD = 21
ANCILLARY = socket.CMSG_SPACE(253 * 4)
READ_FLAGS = socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC
RIGHTS = (socket.SOL_SOCKET, socket.SCM_RIGHTS)


class Direction:
    def __init__(self, source: socket.socket, sink: socket.socket, main_from_front: bool):
        self.source, self.sink, self.main_from_front = source, sink, main_from_front
        self.data = b""
        self.fds: list[int] = []
        self.want = HEADER


class Relay:
    def __init__(self) -> None:
        self.poller = select.poll()
        self.directions: dict[int, Direction] = {}

    def add_channel(self, front: socket.socket, back: socket.socket, main: bool) -> None:
        for source, sink, from_front in ((front, back, main), (back, front, False)):
            self.directions[source.fileno()] = Direction(source, sink, from_front)
            self.poller.register(source, select.POLLIN)

    def step(self, d: Direction) -> bool:
        """One read from `d`; False when its side hung up."""
        try:
            data, ancdata, _, _ = d.source.recvmsg(d.want - len(d.data), ANCILLARY, READ_FLAGS)
        except BlockingIOError:
            return True
        if not data:
            return False
        for level, kind, raw in ancdata:
            if (level, kind) == RIGHTS:
                d.fds.extend(array.array("i", raw[: len(raw) - len(raw) % 4]))
        d.data += data
        if len(d.data) < d.want:
            return True
        request, flags, size = struct.unpack_from("<III", d.data)
        if d.want == HEADER and size:
            d.want = HEADER + size
            return True
        handed = request == SET_BACKEND_REQ_FD and not flags & FLAG_REPLY and d.fds
        if d.main_from_front and handed:
            mine, theirs = socket.socketpair()
            self.add_channel(socket.socket(fileno=d.fds[0]), mine, False)
            d.fds[0] = theirs.detach()  # closed once sent: the back-end has its copy
        if d.fds:
            d.sink.sendmsg([d.data], [(*RIGHTS, array.array("i", d.fds).tobytes())])
        else:
            d.sink.sendall(d.data)
        for fd in d.fds:
            os.close(fd)
        d.data, d.fds, d.want = b"", [], HEADER
        return True

    def run(self, spin: float) -> None:
        while True:
            until = time.perf_counter() + spin
            while not (ready := self.poller.poll(0)) and time.perf_counter() < until:
                os.sched_yield()
            for fd, _ in ready or self.poller.poll():
                d = self.directions[fd]
                if not self.step(d):
                    if d.main_from_front:
                        return  # the front-end left
                    self.poller.unregister(fd)  # a backend channel ended


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-B", dest="spin_us", type=float, default=200)
    parser.add_argument("front")
    parser.add_argument("back")
    args = parser.parse_args()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(args.front):
        os.unlink(args.front)
    listener.bind(args.front)
    listener.listen(1)
    back = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    back.connect(args.back)
    front, _ = listener.accept()
    listener.close()
    os.unlink(args.front)
    relay = Relay()
    relay.add_channel(front, back, True)
    relay.run(args.spin_us / 1e6)


if __name__ == "__main__":
    main()
