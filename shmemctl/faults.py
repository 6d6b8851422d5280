"""Deliberate protocol faults, so a conformance check can be shown to catch each one.

`shmemctl frontend --fault NAME` and `python -m backend_sim --fault NAME` turn
one of these on; nothing else ever does. Each breaks exactly one rule of the
protocol (docs/protocol.md §N, named beside it).

A fault is a member of `Fault`. It is applied by a layer around a session:
`FrontendFaults` wraps the VMM's handshake and its answers on the backend channel,
`DeviceFaults` the device's answers on the main channel and its SHMEM requests. The
sessions and the engine know nothing of faults; a daemon started without one never
builds a layer.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Generator, Iterable, Mapping
from typing import TYPE_CHECKING, TypeVar

from .session import FrontendSession, Outgoing
from .session.backend import BackendSession, Effect, OpenBackendChannel
from .session.common import Owed, ack, owed_by
from .session.frontend import Fed, Handshake, Step, relay
from .shmem import libc
from .shmem.region import RegionTable
from .shmem.rules import Refusal
from .wire.constants import BackendReq, ChannelKind, FrontendReq, ProtocolFeature
from .wire.messages import Message, ShmemConfig, ShmemMap, encode, result_from_errno

if TYPE_CHECKING:
    from .backend import BackendChannel

FRONTEND = "front-end"
BACKEND = "back-end"
T = TypeVar("T")


class Fault(enum.Enum):
    """One deliberate fault: which daemon has it, its --fault name, what it breaks."""

    # the front-end's (shmemctl frontend --fault NAME)
    REPLY_TWICE = (FRONTEND, "reply-twice", "answers a SHMEM request twice (§5: exactly one reply)")
    REPLY_ALWAYS = (
        FRONTEND,
        "reply-always",
        "answers SHMEM requests that did not ask (§6.2: only under NEED_REPLY)",
    )
    NO_REPLY = (
        FRONTEND,
        "no-reply",
        "never answers a SHMEM request (§5: a reply is owed under NEED_REPLY)",
    )
    SHMEM_REPLY_FLAGS = (FRONTEND, "bad-reply-flags", "replies with flags 0xd instead of 0x5 (§2)")
    STALE_REPLY = (
        FRONTEND,
        "stale-reply",
        "replies with the request's own bytes instead of a u64 (§5, the seeds' bug)",
    )
    SKIP_OVERLAP_CHECK = (
        FRONTEND,
        "skip-overlap-check",
        "maps over an existing mapping (§5 step 10)",
    )
    SKIP_ALIGNMENT_CHECK = (
        FRONTEND,
        "skip-alignment-check",
        "accepts a length that is not page aligned (§5 step 9)",
    )
    ACK_GPA = (FRONTEND, "ack-gpa", "acks protocol bit 21 (GPA_ADDRESSES) when offered (§6.1)")
    REPLY_OK_ALWAYS = (
        FRONTEND,
        "reply-ok-always",
        "answers 0 to every SHMEM request, mapping nothing it should refuse (§5)",
    )
    REPLY_FAIL_ALWAYS = (
        FRONTEND,
        "reply-fail-always",
        "answers failure to every SHMEM request and maps nothing (§5)",
    )
    IGNORE_UNASKED = (
        FRONTEND,
        "ignore-unasked",
        "drops SHMEM requests that ask for no reply (§5: in order, all handled)",
    )
    ASK_CONFIG_TWICE = (
        FRONTEND,
        "ask-config-twice",
        "asks GET_SHMEM_CONFIG twice in one connection (§5)",
    )
    BACKEND_FD_TWICE = (FRONTEND, "backend-fd-twice", "sends SET_BACKEND_REQ_FD with two fds (§1)")
    NO_REPLY_ACK = (FRONTEND, "no-reply-ack", "acks SHMEM without REPLY_ACK (§6.2)")
    ACK_UNOFFERED = (
        FRONTEND,
        "ack-unoffered",
        "acks protocol bit 14, which the back-end did not offer (§4)",
    )
    BAD_REQUEST_FLAGS = (
        FRONTEND,
        "bad-request-flags",
        "sends SET_OWNER with a reserved flag bit (§2)",
    )
    BACKEND_CHANNEL_FIRST = (
        FRONTEND,
        "backend-channel-first",
        "sends SET_BACKEND_REQ_FD before SET_PROTOCOL_FEATURES (§4)",
    )
    EXIT_MID_HANDSHAKE = (
        FRONTEND,
        "exit-mid-handshake",
        "exits once SET_BACKEND_REQ_FD is acked, before SET_FEATURES: a crash "
        "that leaves the back-end without a peer (§1)",
    )
    # the device's (python -m backend_sim --fault NAME)
    SHORT_SHMEM_CONFIG = (
        BACKEND,
        "short-shmem-config",
        "answers GET_SHMEM_CONFIG with 2048 bytes, not 2056 (§2, §5)",
    )
    BAD_NREGIONS = (
        BACKEND,
        "bad-nregions",
        "answers GET_SHMEM_CONFIG with nregions 300 (§5: at most 256)",
    )
    UNALIGNED_CONFIG = (
        BACKEND,
        "unaligned-config",
        "advertises a region size that is not a page multiple (§5)",
    )
    UNSTABLE_CONFIG = (
        BACKEND,
        "unstable-config",
        "answers GET_SHMEM_CONFIG differently the second time (§5)",
    )
    OFFER_BIT_21 = (
        BACKEND,
        "offer-bit-21",
        "offers protocol bit 21 (GPA_ADDRESSES) beside SHMEM (§6.1)",
    )
    NO_ACK = (BACKEND, "no-ack", "never acks a NEED_REPLY request on the main channel (§3)")
    ACK_TWICE = (
        BACKEND,
        "ack-twice",
        "acks a NEED_REPLY request twice (§3, §5: exactly one reply)",
    )
    MAIN_REPLY_FLAGS = (
        BACKEND,
        "bad-reply-flags",
        "replies on the main channel with flags 0x1 instead of 0x5 (§2)",
    )
    MAP_WITHOUT_SHMEM = (
        BACKEND,
        "map-without-shmem",
        "sends SHMEM_MAP although SHMEM was not negotiated (§6.2)",
    )
    UNMAP_AFTER_RESET = (
        BACKEND,
        "unmap-after-reset",
        "sends SHMEM_UNMAP for mappings a reset already dropped (§5)",
    )
    ECHO_NEED_REPLY = (
        BACKEND,
        "echo-need-reply",
        "replies to a getter sent with NEED_REPLY with flags 0xd (§2, §3)",
    )
    ACK_ALWAYS = (BACKEND, "ack-always", "acks main-channel requests that asked for no reply (§3)")
    NREGIONS_MISMATCH = (
        BACKEND,
        "nregions-mismatch",
        "answers GET_SHMEM_CONFIG with nregions one more than in use (§6.3)",
    )
    SHMEM_WITHOUT_REPLY_ACK = (
        BACKEND,
        "shmem-without-reply-ack",
        "offers SHMEM but not REPLY_ACK (§6.2)",
    )
    MAP_TWO_FDS = (BACKEND, "map-two-fds", "sends SHMEM_MAP with two fds (§5 step 2)")
    MAP_OUT_OF_BOUNDS = (
        BACKEND,
        "map-out-of-bounds",
        "asks for maps past the end of the region (§5 step 8)",
    )
    SHORT_PROTOCOL_FEATURES = (
        BACKEND,
        "short-protocol-features",
        "answers GET_PROTOCOL_FEATURES with 4 bytes, not 8 (§2)",
    )
    FAIL_BACKEND_CHANNEL = (
        BACKEND,
        "fail-backend-channel",
        "answers SET_BACKEND_REQ_FD with a failure ack (§4)",
    )
    BLOCK_MAIN_WHILE_MAPPING = (
        BACKEND,
        "block-main-while-mapping",
        "stops serving its main channel while a map waits for its ack (QEMU then "
        "deadlocks, §8)",
    )
    POSITIVE_REPLY_IS_SUCCESS = (
        BACKEND,
        "positive-reply-is-success",
        "takes a reply of 1 for success, as if only a negated errno refused (QEMU answers "
        "1, §8)",
    )
    KEEP_FIRST_BACKEND_CHANNEL = (
        BACKEND,
        "keep-first-backend-channel",
        "acks a later SET_BACKEND_REQ_FD but goes on with its first backend channel "
        "(Cloud Hypervisor makes a fresh one at each activation, §8)",
    )

    def __init__(self, role: str, option: str, description: str) -> None:
        self.role = role
        self.option = option
        self.description = description

    @classmethod
    def named(cls, role: str, options: Iterable[str]) -> frozenset[Fault]:
        """The faults of `role` with these --fault names; ValueError naming the known ones."""
        known = {f.option: f for f in cls if f.role == role}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(
                f"unknown fault {', '.join(unknown)}; there are: {', '.join(sorted(known))}"
            )
        return frozenset(known[o] for o in options)


#: --fault name -> what it breaks, per daemon (for option parsing and help)
FRONTEND_FAULTS = {f.option: f.description for f in Fault if f.role == FRONTEND}
BACKEND_FAULTS = {f.option: f.description for f in Fault if f.role == BACKEND}


def _flags(out: Outgoing, flags: int) -> Outgoing:
    """`out` sent with other header flags."""
    data = out.encode()
    return out._replace(raw=data[:4] + struct.pack("<I", flags) + data[8:])


def _size(out: Outgoing, size: int, payload: bytes) -> Outgoing:
    """`out` sent with another announced size and payload."""
    data = out.encode()
    return out._replace(raw=data[:8] + struct.pack("<I", size) + payload)


# ---------------------------------------------------------------- the front-end


class _Layer:
    """The faults one daemon was started with; `fault in layer` says whether it is on."""

    def __init__(self, faults: frozenset[Fault]) -> None:
        self.faults = faults

    def __contains__(self, fault: Fault) -> bool:
        return fault in self.faults


class FrontendFaults(_Layer):
    """Faults of the VMM side, around a FrontendSession and the engine's answers."""

    def handshake(self, session: FrontendSession) -> Handshake:
        """The session's handshake with the chosen faults in its requests and its order."""
        if Fault.ACK_GPA in self:
            session.ours |= ProtocolFeature.GPA_ADDRESSES
        if Fault.NO_REPLY_ACK in self:
            session.ours &= ~ProtocolFeature.REPLY_ACK
        return relay(session.handshake(), lambda step: self._step(session, step, around=True))

    def _step(
        self, session: FrontendSession, step: Step, *, around: bool
    ) -> Generator[Step, Fed, Fed]:
        """One step of the handshake, faulted; `around`: with the requests a fault adds
        before or after it (not again for those added requests themselves)."""
        if not isinstance(step, Outgoing):
            return (yield step)
        if (
            around
            and step.request == FrontendReq.GET_PROTOCOL_FEATURES
            and (Fault.BACKEND_CHANNEL_FIRST in self)
        ):
            yield from self._added(session, session.open_backend_channel())
        if step.request == FrontendReq.SET_FEATURES and Fault.EXIT_MID_HANDSHAKE in self:
            os._exit(1)  # the fault: a crash with the backend channel open
        fed = yield self._request(step)
        if (
            around
            and step.request == FrontendReq.GET_SHMEM_CONFIG
            and (Fault.ASK_CONFIG_TWICE in self)
        ):  # the first answer goes to the session once the second is read
            yield from self._added(session, session.get_shmem_config())
        return fed

    def _added(
        self, session: FrontendSession, steps: Generator[Step, Fed, T]
    ) -> Generator[Step, Fed, T]:
        return relay(steps, lambda step: self._step(session, step, around=False))

    def _request(self, out: Outgoing) -> Outgoing:
        match out.request:
            case FrontendReq.SET_PROTOCOL_FEATURES if Fault.ACK_UNOFFERED in self:
                assert isinstance(out.payload, int)
                return out._replace(payload=out.payload | ProtocolFeature.INBAND_NOTIFICATIONS)
            case FrontendReq.SET_OWNER if Fault.BAD_REQUEST_FLAGS in self:
                return _flags(out, 0x11 | (0x8 if out.need_reply else 0))
            case FrontendReq.SET_BACKEND_REQ_FD if Fault.BACKEND_FD_TWICE in self:
                return out._replace(fds=out.fds * 2)
        return out

    def does_nothing(self, msg: Message) -> bool:
        """The request is to be answered as failed without reaching the engine."""
        return Fault.REPLY_FAIL_ALWAYS in self or (
            Fault.IGNORE_UNASKED in self and not msg.need_reply
        )

    def result(
        self, table: RegionTable | None, msg: Message, refusal: Refusal | None, result: int
    ) -> int:
        """The value answered in place of the engine's `result`; called while the
        message's fd is still open."""
        if Fault.REPLY_OK_ALWAYS in self:
            return 0
        if Fault.REPLY_FAIL_ALWAYS in self:
            return result_from_errno(5)
        if (refusal is Refusal.OVERLAP and Fault.SKIP_OVERLAP_CHECK in self) or (
            refusal is Refusal.MISALIGNED and Fault.SKIP_ALIGNMENT_CHECK in self
        ):
            return self._map_anyway(table, msg)
        return result

    @staticmethod
    def _map_anyway(table: RegionTable | None, msg: Message) -> int:
        """Map what the engine refused, straight into the region and behind the table's
        back: the front-end that skips a check, whose table then disagrees with the
        kernel (what the fuzzer's /proc comparison is there to catch)."""
        m = msg.payload
        region = (
            table.regions.get(m.shmid) if table is not None and isinstance(m, ShmemMap) else None
        )
        if region is None or not isinstance(m, ShmemMap) or len(msg.fds) != 1:
            return result_from_errno(22)
        try:
            libc.map_fd(region.base + m.shm_offset, m.len, msg.fds[0], m.fd_offset, m.writable)
        except OSError as exc:
            return result_from_errno(exc.errno or 5)
        return 0

    def answers(self, session: FrontendSession, msg: Message, result: int) -> list[Outgoing]:
        """What goes back for a backend-channel request, faulted."""
        if Fault.NO_REPLY in self:
            return []
        out = session.answer(msg, result)
        if out is None:
            if Fault.REPLY_ALWAYS not in self:
                return []
            out = Outgoing(ChannelKind.BACKEND, msg.request, result, reply=True)
        if Fault.STALE_REPLY in self:  # the request's own payload sent back as the "result"
            body = encode(ChannelKind.BACKEND, msg.request, msg.payload)[12:]
            out = _size(out, len(body), body)
        if Fault.SHMEM_REPLY_FLAGS in self:
            out = _flags(out, 0xD)
        return [out, out] if Fault.REPLY_TWICE in self else [out]


# ---------------------------------------------------------------- the device


class DeviceFaults(_Layer):
    """Faults of the device side, around a BackendSession."""

    def __init__(self, faults: frozenset[Fault]) -> None:
        super().__init__(faults)
        self._configs_sent = 0
        #: the connection (its session) that has its backend channel already
        self._channel_of: BackendSession | None = None

    def hold_main(self, channel: BackendChannel | None) -> None:
        """Before a main-channel request is answered: the fault that stops serving the
        main channel while a map waits for its ack."""
        if channel is not None and Fault.BLOCK_MAIN_WHILE_MAPPING in self:
            with channel.lock:  # held by a request from its send to its answer
                pass

    def offered(self, offered: int) -> int:
        if Fault.OFFER_BIT_21 in self:
            offered |= ProtocolFeature.GPA_ADDRESSES
        if Fault.SHMEM_WITHOUT_REPLY_ACK in self:
            offered &= ~ProtocolFeature.REPLY_ACK
        return offered

    @property
    def ignores_negotiation(self) -> bool:
        """SHMEM requests go out whatever was negotiated."""
        return Fault.MAP_WITHOUT_SHMEM in self

    def shmem_request(
        self,
        session: BackendSession,
        req: BackendReq,
        m: ShmemMap,
        fd: int | None,
        need_reply: bool,
    ) -> Outgoing:
        if self.ignores_negotiation:
            out = Outgoing(
                ChannelKind.BACKEND, req, m, need_reply=need_reply, fds=() if fd is None else (fd,)
            )
        else:
            out = session.shmem_request(req, m, fd, need_reply=need_reply)
        if Fault.MAP_OUT_OF_BOUNDS in self:
            size = session.regions.get(m.shmid, 0)
            out = out._replace(payload=m._replace(shm_offset=m.shm_offset + size))
        if Fault.MAP_TWO_FDS in self:
            out = out._replace(fds=out.fds * 2)
        return out

    def answers(self, session: BackendSession, msg: Message, effects: list[Effect]) -> list[Effect]:
        """The session's answer to a main-channel request, faulted."""
        if any(isinstance(e, OpenBackendChannel) for e in effects):
            if Fault.KEEP_FIRST_BACKEND_CHANNEL in self and self._channel_of is session:
                # the fault: the new channel is let go (its fd closed), the first one kept
                effects = [e for e in effects if not isinstance(e, OpenBackendChannel)]
            self._channel_of = session
        out: list[Effect] = []
        acked = False
        # what the session sends back for msg is an ack exactly when an ack is owed
        is_ack = owed_by(msg, session.reply_ack) is Owed.ACK
        for effect in effects:
            if not isinstance(effect, Outgoing):
                out.append(effect)
                continue
            acked |= is_ack
            if is_ack and Fault.NO_ACK in self:
                continue
            if (
                is_ack
                and msg.request == FrontendReq.SET_BACKEND_REQ_FD
                and (Fault.FAIL_BACKEND_CHANNEL in self)
            ):  # the channel is made all the same; only the ack says it failed
                effect = effect._replace(payload=1)
            effect = self._reply(session, msg, effect, is_ack)
            out += [effect, effect] if is_ack and Fault.ACK_TWICE in self else [effect]
        if (
            not acked
            and Fault.ACK_ALWAYS in self
            and session.reply_ack
            and (owed_by(msg, True) is not Owed.OWN_REPLY)
        ):
            out.append(self._reply(session, msg, ack(msg, 0), True))
        return out

    def _reply(
        self, session: BackendSession, msg: Message, out: Outgoing, is_ack: bool
    ) -> Outgoing:
        if msg.request == FrontendReq.GET_SHMEM_CONFIG and session.shmem:
            out = out._replace(payload=self._config(session.regions))
            self._configs_sent += 1
        if not is_ack and msg.need_reply and Fault.ECHO_NEED_REPLY in self:  # libvhost-user's habit
            out = _flags(out, 0xD)
        if (
            msg.request == FrontendReq.GET_PROTOCOL_FEATURES
            and Fault.SHORT_PROTOCOL_FEATURES in self
        ):
            out = _size(out, 4, out.encode()[12:16])
        if msg.request == FrontendReq.GET_SHMEM_CONFIG and Fault.SHORT_SHMEM_CONFIG in self:
            data = out.encode()
            out = _size(out, len(data) - 20, data[12:-8])
        if Fault.MAIN_REPLY_FLAGS in self:
            out = _flags(out, 0x1)
        return out

    def _config(self, layout: Mapping[int, int]) -> ShmemConfig:
        regions = dict(layout)
        if regions and Fault.UNALIGNED_CONFIG in self:
            regions[min(regions)] += 512
        if regions and Fault.UNSTABLE_CONFIG in self and self._configs_sent:
            regions[min(regions)] *= 2
        config = ShmemConfig.from_regions(regions)
        if Fault.BAD_NREGIONS in self:
            config = ShmemConfig(config.sizes, 300)
        if Fault.NREGIONS_MISMATCH in self:
            config = ShmemConfig(config.sizes, config.nregions + 1)
        return config
