"""The back-end endpoint: answers a front-end's main channel like a device daemon
does, and sends SHMEM_MAP/SHMEM_UNMAP over the backend channel it is handed.

Main-channel handling never waits on the backend channel (docs/protocol.md §6.9): a
front-end such as QEMU may be blocked on a main-channel reply while we wait
for a map's ack, so the two run in different threads.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

from .channel import (
    DEFAULT_BUSY_POLL,
    Channel,
    ChannelClosed,
    ChannelError,
    ChannelTimeout,
    close_fds,
    spin,
)
from .daemon import Stopper
from .events import Event, EventHub
from .faults import DeviceFaults, Fault
from .session import (
    BackendSession,
    Forget,
    Hangup,
    Note,
    NotReady,
    OpenBackendChannel,
    Outgoing,
    ProtocolViolation,
)
from .session.backend import MAX_CONFIG_SIZE, OFFERED
from .wire import BackendReq, ChannelKind, Message, ShmemMap, WireError
from .wire.constants import SHMEM_BIT, check_shmem_bit

log = logging.getLogger("backend")

class NotSent(Exception):
    """A guarded request that its guard found no longer wanted: nothing was sent."""


#: Entered around a send; yields whether the request is still wanted.
SendGuard = AbstractContextManager[bool]


class PeerProtocolError(ChannelError):
    """The front-end answered a SHMEM request with something the protocol does not allow;
    whether it acted on the request is unknown."""


class AnswerLost(ChannelError):
    """A SHMEM request went out, and the backend channel broke before its answer came:
    whether the front-end acted on it is unknown (its connection may live on)."""


@dataclass
class DeviceModel:
    """What the simulated device advertises."""

    regions: dict[int, int]
    queues: int = 1
    #: what GET_CONFIG reads. The default is the largest config space the protocol
    #: carries, all zero, so every front-end device that reads its config space
    #: (QEMU's vhost-user-gpio, -blk, -input, ...) gets an answer; a read past its
    #: end is refused as a real device refuses it. b"": no config space, CONFIG is
    #: not offered (QEMU 7.2 warns when a device without config space is offered it).
    config_space: bytes = bytes(MAX_CONFIG_SIZE)
    shmem_bit: int = SHMEM_BIT
    #: deliberate protocol faults (shmemctl.faults), for showing conformance catches them
    faults: frozenset[Fault] = frozenset()
    #: the device type's virtio feature bits, offered beside VERSION_1 and
    #: PROTOCOL_FEATURES
    features: int = 0


class BackendChannel:
    """The back-end's side of the backend channel: sends SHMEM requests, waits for acks.

    Replies come strictly in order, so a request that asked for none is
    confirmed by the next ack (batching). A reply that nobody waits for (a
    front-end answering twice) is read off and reported before the next send.
    """

    def __init__(
        self, sock: socket.socket, reply_timeout: float = 5.0, busy_poll: float = DEFAULT_BUSY_POLL
    ) -> None:
        self.channel = Channel(sock, ChannelKind.BACKEND, replies=True, busy_poll=busy_poll)
        self.channel.set_send_timeout(reply_timeout)
        self.channel.set_recv_timeout(reply_timeout)
        self.reply_timeout = reply_timeout
        self.lock = threading.Lock()
        self.stray_replies = 0
        #: answers read so far, and the lock held while one is taken off the socket:
        #: together they tell another thread whether an answer has arrived yet
        self.replies = 0
        self.taking = threading.Lock()

    def request(self, out: Outgoing, *, guard: SendGuard | None = None) -> int | None:
        """Send one SHMEM request; return the front-end's u64 answer, or None if none
        was asked. Raises ChannelTimeout when the answer does not come in time.

        `guard`, when given, is entered around the send alone (not the wait for the
        answer) and says whether the request is still wanted; if not, nothing is sent
        and NotSent is raised. A device uses it to keep a decision and its send in one
        step with respect to a reset read on the main channel."""
        data = out.encode()
        with self.lock:
            self._drain_strays()
            if guard is None:
                self.channel.send(data, out.fds)
            else:
                with guard as wanted:
                    if not wanted:
                        m = out.payload
                        where = f" {m.shmid}:{m.shm_offset:#x}" if isinstance(m, ShmemMap) else ""
                        raise NotSent(f"{out.name}{where} no longer wanted")
                    self.channel.send(data, out.fds)
            if not out.need_reply:
                return None
            try:
                self._wait_for_answer()
                with self.taking:
                    try:
                        reply = self.channel.recv()
                    finally:
                        self.replies += 1
            except WireError as exc:
                raise PeerProtocolError(
                    f"the front-end broke the protocol answering {out.name}: {exc}"
                ) from None
            except ChannelTimeout:
                raise
            except ChannelError as exc:
                raise AnswerLost(
                    f"{out.name} was sent, then the backend channel broke: {exc}"
                ) from exc
            close_fds(reply.fds)
            try:
                return BackendSession.shmem_answer(BackendReq(out.request), reply)
            except ProtocolViolation as exc:
                raise PeerProtocolError(exc.detail) from None

    def _wait_for_answer(self) -> None:
        """Until the answer's first bytes are there, without taking them (spinning
        briefly first, as the channel does), so that taking it happens under `taking`."""
        channel = self.channel
        if not spin(lambda: channel.wait_readable(0), channel.busy_poll) and (
            not channel.wait_readable(self.reply_timeout)
        ):
            raise ChannelTimeout(f"no message within {self.reply_timeout:g}s")

    def answered_since(self, replies: int) -> bool:
        """Whether the answer to the request sent when `replies` answers had been read has
        arrived, read or not. From any thread; waits only while an answer is being read."""
        with self.taking:
            if self.replies > replies:
                return True
            poller = select.poll()  # its own: one poll object may not be polled by two threads
            poller.register(self.channel.sock, select.POLLIN)
            return bool(poller.poll(0))

    def _drain_strays(self) -> None:
        while self.channel.wait_readable(0):
            try:
                msg = self.channel.recv()
            except WireError as exc:
                self.stray_replies += 1
                log.warning("front-end sent something nobody asked for: %s", exc)
                continue
            close_fds(msg.fds)
            self.stray_replies += 1
            log.warning("front-end sent a %s reply nobody asked for (answered twice?)", msg.name)

    def close(self) -> None:
        self.channel.close()


class BackendEndpoint:
    """Serves one main channel at a time for a `DeviceModel`: reads each request, feeds
    it to a `BackendSession`, and carries out what the session says."""

    def __init__(
        self,
        device: DeviceModel,
        events: EventHub | None = None,
        *,
        reply_timeout: float = 5.0,
        busy_poll: float = DEFAULT_BUSY_POLL,
        on_forget: Callable[[str], None] | None = None,
        observer: Callable[[Message], None] | None = None,
        offered: int = OFFERED,
    ) -> None:
        self.device = device
        #: protocol features offered besides SHMEM and CONFIG (BackendSession adds those)
        self.base_offered = offered
        check_shmem_bit(device.shmem_bit)
        if len(device.config_space) > MAX_CONFIG_SIZE:
            raise ValueError(
                f"a config space of {len(device.config_space)} bytes: "
                f"GET_CONFIG carries at most {MAX_CONFIG_SIZE}"
            )
        #: the layer that applies deliberate faults, only when some are asked for
        self.faults = DeviceFaults(device.faults) if device.faults else None
        self.events = events or EventHub()
        self.reply_timeout = reply_timeout
        self.busy_poll = busy_poll
        self.on_forget = on_forget
        #: sees every main-channel request before it is answered (the conformance suite)
        self.observer = observer
        self.session = self._new_session()
        self.backend_channel: BackendChannel | None = None
        self.ready = threading.Condition()

    def _new_session(self) -> BackendSession:
        d = self.device
        offered = self.base_offered
        if self.faults is not None:
            offered = self.faults.offered(offered)
        return BackendSession(d.regions, shmem_bit=d.shmem_bit, queues=d.queues,
                              config_space=d.config_space, offered=offered,
                              features=d.features)  # fmt: skip

    # ------------------------------------------------------------ negotiated state

    @property
    def offered(self) -> int:
        return self.session.offered

    @property
    def shmem(self) -> bool:
        return self.session.shmem

    @property
    def reply_ack(self) -> bool:
        return self.session.reply_ack

    def why_not_ready(self) -> str | None:
        """None when SHMEM requests can be sent; else what is missing, for the log."""
        if self.backend_channel is None:
            return "the front-end has not sent SET_BACKEND_REQ_FD (no backend channel)"
        return self.session.why_not_ready()

    def shmem_request(
        self,
        req: BackendReq,
        m: ShmemMap,
        fd: int | None = None,
        *,
        need_reply: bool = True,
        guard: SendGuard | None = None,
        channel: BackendChannel | None = None,
    ) -> int | None:
        """Send one SHMEM request on `channel` (by default the backend channel now in use:
        a caller that recorded which channel it sends on passes that one, so that a new
        channel opened meanwhile cannot carry a request recorded against the old)."""
        channel = channel or self.backend_channel
        if channel is None:
            raise NotReady(self.why_not_ready() or "no backend channel")
        if self.faults is None:
            out = self.session.shmem_request(req, m, fd, need_reply=need_reply)
        else:
            out = self.faults.shmem_request(self.session, req, m, fd, need_reply)
        return channel.request(out, guard=guard)

    # ------------------------------------------------------------ main channel

    def serve(self, main: Channel, stopper: Stopper | None = None) -> None:
        """Answer requests until the front-end goes away or `stopper` stops (returns) or
        it breaks the protocol (WireError/ChannelError propagate; fds closed either way)."""
        self.session = self._new_session()
        try:
            while stopper is None or stopper.wait_readable(main.sock, None):
                try:
                    msg = main.recv()
                except ChannelClosed:
                    return
                kept: tuple[int, ...] = ()
                try:
                    kept = self._handle(main, msg)
                finally:
                    close_fds(fd for fd in msg.fds if fd not in kept)
        finally:
            self._drop_backend_channel()
            self._forget("front-end disconnected")

    def _handle(self, main: Channel, msg: Message) -> tuple[int, ...]:
        """Answer one request; return the fds it keeps (the caller closes the rest)."""
        if self.observer is not None:
            self.observer(msg)
        log.debug("main channel: %s %r fds=%d", msg.name, msg.payload, len(msg.fds))
        effects = self.session.receive(msg)
        if self.faults is not None:
            self.faults.hold_main(self.backend_channel)
            effects = self.faults.answers(self.session, msg, effects)
        kept: tuple[int, ...] = ()
        for effect in effects:
            match effect:
                case Outgoing():
                    main.send(effect.encode(), effect.fds)
                case OpenBackendChannel(fd):
                    self._open_backend_channel(fd)
                    kept = (fd,)
                case Forget(why):
                    self._forget(why)
                case Note(text, routine):
                    log.log(logging.INFO if routine else logging.WARNING, "%s", text)
                case Hangup(reason):
                    raise ChannelError(reason)
        if kept or self.session.protocol_features:
            self._notify()
        return kept

    def _open_backend_channel(self, fd: int) -> None:
        self._drop_backend_channel()
        channel = BackendChannel(socket.socket(fileno=fd), self.reply_timeout, self.busy_poll)
        channel.channel.trace = self.events
        channel.channel.trace_role = "backend"
        self.backend_channel = channel

    def _notify(self) -> None:
        with self.ready:
            self.ready.notify_all()

    def _forget(self, why: str) -> None:
        """A reset or disconnect: the front-end dropped every mapping; so do we, silently."""
        if self.on_forget is not None:
            self.on_forget(why)
        if self.events.active:
            self.events.emit(Event.RESET, {"why": why})

    def _drop_backend_channel(self) -> None:
        channel, self.backend_channel = self.backend_channel, None
        if channel is not None:
            channel.close()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until SHMEM requests can be sent (or the reason they never will be is fixed)."""
        shmem_needed = self.faults is None or not self.faults.ignores_negotiation
        with self.ready:
            return self.ready.wait_for(
                lambda: self.backend_channel is not None
                and (self.shmem or not shmem_needed)
                and self.session.running,
                timeout,
            )



__all__ = [
    "AnswerLost",
    "BackendChannel",
    "BackendEndpoint",
    "ChannelTimeout",
    "DeviceModel",
    "NotReady",
    "NotSent",
    "PeerProtocolError",
    "SendGuard",
]
