"""The VMM's side of one connection, without I/O: the handshake as a sequence of
requests that the driver sends and whose replies it feeds back, and the judgement of
each SHMEM request that arrives on the backend channel.

The handshake is a generator: it yields what to send next (an `Outgoing`, or
`NeedBackendChannel` when the driver must make a socket pair and send it the fd it
returns) and is sent the reply (None when none is owed). A deliberate fault wraps
it from outside (`shmemctl.faults`); nothing here knows about faults.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import NamedTuple, TypeVar, cast

from ..shmem.rules import Refusal, ShmemRefused, check_fd_count
from ..wire.constants import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    BackendReq,
    ChannelKind,
    FrontendReq,
    ProtocolFeature,
)
from ..wire.messages import Message, Payload, ShmemConfig, ShmemMap
from .common import Note, Outgoing, Owed, owed, owed_by

#: Protocol features this front-end implements (SHMEM is added at the configured bit).
IMPLEMENTED = (
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.BACKEND_SEND_FD
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.STATUS
)


class HandshakeError(Exception):
    """The back-end answered in a way this front-end cannot go on from."""


class NeedBackendChannel(NamedTuple):
    """Make a socket pair; send back the fd of the end the back-end gets."""


class Layout(NamedTuple):
    """Reserve the regions of this layout now, before a backend channel can ask for a
    map into them (docs/protocol.md §4, F5)."""

    config: ShmemConfig


@dataclass
class Negotiated:
    features: int = 0
    protocol_features: int = 0
    offered: int = 0
    shmem: bool = False
    reply_ack: bool = False
    queues: int = 1
    config: ShmemConfig | None = None
    backend_channel: bool = False


Step = Outgoing | NeedBackendChannel | Layout | Note
#: what the driver sends into the handshake: a reply, the fd of a new channel, or None
Fed = Message | int | None
Handshake = Generator[Step, Fed, Negotiated]
T = TypeVar("T")


def drive(steps: Generator[Step, Fed, T], act: Callable[[Step], Fed]) -> T:
    """Run a session's sequence of steps: `act` carries out each one and returns what
    goes back in (a reply, an fd, or None); returns the sequence's result."""
    fed: Fed = None
    while True:
        try:
            step = steps.send(fed)
        except StopIteration as done:
            return cast(T, done.value)
        fed = act(step)


def relay(
    steps: Generator[Step, Fed, T], through: Callable[[Step], Generator[Step, Fed, Fed]]
) -> Generator[Step, Fed, T]:
    """`steps`, each passed through `through`, which may change it or add steps around
    it, and says what goes back in: how a layer wraps a session's sequence."""
    fed: Fed = None
    while True:
        try:
            step = steps.send(fed)
        except StopIteration as done:
            return cast(T, done.value)
        fed = yield from through(step)


class FrontendSession:
    """One back-end connection as the VMM sees it."""

    def __init__(self, *, shmem_bit: int, implemented: int = IMPLEMENTED) -> None:
        self.shmem_bit = shmem_bit
        self.shmem_mask = 1 << shmem_bit
        #: what this front-end acks when offered (tests and faults may narrow or widen it)
        self.ours = int(implemented) | self.shmem_mask
        self.negotiated = Negotiated()

    # ------------------------------------------------------------ main channel

    def request(
        self,
        req: FrontendReq,
        payload: Payload = None,
        fds: tuple[int, ...] = (),
        *,
        ack: bool = False,
    ) -> Outgoing:
        """A main-channel request; `ack` asks for an ack where one can be had."""
        need = ack and owed(ChannelKind.MAIN, req, True, self.negotiated.reply_ack) is Owed.ACK
        return Outgoing(ChannelKind.MAIN, req, payload, need_reply=need, fds=fds)

    def expects_reply(self, out: Outgoing) -> bool:
        return owed(out.channel, out.request, out.need_reply, self.negotiated.reply_ack) is not (
            Owed.NOTHING
        )

    def check_reply(self, out: Outgoing, reply: Message) -> Message:
        """`reply` if it answers `out` as it must; HandshakeError otherwise."""
        if reply.is_reply is False or reply.request != out.request:
            raise HandshakeError(f"asked {out.name}, the back-end answered {reply.name}")
        if out.need_reply and reply.payload != 0:  # an ack: only an ack is asked for
            raise HandshakeError(f"{out.name} failed: the back-end replied {reply.payload}")
        return reply

    def handshake(self) -> Handshake:
        """QEMU's order (docs/protocol.md §4), with the backend channel last before
        SET_FEATURES. Returns what was negotiated."""
        neg = self.negotiated = Negotiated()
        features = yield from self._u64(FrontendReq.GET_FEATURES)
        if not features & VHOST_USER_F_PROTOCOL_FEATURES:
            yield Note(
                "back-end offers no protocol features (virtio bit 30): serving without SHMEM"
            )
        else:
            neg.offered = yield from self._u64(FrontendReq.GET_PROTOCOL_FEATURES)
            acked = neg.offered & self.ours
            yield from self._send(self.request(FrontendReq.SET_PROTOCOL_FEATURES, acked))
            neg.protocol_features = acked
            neg.reply_ack = bool(acked & ProtocolFeature.REPLY_ACK)
            neg.shmem = bool(acked & self.shmem_mask)
            if not neg.shmem:
                yield Note(
                    f"back-end does not offer SHMEM (protocol feature bit "
                    f"{self.shmem_bit}): serving without shared memory regions"
                )
            elif not neg.reply_ack:
                yield Note("SHMEM without REPLY_ACK: the back-end can never learn a map's outcome")
            if acked & ProtocolFeature.MQ:
                neg.queues = yield from self._u64(FrontendReq.GET_QUEUE_NUM)
        yield from self._send(self.request(FrontendReq.SET_OWNER, ack=True))
        if neg.shmem:
            neg.config = yield from self.get_shmem_config()
            yield Layout(neg.config)
        if neg.protocol_features & ProtocolFeature.BACKEND_REQ and not neg.backend_channel:
            yield from self.open_backend_channel()
        neg.features = features & (VHOST_USER_F_PROTOCOL_FEATURES | VIRTIO_F_VERSION_1)
        yield from self._send(self.request(FrontendReq.SET_FEATURES, neg.features, ack=True))
        return neg

    def open_backend_channel(self) -> Generator[Step, Fed, None]:
        fd = yield NeedBackendChannel()
        assert isinstance(fd, int) and not isinstance(fd, bool)
        yield from self._send(self.request(FrontendReq.SET_BACKEND_REQ_FD, None, (fd,), ack=True))
        self.negotiated.backend_channel = True

    def get_shmem_config(self) -> Generator[Step, Fed, ShmemConfig]:
        if not self.negotiated.shmem:
            raise HandshakeError("SHMEM is not negotiated with this back-end")
        reply = yield from self._send(self.request(FrontendReq.GET_SHMEM_CONFIG))
        config = reply.payload if reply is not None else None
        if not isinstance(config, ShmemConfig):
            raise HandshakeError("GET_SHMEM_CONFIG reply is not a VhostUserShMemConfig")
        in_use = len(config.regions())
        if config.nregions != in_use:
            yield Note(
                f"GET_SHMEM_CONFIG: nregions is {config.nregions} but {in_use} sizes "
                "are non-zero; the sizes win"
            )
        return config

    def reset_request(self) -> Outgoing:
        """How to reset the device with what was negotiated (docs/protocol.md §5 lifetime)."""
        pf = self.negotiated.protocol_features
        if pf & ProtocolFeature.RESET_DEVICE:
            return self.request(FrontendReq.RESET_DEVICE, ack=True)
        if pf & ProtocolFeature.STATUS:
            return self.request(FrontendReq.SET_STATUS, 0, ack=True)
        return self.request(FrontendReq.RESET_OWNER, ack=True)

    def _send(self, out: Outgoing) -> Generator[Step, Fed, Message | None]:
        reply = yield out
        if not self.expects_reply(out):
            return None
        if not isinstance(reply, Message):
            raise HandshakeError(f"{out.name}: no reply")
        return self.check_reply(out, reply)

    def _u64(self, req: FrontendReq) -> Generator[Step, Fed, int]:
        reply = yield from self._send(self.request(req))
        if reply is None or not isinstance(reply.payload, int):
            raise HandshakeError(f"{req.name} reply has no u64 payload")
        return reply.payload

    # ------------------------------------------------------------ backend channel

    def admit_shmem(self, msg: Message) -> ShmemMap:
        """Steps 1-2 of docs/protocol.md §5 for a request on the backend channel: its
        payload if the engine may judge the rest; ShmemRefused otherwise."""
        if msg.request not in (BackendReq.SHMEM_MAP, BackendReq.SHMEM_UNMAP):
            raise ShmemRefused(
                Refusal.NOT_NEGOTIATED, f"backend channel: {msg.name} is not supported"
            )
        if not self.negotiated.shmem:
            raise ShmemRefused(
                Refusal.NOT_NEGOTIATED,
                f"SHMEM (protocol feature bit {self.shmem_bit}) was not negotiated",
            )
        if msg.request == BackendReq.SHMEM_MAP:
            check_fd_count(len(msg.fds) + len(msg.surplus_fds))
        assert isinstance(msg.payload, ShmemMap)  # the codec decodes SHMEM payloads so
        return msg.payload

    def answer(self, msg: Message, result: int) -> Outgoing | None:
        """The reply to a backend-channel request, if one is owed (docs/protocol.md §6.2)."""
        if owed_by(msg, self.negotiated.reply_ack) is Owed.ACK:
            return Outgoing(ChannelKind.BACKEND, msg.request, result, reply=True)
        return None
