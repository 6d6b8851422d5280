"""The tap: between a front-end and a back-end it did not start, it relays both channels
exactly and reports what an observer sees (docs/protocol.md, as judged by
`session.observer.Observer`).

Threads: the caller's runs `run()` (accept or connect each side, then wait for the
connection to end); each channel has one thread for both directions (`Link`). The observer
is fed under one lock, in the same hold as the message is sent on, so a request is
always seen before the reply it draws.

The observer stays pure; what only the tap can learn from the kernel it learns itself:
each peer's pid (SO_PEERCRED) and, for each SHMEM_MAP, what its fd is (`FileFacts`),
which it hands to the observer with the message, so the mapping the request makes keeps
it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..channel import ChannelError, close_fds, send_with_fds
from ..daemon import Stopper, connect_unix, listen_unix
from ..events import Event, EventHub
from ..session.observer import BACKEND, FOLLOW_UPS, FRONTEND
from ..wire.constants import SHMEM_BIT, ChannelKind, FrontendReq
from .framer import Unit
from .link import Link, other
from .recording import Recorder
from .truth import Peer, fd_facts, peer_of
from .watch import Finding, Watch, carries_map_file, direction

log = logging.getLogger("tap")

SIDES = (FRONTEND, BACKEND)
MODES = ("listen", "connect")


@dataclass(frozen=True)
class Endpoint:
    """How the tap reaches one side: it listens on `path`, or connects to it."""

    mode: str
    path: str

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        mode, sep, path = text.partition(":")
        if not sep or mode not in MODES or not path:
            raise ValueError(f"{text!r}: write listen:PATH or connect:PATH")
        return cls(mode, path)

    def __str__(self) -> str:
        return f"{self.mode}:{self.path}"


@dataclass(frozen=True)
class TapOptions:
    front: Endpoint
    back: Endpoint
    shmem_bit: int = SHMEM_BIT
    #: seconds between attempts to connect to a side that is not there yet
    retry: float = 0.5
    #: seconds a request owed a reply may wait for it before that is a violation
    #: (ANSWERED_IN_TIME); None: no deadline
    reply_deadline: float | None = 5.0
    #: a file to append every relayed unit to, one JSON line each (`recording`)
    record: str | None = None


class _Connection:
    """One front-end and one back-end, relayed: the main channel and every backend
    channel the front-end hands over."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.over = threading.Event()
        self.reason = ""
        self._links: list[Link] = []
        #: each link's number within the connection (0: main, then each backend channel)
        self._numbers: dict[int, int] = {}
        self._lock = threading.Lock()
        self._closing = False

    def add(self, link: Link) -> bool:
        """Take a link in; False once the connection is going away."""
        with self._lock:
            if self._closing:
                return False
            self._numbers[id(link)] = len(self._links)
            self._links.append(link)
            return True

    def number_of(self, link: Link) -> int:
        return self._numbers[id(link)]

    def answers_in_flight(self) -> bool:
        """Whether the front-end may have answered on a backend channel what the tap has
        not judged yet."""
        with self._lock:
            links = [link for link in self._links if link.kind is ChannelKind.BACKEND]
        return any(link.may_carry_unseen(FRONTEND) for link in links)

    def link_ended(self, link: Link, sender: str, reason: str) -> None:
        if link.kind is ChannelKind.MAIN and not self.over.is_set():
            self.reason = reason
            self.over.set()
        elif link.kind is ChannelKind.BACKEND:
            log.info("a backend channel direction ended: %s", reason)

    def end(self, reason: str) -> None:
        if not self.over.is_set():
            self.reason = reason
            self.over.set()

    def teardown(self) -> None:
        """Close every side of every channel; return once no relay thread is left."""
        with self._lock:
            self._closing = True
            links = list(self._links)
        for link in links:
            link.shutdown()
        for link in links:
            link.join()


class Tap:
    def __init__(self, options: TapOptions) -> None:
        self.options = options
        self.endpoints = {FRONTEND: options.front, BACKEND: options.back}
        self.events = EventHub()
        self.stopper = Stopper()
        #: guards the watch and every count below
        self.lock = threading.Lock()
        self.watch = Watch(shmem_bit=options.shmem_bit, reply_deadline=options.reply_deadline)
        self.counters: dict[str, dict[str, dict[str, int]]] = {
            kind.value: {
                side: {"messages": 0, "bytes": 0, "fds": 0, "undecodable": 0} for side in SIDES
            }
            for kind in ChannelKind
        }
        self.attached = {side: False for side in SIDES}
        #: who is on each side of the current connection, by SO_PEERCRED
        self.peers: dict[str, Peer | None] = {side: None for side in SIDES}
        self.state = "starting"
        self.recorder: Recorder | None = None
        if options.record is not None:
            self.recorder = Recorder(options.record, shmem_bit=options.shmem_bit,
                                     front=str(options.front), back=str(options.back))  # fmt: skip
        self._listeners: dict[str, socket.socket] = {}
        self._connection: _Connection | None = None

    # ------------------------------------------------------------ lifecycle

    def install_signals(self) -> None:
        self.stopper.install_signals(self.stop)

    def stop(self) -> None:
        self.stopper.stop()
        connection = self._connection
        if connection is not None:
            connection.end("the tap is stopping")

    def run(self) -> None:
        """Relay pairs until stopped. OSError if a socket to listen on cannot be made."""
        try:
            for side, endpoint in self.endpoints.items():
                if endpoint.mode == "listen":
                    self._listeners[side] = listen_unix(endpoint.path)
                    log.info("listening on %s for the %s", endpoint.path, side)
            while not self.stopper.stopped:
                front = self._open(FRONTEND)
                if front is None:
                    continue
                back = self._open(BACKEND)
                if back is None:
                    front.close()
                    continue
                self._serve(front, back)
        finally:
            self.state = "stopped"
            if self.recorder is not None:
                self.recorder.close()
            for side, listener in self._listeners.items():
                listener.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.endpoints[side].path)

    def _open(self, side: str) -> socket.socket | None:
        endpoint = self.endpoints[side]
        listener = self._listeners.get(side)
        if listener is not None:
            self.state = f"waiting for the {side}"
            if not self.stopper.wait_readable(listener, None):
                return None
            try:
                sock, _ = listener.accept()
            except OSError as exc:
                log.warning("accepting the %s failed: %s", side, exc.strerror or exc)
                return None
            return sock
        self.state = f"connecting to the {side}"
        said = False
        while not self.stopper.stopped:
            try:
                return connect_unix(endpoint.path)
            except OSError as exc:
                if not said:  # once per wait, not once per attempt
                    why = str(exc.strerror or exc)
                    log.info("cannot connect to the %s at %s (%s); retrying every %gs",
                             side, endpoint.path, why, self.options.retry)  # fmt: skip
                    self.events.emit(
                        Event.RECONNECTING,
                        {"side": side, "socket": endpoint.path, "mode": endpoint.mode,
                         "retry_in": self.options.retry, "reason": why},
                    )  # fmt: skip
                    said = True
            if self.stopper.wait(self.options.retry):
                break
        return None

    def _serve(self, front: socket.socket, back: socket.socket) -> None:
        with self.lock:
            number = self.watch.attached()
            self.peers = {FRONTEND: peer_of(front), BACKEND: peer_of(back)}
            if self.recorder is not None:
                self.recorder.attached(number)
        connection = _Connection(number)
        self._connection = connection
        for side in SIDES:
            self.attached[side] = True
            self._report(Event.ATTACHED, side, connection.number)
            log.info("%s attached (connection %d)", side, connection.number)
        self.state = "relaying"
        main = Link(self, ChannelKind.MAIN, front, back, connection.link_ended, self.events)
        connection.add(main)
        main.start()
        if self.stopper.stopped:
            connection.end("the tap is stopping")
        deadline = self.options.reply_deadline
        # never unbounded: a signal's handler runs in this thread, once it is back here
        tick = 0.1 if deadline is None else min(0.1, deadline / 4)
        while not connection.over.wait(tick):
            with self.lock:
                late = self.watch.overdue(time.monotonic())
            for finding in late:
                self._violation(finding)
        connection.teardown()
        with self.lock:
            self.watch.detached()  # every mapping went with the connection
            self.peers = {side: None for side in SIDES}
            if self.recorder is not None:
                self.recorder.detached(number, connection.reason)
        for side in SIDES:
            self.attached[side] = False
            self._report(Event.DETACHED, side, connection.number, connection.reason)
        log.info("connection %d ended: %s", connection.number, connection.reason)
        self._connection = None

    def _report(self, event: Event, side: str, number: int, reason: str | None = None) -> None:
        endpoint = self.endpoints[side]
        data: dict[str, Any] = {"side": side, "socket": endpoint.path, "mode": endpoint.mode,
                                "connection": number}  # fmt: skip
        if reason is not None:
            data["reason"] = reason
        self.events.emit(event, data)

    # ------------------------------------------------------------ relaying

    def forward(self, link: Link, sender: str, unit: Unit) -> bool:
        """Send `unit` on exactly, then judge it; close the tap's copies of its fds.

        Sent first, so that the receiver is at work on it while the watch judges it:
        the judgement is not on the pair's path. Both happen in one hold of the lock, so
        whatever the receiver does in answer, on any channel, reaches the watch after
        it. A receiver that does not take the whole unit at once is not waited for under
        the lock: the unit is judged first, and the rest sent after."""
        receiver = other(sender)
        send_fds = unit.fds
        keep: tuple[int, ...] = ()
        theirs: socket.socket | None = None
        try:
            connection = self._connection
            # asked before the lock, and only for what the rule judges by it: what the
            # backend channel's thread has in hand it judges under the lock, before this
            # unit then, or after it and in flight now
            in_flight = (
                connection is not None
                and link.kind is ChannelKind.MAIN
                and unit.message is not None
                and not unit.message.is_reply
                and unit.message.request in FOLLOW_UPS
                and connection.answers_in_flight()
            )
            handed = self._backend_channel(link, unit)
            if handed is not None:
                # the channel is the first fd (what a back-end takes); any more, wrongly
                # sent, go on as they came
                theirs, keep = handed, unit.fds[:1]
                send_fds = (theirs.fileno(), *unit.fds[1:])
            to = link.to[receiver]
            failed: Exception | None = None
            with self.lock:
                try:
                    if unit.framed:
                        sent = to.send(unit.data, send_fds, wait=False)
                    else:
                        sent = send_with_fds(to.sock, unit.data, send_fds, wait=False)
                except (ChannelError, OSError) as exc:
                    failed, sent = exc, len(unit.data)
                self._judge(link, sender, unit, in_flight)
            if failed is None and sent < len(unit.data):
                try:
                    send_with_fds(to.sock, unit.data[sent:], send_fds if sent == 0 else ())
                except OSError as exc:
                    failed = exc
            if failed is not None:
                log.info("%s: %s", direction(link.kind, sender), failed)
                return False
            return True
        finally:
            close_fds(fd for fd in unit.fds if fd not in keep)
            if theirs is not None:
                theirs.close()  # the back-end has its own copy now

    def _judge(self, link: Link, sender: str, unit: Unit, in_flight: bool) -> None:
        """Feed `unit` to the watch, count and record it, report what it showed. Under
        the lock, while the tap still holds the unit's fds (what a map's file is)."""
        connection = self._connection
        facts = fd_facts(unit.fds[0]) if carries_map_file(unit) else None
        decoding = link.framers[sender].decoding
        judged = self.watch.unit(link.kind, sender, unit, decoding=decoding,
                                 now=time.monotonic(), facts=facts,
                                 answers_in_flight=in_flight)  # fmt: skip
        self._count(link.kind, sender, unit)
        if self.recorder is not None and connection is not None:
            self.recorder.unit(connection.number, connection.number_of(link), link.kind,
                               sender, unit, answers_in_flight=in_flight)  # fmt: skip
        # reported before the lock is let go: before anything that answers the unit is
        # relayed, on any channel
        for finding in judged.findings:
            self._violation(finding)
        if judged.undecodable:
            self._undecodable(link, sender, unit, decoding)

    def _violation(self, finding: Finding) -> None:
        violation, rule = finding.violation, finding.violation.rule
        log.warning("%s broke %s (%s: %s): %s", violation.by, rule.label, rule.passage,
                    rule.text, violation.detail)  # fmt: skip
        self.events.emit(
            Event.VIOLATION,
            {"by": violation.by, "rule": rule.label, "passage": rule.passage, "text": rule.text,
             "detail": violation.detail, "channel": finding.channel.value,
             "request": finding.message.name},
        )  # fmt: skip

    def _count(self, kind: ChannelKind, sender: str, unit: Unit) -> None:
        """Under the lock."""
        counts = self.counters[kind.value][sender]
        if unit.framed:
            counts["messages"] += 1
        counts["bytes"] += len(unit.data)
        counts["fds"] += len(unit.fds)
        if unit.problem:
            counts["undecodable"] += 1

    def _undecodable(self, link: Link, sender: str, unit: Unit, decoding: bool) -> None:
        where = direction(link.kind, sender)
        if decoding:
            log.warning("%s: relayed as it came: %s", where, unit.problem)
        else:
            log.warning("%s: %s; relaying its bytes and fds as they come", where, unit.problem)
        self.events.emit(
            Event.UNDECODABLE,
            {"side": sender, "channel": link.kind.value, "request": unit.request,
             "bytes": len(unit.data), "fds": len(unit.fds), "reason": unit.problem,
             "decoding": decoding},
        )  # fmt: skip

    def _backend_channel(self, link: Link, unit: Unit) -> socket.socket | None:
        """For a SET_BACKEND_REQ_FD whose first fd is a Unix stream socket: the tap keeps
        that socket and relays between it and one end of a pair of its own; the other
        end, returned, is what the back-end gets in its place. None for anything else
        (forwarded as it is)."""
        message = unit.message
        if (
            link.kind is not ChannelKind.MAIN
            or message is None
            or message.is_reply
            or message.request != FrontendReq.SET_BACKEND_REQ_FD
            or not unit.fds
        ):
            return None
        connection = self._connection
        if connection is None:
            return None
        fd = unit.fds[0]
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                return None
            handed = socket.socket(fileno=fd)
        except OSError:
            return None
        if handed.family != socket.AF_UNIX or handed.type != socket.SOCK_STREAM:
            handed.detach()  # not a channel the tap can relay: it goes on untouched
            return None
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        channel = Link(self, ChannelKind.BACKEND, handed, mine, connection.link_ended, self.events)
        if not connection.add(channel):  # the connection is ending: nothing left to relay
            handed.detach()
            mine.close()
            theirs.close()
            return None
        channel.start()
        log.info("relaying a backend channel")
        return theirs
