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
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar, cast

from ..shmem.rules import Refusal, ShmemRefused, check_fd_count
from ..wire.constants import (
    STATUS_UP,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    VRING_NOFD,
    BackendReq,
    ChannelKind,
    FrontendReq,
    ProtocolFeature,
)
from ..wire.messages import (
    MemoryRegion,
    MemoryTable,
    Message,
    Payload,
    ShmemConfig,
    ShmemMap,
    SingleMemoryRegion,
    VringAddr,
    VringState,
)
from .common import Note, Outgoing, Owed, owed, owed_by
from .profiles import GUEST_RAM_GPA, GUEST_RAM_SIZE, SHMEM_BAR_GPA, STRICT, Profile, Reset
from .profiles import Step as SetUp

#: each ring's size, and how far apart the rings of a started device sit in guest RAM
RING_SIZE = 256
RING_STRIDE = 0x4000

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


class GuestMemory(NamedTuple):
    """Give the device guest RAM of this size: send back (its fd, where it is mapped)."""

    size: int


class DropMappings(NamedTuple):
    """Drop every mapping now (a reset)."""


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
    #: GET_MAX_MEM_SLOTS's answer, where asked
    mem_slots: int | None = None
    #: the device was started (a profile that plays the guest's part)
    started: bool = False
    #: the memory regions told to the back-end (guest RAM, announced mappings), by
    #: guest address, so that none is added twice and those dropped are taken back
    announced: dict[int, MemoryRegion] = field(default_factory=dict)


Step = Outgoing | NeedBackendChannel | Layout | GuestMemory | DropMappings | Note
#: what the driver sends into the handshake: a reply, the fd of a new channel, guest
#: RAM's fd and address, or None
Fed = Message | int | tuple[int, int] | None
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

    def __init__(
        self, *, shmem_bit: int, implemented: int = IMPLEMENTED, profile: Profile = STRICT
    ) -> None:
        self.shmem_bit = shmem_bit
        self.shmem_mask = 1 << shmem_bit
        #: whose behaviour this front-end has (shmemctl.session.profiles)
        self.profile = profile
        #: what this front-end acks when offered (tests and faults may narrow or widen it)
        self.ours = int(implemented) | self.shmem_mask
        if profile.announces_mappings:  # guest memory goes slot by slot
            self.ours |= ProtocolFeature.CONFIGURE_MEM_SLOTS
        self.negotiated = Negotiated()
        #: guest RAM as announced to the device, where a profile starts it
        self._guest_ram: tuple[MemoryRegion, int] | None = None

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
        """The features, then the profile's set-up in its order (strict: QEMU's order of
        docs/protocol.md §4, with the backend channel last before SET_FEATURES).
        Returns what was negotiated."""
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
        neg.features = features & (VHOST_USER_F_PROTOCOL_FEATURES | VIRTIO_F_VERSION_1)
        for step in self.profile.order:
            yield from self._set_up(step)
        return neg

    def _set_up(self, step: SetUp) -> Generator[Step, Fed, None]:
        neg = self.negotiated
        pf = neg.protocol_features
        match step:
            case SetUp.MEM_SLOTS if pf & ProtocolFeature.CONFIGURE_MEM_SLOTS:
                neg.mem_slots = yield from self._u64(FrontendReq.GET_MAX_MEM_SLOTS)
            case SetUp.OWNER:
                yield from self._send(self.request(FrontendReq.SET_OWNER, ack=True))
            case SetUp.LAYOUT if neg.shmem:
                neg.config = yield from self.get_shmem_config()
                if self.profile.one_bar:
                    self._check_one_bar(neg.config)
                yield Layout(neg.config)
            case SetUp.BACKEND_CHANNEL if pf & ProtocolFeature.BACKEND_REQ:
                if not neg.backend_channel:
                    yield from self.open_backend_channel()
            case SetUp.VRING_NOTIFIERS:
                for index in range(neg.queues):  # no eventfd: the rings are polled
                    for req in (FrontendReq.SET_VRING_CALL, FrontendReq.SET_VRING_ERR):
                        yield from self._send(self.request(req, index | VRING_NOFD))
            case SetUp.FEATURES:
                yield from self._send(
                    self.request(FrontendReq.SET_FEATURES, neg.features, ack=True)
                )
            case SetUp.START:
                yield from self.start_device()

    def _check_one_bar(self, config: ShmemConfig) -> None:
        """QEMU's realize packs the regions into one BAR whose size must be a power of
        two, or it aborts (docs/protocol.md §8). (That each is a page multiple is every
        front-end's rule: the engine's `check_layout`.)"""
        total = sum(config.regions().values())
        if total & (total - 1):
            raise HandshakeError(
                f"{self.profile.name}: the regions add up to {total:#x} bytes, not a power of "
                "two, and QEMU packs them into one BAR that must be: it aborts realize "
                "(e.g. 0=8M,2=64K fails where 0=4M,2=4M fits)"
            )

    def start_device(self) -> Generator[Step, Fed, None]:
        """What a booted guest makes its VMM do (QEMU's vhost_dev_start): the memory
        table (guest RAM added once per connection; mappings a reset dropped taken
        back), each ring set up and enabled, then the status."""
        neg = self.negotiated
        if self._guest_ram is None:
            got = yield GuestMemory(GUEST_RAM_SIZE)
            assert isinstance(got, tuple) and len(got) == 2
            fd, addr = got[0], got[1]
            self._guest_ram = (MemoryRegion(GUEST_RAM_GPA, GUEST_RAM_SIZE, addr, 0), fd)
        region, fd = self._guest_ram
        slots = bool(neg.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS)
        if slots:
            # as QEMU's table against what the back-end was told: what went, then what came
            for gone in [r for gpa, r in neg.announced.items() if gpa != region.guest_phys_addr]:
                # taken back before it is said: an unmap announced while this waits for an
                # ack has nothing left to tell, and one announced before was told already
                if neg.announced.pop(gone.guest_phys_addr, None) is None:
                    continue
                yield from self._send(self.request(FrontendReq.REM_MEM_REG,
                                                   SingleMemoryRegion(gone), ack=True))  # fmt: skip
            if region.guest_phys_addr not in neg.announced:
                ram = SingleMemoryRegion(region)
                yield from self._send(self.request(FrontendReq.ADD_MEM_REG, ram, (fd,), ack=True))
                neg.announced[region.guest_phys_addr] = region
        else:
            yield from self._send(self.request(FrontendReq.SET_MEM_TABLE, MemoryTable((region,)),
                                               (fd,), ack=True))  # fmt: skip
        # the device may act once a ring is enabled: a map from then on has a device
        neg.started = True
        for index in range(neg.queues):
            ring = region.userspace_addr + index * RING_STRIDE
            for out in (
                self.request(FrontendReq.SET_VRING_NUM, VringState(index, RING_SIZE)),
                self.request(FrontendReq.SET_VRING_ADDR,
                             VringAddr(index, 0, ring, ring + 0x2000, ring + 0x1000, 0)),
                self.request(FrontendReq.SET_VRING_BASE, VringState(index, 0)),
                self.request(FrontendReq.SET_VRING_KICK, index | VRING_NOFD),
                self.request(FrontendReq.SET_VRING_CALL, index | VRING_NOFD),
                self.request(FrontendReq.SET_VRING_ENABLE, VringState(index, 1)),
            ):  # fmt: skip
                yield from self._send(out)
        if neg.protocol_features & ProtocolFeature.STATUS:  # last, as vhost_user_dev_start
            yield from self._u64(FrontendReq.GET_STATUS)
            yield from self._send(self.request(FrontendReq.SET_STATUS, STATUS_UP, ack=True))

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

    def reset(self) -> Generator[Step, Fed, str]:
        """Reset the device as the profile does; the name of the first message it took.
        Every mapping is dropped first (DropMappings), unless the profile keeps them."""
        neg = self.negotiated
        kind = self.profile.reset
        if kind is Reset.RINGS:
            neg.started = False  # from now on a MAP has no device to land in
        if kind is not Reset.KEEP_MAPPINGS:
            yield DropMappings()
        if kind is Reset.RINGS:  # a guest reset: the rings stop, then the guest boots again
            for index in range(neg.queues):
                yield from self._send(self.request(FrontendReq.SET_VRING_ENABLE,
                                                   VringState(index, 0)))  # fmt: skip
                yield from self._send(self.request(FrontendReq.GET_VRING_BASE,
                                                   VringState(index, 0)))  # fmt: skip
            yield from self.start_device()
            return FrontendReq.SET_VRING_ENABLE.name
        out = self.reset_request()
        yield from self._send(out)
        if self.profile.fresh_channel and neg.protocol_features & ProtocolFeature.BACKEND_REQ:
            yield from self.open_backend_channel()  # activated again, on a new channel
        return out.name

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
        """Steps 1-2 of docs/protocol.md §5 for a request on the backend channel (and
        what the profile refuses beside them): its payload if the engine may judge the
        rest; ShmemRefused otherwise."""
        profile, neg = self.profile, self.negotiated
        if msg.request not in (BackendReq.SHMEM_MAP, BackendReq.SHMEM_UNMAP):
            raise ShmemRefused(
                Refusal.NOT_NEGOTIATED, f"backend channel: {msg.name} is not supported"
            )
        if profile.requires_shmem and not neg.shmem:
            raise ShmemRefused(
                Refusal.NOT_NEGOTIATED,
                f"SHMEM (protocol feature bit {self.shmem_bit}) was not negotiated",
            )
        if msg.request == BackendReq.SHMEM_MAP:
            check_fd_count(len(msg.fds) + len(msg.surplus_fds))
        assert isinstance(msg.payload, ShmemMap)  # the codec decodes SHMEM payloads so
        m = msg.payload
        if SetUp.START in profile.order and not neg.started:
            raise ShmemRefused(Refusal.NOT_STARTED, f"{profile.name}: the guest has not "
                               "started the device: there is no device to map into")  # fmt: skip
        if profile.shmids is not None:
            served = sorted(neg.config.regions() if neg.config else ())[: profile.shmids]
            if m.shmid not in served:
                which = ", ".join(map(str, served)) or "(none)"
                detail = f"{profile.name} serves only shmid {which}, not {m.shmid}"
                raise ShmemRefused(Refusal.NO_REGION, detail)
        return m

    def result(self, refused: ShmemRefused | None) -> int:
        """The value a request's reply carries: 0 if it was done, else what the profile
        answers a refusal with (strict: the negated errno)."""
        if refused is None:
            return 0
        return self.profile.reply(refused.errno, refused.reason)

    def answer(self, msg: Message, result: int) -> Outgoing | None:
        """The reply to a backend-channel request, if one is owed (docs/protocol.md §6.2)."""
        if owed_by(msg, self.negotiated.reply_ack) is Owed.ACK:
            return Outgoing(ChannelKind.BACKEND, msg.request, result, reply=True)
        return None

    def announcement(self, msg: Message, userspace_addr: int) -> Outgoing | None:
        """What the profile tells the back-end of a mapping just made (or gone) on the
        main channel, after its answer: QEMU's ADD_MEM_REG with the mapped fd (its
        REM_MEM_REG), at the mapping's place in the shared memory BAR. None for a
        profile that does not, or without CONFIGURE_MEM_SLOTS to say it with."""
        neg = self.negotiated
        if not (
            self.profile.announces_mappings
            and neg.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS
            and neg.config is not None
            and isinstance(msg.payload, ShmemMap)
        ):
            return None
        m = msg.payload
        # the regions packed into one BAR in shmid order, as QEMU lays them out
        below = sum(size for shmid, size in neg.config.regions().items() if shmid < m.shmid)
        region = MemoryRegion(SHMEM_BAR_GPA + below + m.shm_offset, m.len, userspace_addr,
                              m.fd_offset)  # fmt: skip
        if msg.request == BackendReq.SHMEM_MAP:
            neg.announced[region.guest_phys_addr] = region
            return self.request(FrontendReq.ADD_MEM_REG, SingleMemoryRegion(region),
                                msg.fds[:1], ack=True)  # fmt: skip
        if neg.announced.pop(region.guest_phys_addr, None) is None:
            return None  # taken back already (a device start after a reset): nothing to tell
        return self.request(FrontendReq.REM_MEM_REG, SingleMemoryRegion(region), ack=True)
