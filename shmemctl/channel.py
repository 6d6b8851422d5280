"""One vhost-user channel over a Unix stream socket: exact reads, fds by SCM_RIGHTS.

fd ownership: a received fd belongs to the `Message` that carried it and
from then on to whoever handles that message, who closes it exactly once
(`close_fds`). fds past what the message may carry are closed here, at once,
and so are all fds of a message that fails to decode.
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from .events import TRACE, EventHub
from .wire import ChannelKind, Message, MessageReader, WireError, decode_body, decode_header
from .wire.constants import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    MAX_FDS,
    request_name,
)
from .wire.messages import Header, summarize

T = TypeVar("T")

_ANCBUF = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
# socket's constants are IntFlag/IntEnum members; arithmetic on those costs
# microseconds per call, so the per-message path uses plain ints.
_RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC)
_DONTWAIT = int(socket.MSG_DONTWAIT)
_CTRUNC = int(socket.MSG_CTRUNC)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)


class ChannelError(Exception):
    """The channel cannot carry on: truncated message, MSG_CTRUNC, I/O error, timeout."""


class ChannelClosed(ChannelError):
    """The peer closed the socket at a message boundary."""


class ChannelTimeout(ChannelError):
    """No message arrived in time."""


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


#: The most fds the kernel passes in one sendmsg (SCM_MAX_FD).
SCM_MAX_FD = 253


def send_with_fds(
    sock: socket.socket, data: bytes, fds: Sequence[int], *, wait: bool = True
) -> int:
    """Send `data` whole, `fds` riding on its first byte; more fds than one sendmsg
    passes ride on as many first bytes as they need (a relay forwarding what arrived in
    several reads does so), each call at most SCM_MAX_FD. OSError as sendmsg raises it.

    With `wait=False`, only what `sock` takes at once, in one sendmsg carrying every fd:
    the bytes it took. 0 means nothing went, no fd either (also when the fds need more
    than one sendmsg); the caller sends the rest when it may wait, without the fds once
    a byte went. Returns how many bytes were sent."""
    if not wait:
        if len(fds) > SCM_MAX_FD:
            return 0
        passed = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        try:
            return sock.sendmsg([data], passed, _DONTWAIT)
        except BlockingIOError:
            return 0
    at = 0
    for first in range(0, len(fds), SCM_MAX_FD):
        rights = array.array("i", fds[first : first + SCM_MAX_FD]).tobytes()
        # the last group of fds takes the rest of the data with it
        end = len(data) if first + SCM_MAX_FD >= len(fds) else at + 1
        sent = sock.sendmsg([data[at:end]], [(_SOL_SOCKET, _SCM_RIGHTS, rights)])
        at += sent
        if at < end:
            sock.sendall(memoryview(data)[at:end])
            at = end
    if at < len(data):
        sock.sendall(memoryview(data)[at:])
    return len(data)


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))


def fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds SCM_RIGHTS brought in a recvmsg's ancillary data."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            usable = len(data) - len(data) % array.array("i").itemsize
            fds.extend(array.array("i", data[:usable]))
    return fds


#: How long a hot reader polls before it sleeps. A wake-up costs 100 us and more
#: on a small VM, so the window must outlast what the peer spends between two
#: messages (a front-end's map and answer, a device's next request: 40-90 us
#: here): at 50 us most answers still found their reader asleep, and acked
#: map+unmap pairs/s in `shmemctl bench` doubled from 50 to 200 (the C floor,
#: spinning as long, does not change). 0 disables it.
DEFAULT_BUSY_POLL = 200e-6


def spin(ready: Callable[[], T], seconds: float) -> T | None:
    """`ready()` again and again until it gives something true, for up to `seconds`
    (DEFAULT_BUSY_POLL's reason); None if it never did.

    Between tries it yields the core to any thread waiting for one: where more threads
    spin than there are cores (a pair and a tap relaying it, three processes in one
    chain on two cores), the one with the next message to handle would otherwise wait
    out a spinner's time slice, milliseconds, for every hop. With nothing else runnable
    on the core, a yield is one cheap system call."""
    deadline = time.perf_counter() + seconds
    while True:
        got = ready()
        if got or time.perf_counter() > deadline:
            return got or None
        os.sched_yield()


#: What a channel that reads ahead asks of each read: a header and payload in one
#: receive, and a run of messages without fds (a batch's unmaps) in one.
READ_AHEAD = 4096


class Channel:
    """A vhost-user channel. `replies` says which kind of message this end receives;
    `busy_poll` is how many seconds `recv` polls before it blocks.

    With `read_ahead`, each read takes whatever has arrived (up to READ_AHEAD bytes)
    instead of exactly what the message in hand still needs, and keeps the rest for
    the next `recv`: one receive a message instead of two. Only for a channel whose
    reader calls `recv` and `wait_readable` and never polls the socket itself, since
    the socket can then be empty while a message waits here."""

    def __init__(
        self,
        sock: socket.socket,
        kind: ChannelKind,
        *,
        replies: bool,
        busy_poll: float = 0.0,
        read_ahead: bool = False,
    ) -> None:
        sock.setblocking(True)
        self.sock = sock
        self.kind = kind
        self.replies = replies
        self.busy_poll = busy_poll
        self.read_ahead = read_ahead
        #: where the protocol trace goes, if anywhere: one `message` event per message
        #: this channel sends or receives, and nobody else traces them (events.TRACE)
        self.trace: EventHub | None = None
        self.trace_role = ""
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._recv_timeout = 0.0
        self._reader = MessageReader(kind, replies=replies)

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def holding(self) -> int:
        """Bytes read off the socket and not yet handed out in a message."""
        return self._reader.buffered

    def set_send_timeout(self, seconds: float) -> None:
        """A peer that stops reading makes send fail after this long instead of hanging us."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(seconds))

    def set_recv_timeout(self, seconds: float) -> None:
        """Every blocking `recv` gives up after this long (ChannelTimeout). The kernel
        keeps the clock, so waiting costs no extra poll per message."""
        self._recv_timeout = seconds
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))

    # ------------------------------------------------------------- sending

    def send(self, data: bytes, fds: Sequence[int] = (), *, wait: bool = True) -> int:
        """Send one whole message, fds riding on its first byte; with `wait=False`, what
        the socket takes at once (`send_with_fds`). Returns how many bytes were sent."""
        if self.trace is not None and self.trace.wants(TRACE):
            self._trace_sent(data, fds)
        try:
            return send_with_fds(self.sock, data, fds, wait=wait)
        except (BlockingIOError, TimeoutError) as exc:
            raise ChannelError("peer stopped reading: send timed out") from exc
        except OSError as exc:
            raise ChannelError(f"send failed: {exc.strerror or exc}") from exc

    # ----------------------------------------------------------- receiving

    def wait_readable(self, timeout: float | None) -> bool:
        """Whether a message read ahead is here (or a header, which `recv` judges
        before it waits for the rest), or something arrives within `timeout`. A few
        bytes of a header read ahead are not enough: the poll waits for the rest."""
        if not self._reader.wanted:
            return True
        return bool(self._poll.poll(None if timeout is None else int(timeout * 1000)))

    def recv(self, timeout: float | None = None) -> Message:
        """The next whole message. Raises ChannelClosed at EOF, ChannelError otherwise,
        WireError for bytes that break the protocol (its fds already closed). Framing
        and decoding are the MessageReader's; this reads what it asks for (or more,
        reading ahead)."""
        if timeout is not None and not self.wait_readable(timeout):
            raise ChannelTimeout(f"no message within {timeout:g}s")
        reader = self._reader
        try:
            message = None if reader.wanted else reader.next_message()
            while message is None:
                message = self._read(reader.wanted)
        except ChannelError:
            # the stream broke or stalled inside a message: the fds that came with its
            # start belong to nobody now
            close_fds(reader.take_pending_fds())
            raise
        except WireError as exc:
            close_fds(exc.fds)
            if exc.header is not None and self.trace is not None and self.trace.wants(TRACE):
                self._trace_undecodable("in", exc.header, exc.payload, exc.fds, exc)
            self._read_past_refused()
            raise
        if message.surplus_fds:
            close_fds(message.surplus_fds)
        if self.trace is not None and self.trace.wants(TRACE):
            self._emit_trace("in", message)
        return message

    def _read(self, n: int, take: bool = True) -> Message | None:
        """Read up to `n` bytes into the reader, and take a message if that completed
        one (unless not `take`): with room for fds at a message's start (where
        SCM_RIGHTS puts them), plainly inside one."""
        reader = self._reader
        inside = reader.buffered
        try:
            if inside and not self.read_ahead:
                data, fds, msg_flags = self.sock.recv(n), [], 0
            else:
                # reading ahead, the next message's fds may come with the rest of this one
                n = max(n, READ_AHEAD) if self.read_ahead else n
                got = self._poll_briefly(n) if self.busy_poll and not inside else None
                data, ancdata, msg_flags, _ = got or self.sock.recvmsg(n, _ANCBUF, _RECV_FLAGS)
                fds = fds_from(ancdata) if ancdata else []
        except BlockingIOError:
            what = "the rest of a message" if inside else "a message"
            raise ChannelTimeout(f"{what} did not arrive within {self._recv_timeout:g}s") from None
        except OSError as exc:
            raise ChannelError(f"receive failed: {exc.strerror or exc}") from exc
        if msg_flags & _CTRUNC:
            close_fds(fds)
            raise ChannelError(f"more than {MAX_FDS} fds attached (MSG_CTRUNC)")
        if not data:
            close_fds(fds)
            if inside or reader.discarding:
                where = "header" if inside and inside < HEADER_SIZE else "payload"
                raise ChannelError(f"peer closed the connection inside a message {where}")
            raise ChannelClosed("peer closed the connection")
        if take:
            message = reader.receive(data, fds)
        else:
            reader.feed(data, fds)
            message = None
        if reader.discarded:
            close_fds(reader.discarded)
            reader.discarded.clear()
        return message

    def _read_past_refused(self) -> None:
        """After a refused header, read past the payload it announced if that comes at
        once, so that whoever reports the fault (the conformance suite) can go on
        reading, and a poll for the next message is not woken by the rest of this one."""
        reader = self._reader
        with contextlib.suppress(ChannelError):
            while reader.discarding and self.wait_readable(0.5):
                # reading ahead, what follows the refused bytes may come too: it stays
                # with the reader (and its fds with it) for the next recv
                self._read(reader.wanted, take=False)

    def _emit_trace(self, direction: str, message: Message) -> None:
        assert self.trace is not None
        data = summarize(message)
        data["role"] = self.trace_role
        data["direction"] = direction
        self.trace.trace_message(data)

    def _trace_sent(self, data: bytes, fds: Sequence[int]) -> None:
        try:
            header = decode_header(data[:HEADER_SIZE], replies=not self.replies)
        except WireError:
            return  # we sent bytes that are not a message (a test's garbage): nothing to show
        payload = data[HEADER_SIZE:]
        try:
            message = decode_body(self.kind, header, payload, tuple(fds))
        except WireError as exc:
            self._trace_undecodable("out", header, payload, fds, exc)
            return
        self._emit_trace("out", message)

    def _trace_undecodable(
        self, direction: str, header: Header, payload: bytes, fds: Sequence[int], exc: WireError
    ) -> None:
        """A message whose header is sound but whose payload the codec refuses (a peer's
        fault, a deliberate one, or the protocol's zero-length error reply) is still one
        message of the trace: named by its header, its payload raw, the codec's reason."""
        assert self.trace is not None
        self.trace.trace_message(
            {
                "channel": self.kind.value,
                "request": request_name(self.kind, header.request),
                "id": header.request,
                "flags": header.flags,
                "reply": bool(header.flags & FLAG_REPLY),
                "need_reply": bool(header.flags & FLAG_NEED_REPLY),
                "payload": payload.hex(),
                "fds": len(fds),
                "undecodable": str(exc),
                "role": self.trace_role,
                "direction": direction,
            }
        )

    def _poll_briefly(self, n: int) -> tuple[bytes, list, int, object] | None:
        recvmsg = self.sock.recvmsg

        def attempt() -> tuple[bytes, list, int, object] | None:
            try:
                return recvmsg(n, _ANCBUF, _RECV_FLAGS | _DONTWAIT)
            except BlockingIOError:
                return None

        return spin(attempt, self.busy_poll)

    # ------------------------------------------------------------- closing

    def shutdown(self) -> None:
        """Wake any thread blocked on this channel; it sees EOF."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.shutdown()
        self.sock.close()
        close_fds(self._reader.take_pending_fds())  # of a message that never completed
