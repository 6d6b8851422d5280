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
import struct
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from .channel import (
    DEFAULT_BUSY_POLL,
    Channel,
    ChannelClosed,
    ChannelError,
    ChannelTimeout,
    close_fds,
)
from .daemon import Stopper
from .events import EventHub
from .wire import (
    BackendReq,
    ChannelKind,
    FrontendReq,
    Message,
    ShmemConfig,
    ShmemMap,
    WireError,
    encode,
    encode_shmem_request,
    encode_u64_reply,
    feature_names,
)
from .wire.constants import (
    SHMEM_BIT,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    ProtocolFeature,
    check_shmem_bit,
)
from .wire.messages import (
    DeviceConfig,
    MemoryTable,
    VringState,
    spec_of,
)

log = logging.getLogger("backend")

#: What our back-end offers besides SHMEM (docs/protocol.md §6.2, §6.4, §6.10); CONFIG is
#: added for a device with config space, which is the default (see DeviceModel).
OFFERED = (
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.BACKEND_SEND_FD
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.STATUS
)
MAX_MEM_SLOTS = 32
#: The largest config space GET_CONFIG carries (QEMU's VHOST_USER_MAX_CONFIG_SIZE).
MAX_CONFIG_SIZE = 256


class NotReady(Exception):
    """A SHMEM request cannot be sent: no backend channel, or SHMEM/REPLY_ACK not negotiated."""


class NotSent(Exception):
    """A guarded request that its guard found no longer wanted: nothing was sent."""


#: Entered around a send; yields whether the request is still wanted.
SendGuard = AbstractContextManager[bool]


class PeerProtocolError(ChannelError):
    """The front-end answered a SHMEM request with something the protocol does not allow;
    whether it acted on the request is unknown."""


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
    faults: frozenset[str] = frozenset()


@dataclass
class Session:
    """What one front-end connection negotiated, as the back-end sees it."""

    features: int = 0
    protocol_features: int = 0
    owner: bool = False
    status: int = 0
    log: list[str] = field(default_factory=list)


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
        self.fds_per_map = 1  # 2 only under the map-two-fds fault

    def request(
        self,
        req: BackendReq,
        m: ShmemMap,
        fd: int | None = None,
        *,
        need_reply: bool = True,
        guard: SendGuard | None = None,
    ) -> int | None:
        """Send one SHMEM request; return the front-end's u64 answer, or None if none
        was asked. Raises ChannelTimeout when the answer does not come in time.

        `guard`, when given, is entered around the send alone (not the wait for the
        answer) and says whether the request is still wanted; if not, nothing is sent
        and NotSent is raised. A device uses it to keep a decision and its send in one
        step with respect to a reset read on the main channel."""
        data = encode_shmem_request(req, m, need_reply=need_reply)
        fds = () if fd is None else (fd,) * self.fds_per_map
        with self.lock:
            self._drain_strays()
            if guard is None:
                self.channel.send(data, fds)
            else:
                with guard as wanted:
                    if not wanted:
                        raise NotSent(f"{req.name} {m.shmid}:{m.shm_offset:#x} no longer wanted")
                    self.channel.send(data, fds)
            if not need_reply:
                return None
            self._wait_for_answer()
            with self.taking:
                try:
                    reply = self.channel.recv()
                except WireError as exc:
                    raise PeerProtocolError(
                        f"the front-end broke the protocol answering {req.name}: {exc}"
                    ) from None
                finally:
                    self.replies += 1
            close_fds(reply.fds)
            if reply.request != req or not isinstance(reply.payload, int):
                raise PeerProtocolError(
                    f"the front-end answered {req.name} with a {reply.name} reply"
                )
            return reply.payload

    def _wait_for_answer(self) -> None:
        """Until the answer's first bytes are there, without taking them (spinning
        briefly first, as the channel does), so that taking it happens under `taking`."""
        channel = self.channel
        deadline = time.perf_counter() + channel.busy_poll
        while not channel.wait_readable(0):
            if time.perf_counter() > deadline:
                if not channel.wait_readable(self.reply_timeout):
                    raise ChannelTimeout(f"no message within {self.reply_timeout:g}s")
                break

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
    """Serves one main channel at a time for a `DeviceModel`."""

    def __init__(
        self,
        device: DeviceModel,
        events: EventHub | None = None,
        *,
        reply_timeout: float = 5.0,
        busy_poll: float = DEFAULT_BUSY_POLL,
        on_forget: Callable[[str], None] | None = None,
        observer: Callable[[Message], None] | None = None,
    ) -> None:
        self.device = device
        self.shmem_mask = 1 << check_shmem_bit(device.shmem_bit)
        self.offered = OFFERED | self.shmem_mask
        self._shmem_and_ack = self.shmem_mask | int(ProtocolFeature.REPLY_ACK)
        if len(device.config_space) > MAX_CONFIG_SIZE:
            raise ValueError(
                f"a config space of {len(device.config_space)} bytes: "
                f"GET_CONFIG carries at most {MAX_CONFIG_SIZE}"
            )
        if device.config_space:
            self.offered |= ProtocolFeature.CONFIG
        self.faults = device.faults
        if "offer-bit-21" in self.faults:
            self.offered |= ProtocolFeature.GPA_ADDRESSES
        if "shmem-without-reply-ack" in self.faults:
            self.offered &= ~ProtocolFeature.REPLY_ACK
        if "map-without-shmem" in self.faults:
            self._shmem_and_ack = 0  # sends whatever was or was not negotiated
        self._configs_sent = 0
        self.events = events or EventHub()
        self.reply_timeout = reply_timeout
        self.busy_poll = busy_poll
        self.on_forget = on_forget
        #: sees every main-channel request before it is answered (the conformance suite)
        self.observer = observer
        self.session = Session()
        self.backend_channel: BackendChannel | None = None
        self.ready = threading.Condition()

    # ------------------------------------------------------------ negotiated state

    @property
    def shmem(self) -> bool:
        return bool(self.session.protocol_features & self.shmem_mask)

    @property
    def reply_ack(self) -> bool:
        return bool(self.session.protocol_features & ProtocolFeature.REPLY_ACK)

    def shmem_config(self) -> ShmemConfig:
        regions = dict(self.device.regions)
        if regions and "unaligned-config" in self.faults:
            first = min(regions)
            regions[first] += 512
        if regions and "unstable-config" in self.faults and self._configs_sent:
            first = min(regions)
            regions[first] *= 2
        config = ShmemConfig.from_regions(regions)
        if "bad-nregions" in self.faults:
            config = ShmemConfig(config.sizes, 300)
        if "nregions-mismatch" in self.faults:
            config = ShmemConfig(config.sizes, config.nregions + 1)
        return config

    def why_not_ready(self) -> str | None:
        """None when SHMEM requests can be sent; else what is missing, for the log."""
        if self.backend_channel is None:
            return "the front-end has not sent SET_BACKEND_REQ_FD (no backend channel)"
        if not self.shmem:
            return f"SHMEM (protocol feature bit {self.device.shmem_bit}) was not negotiated"
        if not self.reply_ack:
            return "REPLY_ACK was not negotiated: the outcome of a map could never be known"
        return None

    def shmem_request(
        self,
        req: BackendReq,
        m: ShmemMap,
        fd: int | None = None,
        *,
        need_reply: bool = True,
        guard: SendGuard | None = None,
    ) -> int | None:
        channel = self.backend_channel
        if channel is None or not self._shmem_usable:
            raise NotReady(self.why_not_ready() or "no backend channel")
        if self.faults:
            m, fd = self._fault_request(m, fd)
        return channel.request(req, m, fd, need_reply=need_reply, guard=guard)

    def _fault_request(self, m: ShmemMap, fd: int | None) -> tuple[ShmemMap, int | None]:
        if "map-out-of-bounds" in self.faults:
            size = self.device.regions.get(m.shmid, 0)
            m = ShmemMap(m.shmid, m.shm_offset + size, m.len, m.fd_offset, m.flags)
        return m, fd

    @property
    def _shmem_usable(self) -> bool:
        pf = self.session.protocol_features
        return pf & self._shmem_and_ack == self._shmem_and_ack

    # ------------------------------------------------------------ main channel

    def serve(self, main: Channel, stopper: Stopper | None = None) -> None:
        """Answer requests until the front-end goes away or `stopper` stops (returns) or
        it breaks the protocol (WireError/ChannelError propagate; fds closed either way)."""
        self.session = Session()
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

    def _ack(self, main: Channel, msg: Message, ok: bool = True) -> None:
        own_reply = spec_of(ChannelKind.MAIN, msg.request).own_reply
        asked = msg.need_reply or "ack-always" in self.faults
        if asked and self.reply_ack and not own_reply and "no-ack" not in self.faults:
            self._send_reply(main, encode_u64_reply(msg.request, 0 if ok else 1))
            if "ack-twice" in self.faults:
                self._send_reply(main, encode_u64_reply(msg.request, 0 if ok else 1))

    def _reply(self, main: Channel, msg: Message, payload: object) -> None:
        data = encode(ChannelKind.MAIN, msg.request, payload, reply=True)  # type: ignore[arg-type]
        if msg.need_reply and "echo-need-reply" in self.faults:  # libvhost-user's habit
            data = data[:4] + struct.pack("<I", 0xD) + data[8:]
        if msg.request == FrontendReq.GET_PROTOCOL_FEATURES and (
            "short-protocol-features" in self.faults
        ):
            data = data[:8] + struct.pack("<I", 4) + data[12:16]
        if msg.request == FrontendReq.GET_SHMEM_CONFIG:
            self._configs_sent += 1
            if "short-shmem-config" in self.faults:
                data = data[:8] + struct.pack("<I", len(data) - 20) + data[12:-8]
        self._send_reply(main, data)

    def _send_reply(self, main: Channel, data: bytes) -> None:
        if "bad-reply-flags" in self.faults:
            data = data[:4] + struct.pack("<I", 0x1) + data[8:]
        main.send(data)

    def _handle(self, main: Channel, msg: Message) -> tuple[int, ...]:
        """Answer one request; return the fds it keeps (the caller closes the rest)."""
        if self.observer is not None:
            self.observer(msg)
        req = msg.request
        s = self.session
        log.debug("main channel: %s %r fds=%d", msg.name, msg.payload, len(msg.fds))
        if msg.surplus_fds:
            n = len(msg.surplus_fds)
            log.warning("%s carried %d fds it may not carry; closed them", msg.name, n)
        match req:
            case FrontendReq.GET_FEATURES:
                self._reply(main, msg, VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES)
            case FrontendReq.SET_FEATURES:
                s.features = int(msg.payload or 0)
                self._ack(main, msg)
            case FrontendReq.GET_PROTOCOL_FEATURES:
                self._reply(main, msg, int(self.offered))
            case FrontendReq.SET_PROTOCOL_FEATURES:
                asked = int(msg.payload or 0)
                if asked & ~self.offered:
                    log.warning(
                        "front-end acked protocol features we never offered: %s; ignoring them",
                        self._names(asked & ~self.offered),
                    )
                s.protocol_features = int(asked & self.offered)
                log.info("negotiated %s", self._names(s.protocol_features))
                self._ack(main, msg)  # decided with the new feature set
                self._notify()
            case FrontendReq.GET_QUEUE_NUM:
                self._reply(main, msg, self.device.queues)
            case FrontendReq.GET_MAX_MEM_SLOTS:
                self._reply(main, msg, MAX_MEM_SLOTS)
            case FrontendReq.SET_OWNER:
                s.owner = True
                self._ack(main, msg)
            case FrontendReq.RESET_OWNER | FrontendReq.RESET_DEVICE:
                self._forget(f"{msg.name} from the front-end")
                self._ack(main, msg)
            case FrontendReq.SET_STATUS:
                s.status = int(msg.payload or 0)
                if s.status == 0:
                    self._forget("SET_STATUS 0 (device reset) from the front-end")
                self._ack(main, msg)
            case FrontendReq.GET_STATUS:
                self._reply(main, msg, s.status)
            case FrontendReq.SET_BACKEND_REQ_FD:
                if len(msg.fds) != 1:
                    log.error("SET_BACKEND_REQ_FD without its fd")
                    self._ack(main, msg, ok=False)
                    return ()
                self._drop_backend_channel()
                sock = socket.socket(fileno=msg.fds[0])
                self.backend_channel = BackendChannel(sock, self.reply_timeout, self.busy_poll)
                if "fail-backend-channel" in self.faults:
                    self._ack(main, msg, ok=False)
                    return msg.fds
                if "map-two-fds" in self.faults:
                    self.backend_channel.fds_per_map = 2
                self.backend_channel.channel.trace = self.events
                self.backend_channel.channel.trace_role = "backend"
                log.info("backend channel established")
                self._ack(main, msg)
                self._notify()
                return msg.fds
            case FrontendReq.GET_SHMEM_CONFIG:
                if self.shmem:
                    config = self.shmem_config()
                else:
                    log.warning("GET_SHMEM_CONFIG without SHMEM negotiated: answering all zero")
                    config = ShmemConfig.from_regions({})
                self._reply(main, msg, config)
            case FrontendReq.GET_CONFIG:
                asked = msg.payload
                assert isinstance(asked, DeviceConfig)
                self._reply(main, msg, self._read_config(asked))
            case FrontendReq.GET_VRING_BASE:
                assert isinstance(msg.payload, VringState)
                self._reply(main, msg, VringState(msg.payload.index, 0))
            case FrontendReq.SET_MEM_TABLE:
                assert isinstance(msg.payload, MemoryTable)
                if len(msg.payload.regions) != len(msg.fds):
                    log.warning(
                        "SET_MEM_TABLE: %d regions but %d fds",
                        len(msg.payload.regions),
                        len(msg.fds),
                    )
                self._ack(main, msg)
            case (
                FrontendReq.SET_VRING_NUM
                | FrontendReq.SET_VRING_ADDR
                | FrontendReq.SET_VRING_BASE
                | FrontendReq.SET_VRING_KICK
                | FrontendReq.SET_VRING_CALL
                | FrontendReq.SET_VRING_ERR
                | FrontendReq.SET_VRING_ENABLE
                | FrontendReq.SET_CONFIG
                | FrontendReq.ADD_MEM_REG
                | FrontendReq.REM_MEM_REG
            ):
                self._ack(main, msg)  # no guest: nothing to do with rings or memory
            case _:
                if spec_of(ChannelKind.MAIN, req).own_reply:
                    raise ChannelError(f"{msg.name} needs a reply this device cannot give")
                log.warning("main channel: %s is not supported; failing it", msg.name)
                self._ack(main, msg, ok=False)
        return ()

    def _read_config(self, asked: DeviceConfig) -> DeviceConfig | None:
        """GET_CONFIG's answer: the bytes asked for, or None (the protocol's error reply,
        no payload) for a read past the end of the config space."""
        space = self.device.config_space
        if asked.offset + asked.size > len(space):
            log.warning(
                "GET_CONFIG asks for %d bytes at offset %d of a %d-byte config space; "
                "answering the protocol's error (no payload)",
                asked.size, asked.offset, len(space),
            )  # fmt: skip
            return None
        data = space[asked.offset : asked.offset + asked.size]
        return DeviceConfig(asked.offset, asked.size, asked.flags, data)

    def _notify(self) -> None:
        with self.ready:
            self.ready.notify_all()

    def _forget(self, why: str) -> None:
        """A reset or disconnect: the front-end dropped every mapping; so do we, silently."""
        if self.on_forget is not None:
            self.on_forget(why)
        if self.events.active:
            self.events.emit("reset", {"why": why})

    def _drop_backend_channel(self) -> None:
        channel, self.backend_channel = self.backend_channel, None
        if channel is not None:
            channel.close()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until SHMEM requests can be sent (or the reason they never will be is fixed)."""
        shmem_needed = "map-without-shmem" not in self.faults
        with self.ready:
            return self.ready.wait_for(
                lambda: self.backend_channel is not None and (self.shmem or not shmem_needed),
                timeout,
            )

    def _names(self, mask: int) -> str:
        return ",".join(feature_names(mask, self.device.shmem_bit)) or "nothing"


__all__ = [
    "BackendChannel",
    "BackendEndpoint",
    "ChannelTimeout",
    "DeviceModel",
    "NotReady",
    "NotSent",
    "PeerProtocolError",
    "SendGuard",
]
