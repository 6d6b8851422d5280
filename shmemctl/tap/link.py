"""One channel of a relayed pair: a socket to each side and one thread that forwards each
unit the `Framer` cuts from either side, exactly, then closes its copies of the fds.

One thread for both directions, polling both sockets and spinning briefly before it
sleeps, as the daemons do: a request and its answer follow each other within tens of
microseconds, and a thread per direction would hand the interpreter back and forth
and sleep between them (each wake-up costs as much again on a small VM).

What a unit means (the observer, events, the SET_BACKEND_REQ_FD rewrite) is the tap's
business: a link calls `Relay.forward` for each unit and only moves bytes and fds.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import logging
import select
import socket
import struct
import termios
import threading
from collections.abc import Callable
from typing import Protocol

from ..channel import DEFAULT_BUSY_POLL, SCM_MAX_FD, Channel, fds_from, spin
from ..events import EventHub
from ..session.observer import BACKEND, FRONTEND
from ..wire.constants import ChannelKind
from .framer import Framer, Unit, replies_from

log = logging.getLogger("tap")

#: Room for the most fds the kernel passes in one message, so that no message a peer
#: can send loses an fd to MSG_CTRUNC in the tap.
_ANCBUF = socket.CMSG_SPACE(SCM_MAX_FD * array.array("i").itemsize)
_NOWAIT_FLAGS = int(socket.MSG_CMSG_CLOEXEC) | int(socket.MSG_DONTWAIT)
_CTRUNC = int(socket.MSG_CTRUNC)


def receive(sock: socket.socket, n: int) -> tuple[bytes, list[int], bool]:
    """Up to `n` bytes, the fds that came with them, and whether fds were cut off;
    BlockingIOError when nothing is there."""
    data, ancdata, flags, _ = sock.recvmsg(n, _ANCBUF, _NOWAIT_FLAGS)
    return data, fds_from(ancdata), bool(flags & _CTRUNC)


def other(side: str) -> str:
    return BACKEND if side == FRONTEND else FRONTEND


def unread(sock: socket.socket) -> int:
    """Bytes the kernel holds for `sock` that nobody has read yet (FIONREAD)."""
    got = fcntl.ioctl(sock.fileno(), termios.FIONREAD, struct.pack("i", 0))
    return int(struct.unpack("i", got)[0])


class Relay(Protocol):
    """What a link asks of the tap for each unit."""

    def forward(self, link: Link, sender: str, unit: Unit) -> bool:
        """Send `unit` on to the side that is not `sender`; False if that failed. The
        unit's fds are closed by then, whatever happened."""
        ...


class Link:
    """One channel between the two sides. Each socket's `Channel` only sends (the
    protocol trace of each forwarded message comes from it); reading is the link's own,
    raw, so that nothing the codec refuses is lost or closed before it is forwarded."""

    def __init__(
        self,
        relay: Relay,
        kind: ChannelKind,
        front: socket.socket,
        back: socket.socket,
        on_end: Callable[[Link, str, str], None],
        trace: EventHub,
    ) -> None:
        self.relay = relay
        self.kind = kind
        self.on_end = on_end
        #: per side, the Channel that sends to it (and would read what that side sends:
        #: replies where that side answers on this channel)
        self.to = {
            side: Channel(sock, kind, replies=replies_from(kind, side))
            for side, sock in ((FRONTEND, front), (BACKEND, back))
        }
        for channel in self.to.values():
            # the one record of each forwarded message: the channel that sends it on
            channel.trace, channel.trace_role = trace, "tap"
        self.framers = {side: Framer(kind, replies=replies_from(kind, side)) for side in self.to}
        self._thread = threading.Thread(target=self._relay, daemon=True,
                                        name=f"tap-{kind.value}")  # fmt: skip
        #: held by the link's thread from a read of that side until the unit it completes
        #: is judged and sent: who holds none is between units (`may_carry_unseen`). Only
        #: the front-end's answers on a backend channel need it: whether one may be on its
        #: way decides whether a request on the main channel came before it.
        self._reading: dict[str, threading.Lock] = (
            {FRONTEND: threading.Lock()} if kind is ChannelKind.BACKEND else {}
        )

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        """Wake both directions; each sees EOF or an error and ends."""
        for channel in self.to.values():
            channel.shutdown()

    def join(self) -> None:
        if self._thread is not threading.current_thread():
            self._thread.join()

    def may_carry_unseen(self, sender: str) -> bool:
        """Whether `sender` may have sent on this channel something the tap has not yet
        judged: bytes still in the socket, part of a message, or a unit between its read
        and its judgement. True when that cannot be told (an unguarded direction, a
        socket gone)."""
        lock = self._reading.get(sender)
        if lock is None or not lock.acquire(blocking=False):
            return True
        try:
            return self.framers[sender].holding or unread(self.to[sender].sock) > 0
        except OSError:
            return True
        finally:
            lock.release()

    def _relay(self) -> None:
        """Both directions until both ended: read from whichever side has something,
        one read at a time (a message that has begun does not hold the other side up),
        forward what completes; then close both sockets."""
        poller = select.poll()
        sides: dict[int, str] = {}
        for side, channel in self.to.items():
            poller.register(channel.sock, select.POLLIN)
            sides[channel.sock.fileno()] = side
        relaying = set(self.to)
        try:
            while relaying:
                for fd, _events in _ready(poller):
                    sender = sides[fd]
                    if sender not in relaying:
                        continue
                    ended = self._turn(sender)
                    if ended:
                        relaying.discard(sender)
                        poller.unregister(fd)
                        self._end(sender, ended)
        except Exception as exc:  # a bug must cost this connection, never the tap
            log.exception("relaying the %s channel", self.kind.value)
            for sender in relaying:
                self._end(sender, f"internal error: {exc!r}")
        finally:
            for channel in self.to.values():
                channel.close()

    def _turn(self, sender: str) -> str:
        """Read from `sender` until a unit is forwarded or nothing more is there (then
        the other side has its turn); why that direction ended, or "" to go on."""
        framer = self.framers[sender]
        with self._reading.get(sender) or contextlib.nullcontext():
            while True:
                try:
                    ended = self._step(sender)
                except BlockingIOError:
                    return ""  # the rest of a message has not come yet
                if ended or not framer.holding:
                    return ended

    def _end(self, sender: str, why: str) -> None:
        self.framers[sender].close()
        # reported before the receiver sees the end: the receiver closing its side in
        # answer must not be taken for the side that ended the connection
        self.on_end(self, sender, why)
        # the receiver sees the end of the stream, as it would without the tap
        with contextlib.suppress(OSError):
            self.to[other(sender)].sock.shutdown(socket.SHUT_WR)

    def _step(self, sender: str) -> str:
        """Read once (twice for a header whose payload has come with it) and forward the
        unit that completes, if any; why this direction ended, or "" to go on.
        BlockingIOError when nothing is there."""
        source = self.to[sender].sock
        framer = self.framers[sender]
        try:
            data, fds, cut = receive(source, framer.wanted)
        except BlockingIOError:
            raise
        except OSError as exc:
            return _failed(sender, exc)
        failed = ""
        rest = framer.payload_after(data)
        if rest:
            # most often there already: the framer then takes the message in one piece
            try:
                payload, more, more_cut = receive(source, rest)
                data, fds, cut = data + payload, fds + more, cut or more_cut
            except BlockingIOError:
                pass  # not yet: the framer holds the header and asks for the rest
            except OSError as exc:
                failed = _failed(sender, exc)  # the header still goes to the framer
        if cut:
            log.warning("%s sent more fds than the kernel passes; some are lost", sender)
        unit = framer.end() if not data else framer.feed(data, fds)
        if unit is not None and not self.relay.forward(self, sender, unit):
            # as a direct connection would: the sender's writes fail from now on
            with contextlib.suppress(OSError):
                source.shutdown(socket.SHUT_RD)
            return f"sending to the {other(sender)} failed"
        if failed:
            return failed
        return "" if data else f"{sender} closed the {self.kind.value} channel"


def _failed(sender: str, exc: OSError) -> str:
    return f"reading from the {sender} failed: {exc.strerror or exc}"


def _ready(poller: select.poll) -> list[tuple[int, int]]:
    """What `poller` has ready: at once if anything, else polling for DEFAULT_BUSY_POLL
    before sleeping until something is."""
    return spin(lambda: poller.poll(0), DEFAULT_BUSY_POLL) or poller.poll()
