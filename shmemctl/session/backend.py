"""The device's side of one connection, without I/O: fed the front-end's main-channel
requests, it says what to send back and what the driver must do; asked to send a SHMEM
request, it says whether it may and what the front-end's answer means.

Nothing here reads a socket, keeps a thread or a clock: the driver
(`shmemctl.backend.BackendEndpoint`) feeds it decoded messages and acts on the
effects, in order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from ..wire.constants import (
    STATUS_DRIVER_OK,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    VRING_INDEX_MASK,
    BackendReq,
    ChannelKind,
    FrontendReq,
    ProtocolFeature,
    feature_names,
)
from ..wire.messages import (
    DeviceConfig,
    MemoryTable,
    Message,
    Payload,
    ShmemConfig,
    ShmemMap,
    VringState,
)
from .common import Hangup, Note, Outgoing, Owed, Rule, ack, owed_by

#: The requests that set a ring up: a front-end that sends them manages the device.
_RING_SETUP = frozenset(
    {
        FrontendReq.SET_VRING_NUM,
        FrontendReq.SET_VRING_ADDR,
        FrontendReq.SET_VRING_BASE,
        FrontendReq.SET_VRING_KICK,
        FrontendReq.SET_VRING_CALL,
        FrontendReq.SET_VRING_ERR,
        FrontendReq.SET_VRING_ENABLE,
    }
)
#: What a front-end sends that manages the device's life: one that does starts the
#: device before it may act. A front-end that asks for memory slots will hand it guest
#: memory slot by slot and start it (QEMU asks at realize, before the backend channel).
_MANAGES = _RING_SETUP | {
    FrontendReq.SET_STATUS,
    FrontendReq.GET_VRING_BASE,
    FrontendReq.GET_MAX_MEM_SLOTS,
}

#: What GET_MAX_MEM_SLOTS answers: the ADD_MEM_REG slots this device accepts.
MAX_MEM_SLOTS = 32
#: The largest config space GET_CONFIG carries (QEMU's VHOST_USER_MAX_CONFIG_SIZE).
MAX_CONFIG_SIZE = 256
#: Offered on the main channel besides SHMEM (docs/protocol.md §6.2, §6.4, §6.10);
#: CONFIG is added for a device with a config space.
OFFERED = (
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.BACKEND_SEND_FD
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.STATUS
)
#: Requests the device accepts and has nothing to do for: no guest, no rings to run.
_NOTHING_TO_DO = frozenset(
    {
        FrontendReq.SET_VRING_NUM,
        FrontendReq.SET_VRING_ADDR,
        FrontendReq.SET_VRING_BASE,
        FrontendReq.SET_VRING_CALL,
        FrontendReq.SET_VRING_ERR,
        FrontendReq.SET_CONFIG,
        FrontendReq.ADD_MEM_REG,
        FrontendReq.REM_MEM_REG,
    }
)


class OpenBackendChannel(NamedTuple):
    """Make the backend channel from this fd, which now belongs to the driver."""

    fd: int


class Forget(NamedTuple):
    """The front-end dropped every mapping (a reset); the device forgets them too."""

    why: str


Effect = Outgoing | OpenBackendChannel | Forget | Note | Hangup


class NotReady(Exception):
    """A SHMEM request cannot be sent: no backend channel, or SHMEM/REPLY_ACK not negotiated."""


class ProtocolViolation(Exception):
    """The peer broke a rule of the protocol; `rule` says which."""

    def __init__(self, rule: Rule, detail: str) -> None:
        super().__init__(detail)
        self.rule = rule
        self.detail = detail


class BackendSession:
    """One front-end connection as the device sees it."""

    def __init__(
        self,
        regions: Mapping[int, int],
        *,
        shmem_bit: int,
        queues: int = 1,
        config_space: bytes = bytes(MAX_CONFIG_SIZE),
        offered: int = OFFERED,
        features: int = 0,
    ) -> None:
        if len(config_space) > MAX_CONFIG_SIZE:
            raise ValueError(
                f"a config space of {len(config_space)} bytes: "
                f"GET_CONFIG carries at most {MAX_CONFIG_SIZE}"
            )
        self.regions = dict(regions)
        self.shmem_bit = shmem_bit
        self.shmem_mask = 1 << shmem_bit
        self.queues = queues
        self.config_space = config_space
        #: the device's own virtio feature bits, offered beside VERSION_1 and
        #: PROTOCOL_FEATURES
        self.device_features = features
        self.offered = int(offered) | self.shmem_mask
        if config_space:
            self.offered |= ProtocolFeature.CONFIG
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.status = 0
        self.backend_channel = False
        #: whether the front-end manages the device's state (its status, its rings): one
        #: that does starts the device before it may act (`running`)
        self.managed = False
        #: rings enabled (SET_VRING_ENABLE 1), and rings started and not stopped by
        #: GET_VRING_BASE (a kick fd, or enabled)
        self.enabled_rings: set[int] = set()
        self.live_rings: set[int] = set()
        self.rings_used = False

    # ------------------------------------------------------------ negotiated state

    @property
    def shmem(self) -> bool:
        return bool(self.protocol_features & self.shmem_mask)

    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features & ProtocolFeature.REPLY_ACK)

    @property
    def running(self) -> bool:
        """Whether the device may act: started (a ring enabled, or DRIVER_OK where no ring
        is), or never stopped by a front-end that does not manage its state."""
        if not self.managed:
            return True
        if self.rings_used:
            return bool(self.enabled_rings)
        return bool(self.status & STATUS_DRIVER_OK)

    def _stopped(self) -> None:
        """A reset: the rings and the status are as before the device was started."""
        self.status = 0
        self.enabled_rings.clear()
        self.live_rings.clear()

    def why_not_ready(self) -> str | None:
        """None when SHMEM requests may be sent; else what is missing, in words."""
        if not self.backend_channel:
            return "the front-end has not sent SET_BACKEND_REQ_FD (no backend channel)"
        if not self.shmem:
            return f"SHMEM (protocol feature bit {self.shmem_bit}) was not negotiated"
        if not self.reply_ack:
            return "REPLY_ACK was not negotiated: the outcome of a map could never be known"
        if not self.running:
            return "the front-end has not started the device (no ring enabled, no DRIVER_OK)"
        return None

    def shmem_config(self) -> ShmemConfig:
        if not self.shmem:
            return ShmemConfig.from_regions({})
        return ShmemConfig.from_regions(self.regions)

    def names(self, mask: int) -> str:
        return ",".join(feature_names(mask, self.shmem_bit)) or "nothing"

    # ------------------------------------------------------------ backend channel

    def shmem_request(
        self, req: BackendReq, m: ShmemMap, fd: int | None = None, *, need_reply: bool = True
    ) -> Outgoing:
        """The message for one SHMEM request, once the connection allows it."""
        why = self.why_not_ready()
        if why is not None:
            raise NotReady(why)
        return Outgoing(
            ChannelKind.BACKEND, req, m, need_reply=need_reply, fds=() if fd is None else (fd,)
        )

    @staticmethod
    def shmem_answer(req: BackendReq, reply: Message) -> int:
        """The front-end's u64 answer to `req`, or ProtocolViolation if `reply` is not one."""
        if reply.request != req or not isinstance(reply.payload, int):
            raise ProtocolViolation(
                Rule.REPLY_MATCHES_REQUEST,
                f"the front-end answered {req.name} with a {reply.name} reply",
            )
        return reply.payload

    # ------------------------------------------------------------ main channel

    def receive(self, msg: Message) -> list[Effect]:
        """One main-channel request: what to send back and do, in order. The driver keeps
        the fd of an OpenBackendChannel and closes every other fd the message brought."""
        effects: list[Effect] = []
        if msg.surplus_fds:
            effects.append(
                Note(f"{msg.name} carried {len(msg.surplus_fds)} fds it may not carry; closed them")
            )
        effects += self._answer(msg)
        return effects

    def _answer(self, msg: Message) -> list[Effect]:
        req = msg.request
        if req in _MANAGES:
            self.managed = True
        if req in _NOTHING_TO_DO:
            return self._ack(msg)
        match req:
            case FrontendReq.GET_FEATURES:
                offered = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES
                return [self._reply(msg, offered | self.device_features)]
            case FrontendReq.SET_FEATURES:
                self.features = _u64(msg)
                return self._ack(msg)
            case FrontendReq.GET_PROTOCOL_FEATURES:
                return [self._reply(msg, self.offered)]
            case FrontendReq.SET_PROTOCOL_FEATURES:
                return self._set_protocol_features(msg)
            case FrontendReq.GET_QUEUE_NUM:
                return [self._reply(msg, self.queues)]
            case FrontendReq.GET_MAX_MEM_SLOTS:
                return [self._reply(msg, MAX_MEM_SLOTS)]
            case FrontendReq.SET_OWNER:
                self.owner = True
                return self._ack(msg)
            case FrontendReq.RESET_OWNER | FrontendReq.RESET_DEVICE:
                self._stopped()
                return [Forget(f"{msg.name} from the front-end"), *self._ack(msg)]
            case FrontendReq.SET_STATUS:
                self.status = _u64(msg)
                if self.status:
                    return self._ack(msg)
                self._stopped()
                return [Forget("SET_STATUS 0 (device reset) from the front-end"), *self._ack(msg)]
            case FrontendReq.GET_STATUS:
                return [self._reply(msg, self.status)]
            case FrontendReq.SET_BACKEND_REQ_FD:
                if len(msg.fds) != 1:
                    return [Note("SET_BACKEND_REQ_FD without its fd"), *self._ack(msg, ok=False)]
                self.backend_channel = True
                return [
                    OpenBackendChannel(msg.fds[0]),
                    Note("backend channel established", routine=True),
                    *self._ack(msg),
                ]
            case FrontendReq.GET_SHMEM_CONFIG:
                notes = (
                    []
                    if self.shmem
                    else [Note("GET_SHMEM_CONFIG without SHMEM negotiated: answering all zero")]
                )
                return [*notes, self._reply(msg, self.shmem_config())]
            case FrontendReq.GET_CONFIG:
                assert isinstance(msg.payload, DeviceConfig)  # the codec decoded it so
                return self._read_config(msg, msg.payload)
            case FrontendReq.SET_VRING_KICK:
                self.live_rings.add(_u64(msg) & VRING_INDEX_MASK)
                return self._ack(msg)
            case FrontendReq.SET_VRING_ENABLE:
                assert isinstance(msg.payload, VringState)
                index, enable = msg.payload.index, bool(msg.payload.num)
                self.rings_used = True
                if enable:
                    self.enabled_rings.add(index)
                    self.live_rings.add(index)
                else:
                    self.enabled_rings.discard(index)
                return self._ack(msg)
            case FrontendReq.GET_VRING_BASE:
                assert isinstance(msg.payload, VringState)
                index = msg.payload.index
                self.enabled_rings.discard(index)
                was_live = index in self.live_rings
                self.live_rings.discard(index)
                reply = self._reply(msg, VringState(index, 0))
                if not was_live or self.live_rings:
                    return [reply]
                # the last ring stopped: the device is. A guest reset under QEMU's
                # vhost-user-base devices says nothing else, and drops every mapping
                # (docs/protocol.md §8): believing in them past it would be believing in
                # mappings that are gone
                stopped = "every ring stopped (GET_VRING_BASE): the device is, its mappings with it"
                return [Forget(stopped), reply]
            case FrontendReq.SET_MEM_TABLE:
                assert isinstance(msg.payload, MemoryTable)
                n = len(msg.payload.regions)
                notes = (
                    []
                    if n == len(msg.fds)
                    else [Note(f"SET_MEM_TABLE: {n} regions but {len(msg.fds)} fds")]
                )
                return [*notes, *self._ack(msg)]
        if owed_by(msg, self.reply_ack) is Owed.OWN_REPLY:
            return [Hangup(f"{msg.name} needs a reply this device cannot give")]
        return [
            Note(f"main channel: {msg.name} is not supported; failing it"),
            *self._ack(msg, ok=False),
        ]

    def _set_protocol_features(self, msg: Message) -> list[Effect]:
        asked = _u64(msg)
        effects: list[Effect] = []
        if asked & ~self.offered:
            effects.append(
                Note(
                    "front-end acked protocol features we never offered: "
                    f"{self.names(asked & ~self.offered)}; ignoring them"
                )
            )
        self.protocol_features = asked & self.offered
        effects.append(Note(f"negotiated {self.names(self.protocol_features)}", routine=True))
        return effects + self._ack(msg)  # decided with the new feature set

    def _read_config(self, msg: Message, asked: DeviceConfig) -> list[Effect]:
        """GET_CONFIG's answer: the bytes asked for, or the protocol's error reply (no
        payload) for a read past the end of the config space."""
        space = self.config_space
        if asked.offset + asked.size > len(space):
            return [
                Note(
                    f"GET_CONFIG asks for {asked.size} bytes at offset {asked.offset} of "
                    f"a {len(space)}-byte config space; answering the protocol's error "
                    "(no payload)"
                ),
                self._reply(msg, None),
            ]
        data = space[asked.offset : asked.offset + asked.size]
        return [self._reply(msg, DeviceConfig(asked.offset, asked.size, asked.flags, data))]

    def _ack(self, msg: Message, ok: bool = True) -> list[Effect]:
        if owed_by(msg, self.reply_ack) is Owed.ACK:
            return [ack(msg, 0 if ok else 1)]
        return []

    @staticmethod
    def _reply(msg: Message, payload: Payload) -> Outgoing:
        return Outgoing(ChannelKind.MAIN, msg.request, payload, reply=True)


def _u64(msg: Message) -> int:
    return msg.payload if isinstance(msg.payload, int) else 0
