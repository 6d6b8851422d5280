"""A pair seen from the side: fed every message of both channels in the order each
channel carried them, it keeps what the pair negotiated, the region layout, the
mappings in place and the requests still owed a reply, and reports each rule either
side breaks. It sends nothing and needs no I/O: the base of the tap and of checking
a recorded trace.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from ..shmem.index import IntervalIndex
from ..shmem.libc import PAGE_SIZE
from ..shmem.mapping import FileFacts, Mapping
from ..shmem.rules import ShmemRefused, check_fd_count, must_refuse
from ..wire.constants import (
    LEGACY_SHMEM_BIT,
    SHMEM_BIT,
    BackendReq,
    ChannelKind,
    FrontendReq,
    ProtocolFeature,
)
from ..wire.messages import Message, ShmemConfig, ShmemMap
from .common import Owed, Rule, owed_by

FRONTEND = "front-end"
BACKEND = "back-end"
#: as a plain int: judged on every message, and an IntFlag's & costs several times more
_REPLY_ACK = int(ProtocolFeature.REPLY_ACK)
#: what a front-end sends the back-end because a mapping changed guest memory (QEMU's
#: memory listener): asked before the map is answered, a back-end waiting for that
#: answer never reads it. Anything else the front-end asks meanwhile (the rest of its
#: handshake while the device maps already) is not a consequence of the map.
FOLLOW_UPS = frozenset(
    {FrontendReq.SET_MEM_TABLE, FrontendReq.ADD_MEM_REG, FrontendReq.REM_MEM_REG}
)


class Violation(NamedTuple):
    rule: Rule
    #: who broke it: FRONTEND or BACKEND
    by: str
    detail: str


@dataclass
class PairState:
    #: protocol features: what the back-end offered, what the front-end acked
    offered: int | None = None
    acked: int | None = None
    #: virtio features: what the back-end offered (GET_FEATURES), what the front-end set
    device_features: int | None = None
    features: int | None = None
    config: ShmemConfig | None = None
    #: the config's region sizes by shmid, read once (every SHMEM request is judged by them)
    sizes: dict[int, int] = field(default_factory=dict)
    backend_channel: bool = False
    #: shmid -> its mappings by range, as the front-end's answers say they are (an index:
    #: every SHMEM request is judged against them)
    mappings: dict[int, IntervalIndex[Mapping]] = field(default_factory=dict)
    #: ranges a reset dropped, not mapped again since
    dropped: set[tuple[int, int, int]] = field(default_factory=set)
    resets: int = 0


#: How many violations an observer keeps to be read; whoever needs them all counts
#: them as `message` returns them (the tap counts them by rule).
KEPT_VIOLATIONS = 10_000


class Observer:
    """Feed `message(msg)` with each message as it travelled; read `violations`."""

    def __init__(self, *, shmem_bit: int = SHMEM_BIT) -> None:
        self.shmem_mask = 1 << shmem_bit
        self.state = PairState()
        #: the latest violations (at most KEPT_VIOLATIONS, then the older half goes: a
        #: pair that breaks a rule with every message is watched for days), oldest first
        self.violations: list[Violation] = []
        #: per channel, the requests still owed a reply, oldest first
        self._pending: dict[ChannelKind, deque[Message]] = {
            ChannelKind.MAIN: deque(),
            ChannelKind.BACKEND: deque(),
        }
        #: channels it can no longer follow (`lost`): nothing on them is judged
        self.blind: set[ChannelKind] = set()
        #: what the file of each SHMEM_MAP still owed an answer is, by the request's id
        #: (the request waits in `_pending`, so its id is not reused meanwhile)
        self._files: dict[int, FileFacts] = {}
        #: why each SHMEM request still owed an answer must be refused ("" when it need
        #: not), judged when it was sent: in strict order, what was held then is what the
        #: front-end holds when it answers
        self._refusals: dict[int, str] = {}

    # ------------------------------------------------------------ what it knows

    @property
    def reply_ack(self) -> bool:
        return bool((self.state.acked or 0) & _REPLY_ACK)

    @property
    def shmem(self) -> bool:
        return bool((self.state.acked or 0) & self.shmem_mask)

    def pending(self, channel: ChannelKind) -> list[Message]:
        """Requests on `channel` still owed a reply, oldest first."""
        return list(self._pending[channel])

    def owes(self, msg: Message) -> bool:
        """Whether `msg` (this very message) is still owed a reply."""
        queue = self._pending[msg.channel]
        # asked right after feeding it, for every message: then it is the newest, if owed
        return bool(queue) and (queue[-1] is msg or any(waiting is msg for waiting in queue))

    def mappings(self) -> list[Mapping]:
        held = self.state.mappings
        return [m for shmid in sorted(held) for _, _, m in held[shmid]]

    # ------------------------------------------------------------ feeding

    def message(
        self, msg: Message, file: FileFacts | None = None, *, answers_in_flight: bool = False
    ) -> list[Violation]:
        """One message as it travelled; returns the violations it showed (also kept).
        `file`: for a SHMEM_MAP, what its fd was, learnt by whoever held the fd (the
        observer does no I/O); the mapping the request makes keeps it.
        `answers_in_flight`: for a front-end's request on the main channel, that the
        front-end may already have sent answers the observer has not been fed yet (the
        two channels are separate streams: only their reader can tell); then a memory
        table update before an answer is not held against it."""
        if len(self.violations) >= KEPT_VIOLATIONS:
            del self.violations[: KEPT_VIOLATIONS // 2]
        before = len(self.violations)
        if msg.channel in self.blind:
            return []
        if msg.is_reply:
            self._reply(msg)
        elif msg.channel is ChannelKind.MAIN:
            self._main_request(msg)
            if msg.request in FOLLOW_UPS and not answers_in_flight and self.owes(msg):
                self._asked_before_answering(msg)
        else:
            self._backend_request(msg, file)
        return self.violations[before:]

    def disconnected(self) -> None:
        """The connection ended: every mapping is gone, nothing is owed any more."""
        self._drop_all()
        for queue in self._pending.values():
            queue.clear()
        self._files.clear()
        self._refusals.clear()
        self.blind.clear()
        self.state = PairState(resets=self.state.resets)

    def lost(self, channel: ChannelKind) -> None:
        """One direction of `channel` can no longer be followed (its framing is lost):
        which requests it carries, and so which replies are owed, is unknown from now
        on. Judging the other direction would accuse a side of what cannot be known, so
        nothing on `channel` is judged again on this connection."""
        self.blind.add(channel)
        self._pending[channel].clear()
        if channel is ChannelKind.BACKEND:
            self._files.clear()

    def _flag(self, rule: Rule, by: str, detail: str) -> None:
        self.violations.append(Violation(rule, by, detail))

    # ------------------------------------------------------------ main channel

    def _main_request(self, msg: Message) -> None:
        s = self.state
        match msg.request:
            case FrontendReq.SET_PROTOCOL_FEATURES:
                acked = msg.payload if isinstance(msg.payload, int) else 0
                if s.offered is not None and acked & ~s.offered:
                    self._flag(
                        Rule.ACKS_ONLY_OFFERED,
                        FRONTEND,
                        f"acked {acked:#x}, offered {s.offered:#x}",
                    )
                if (
                    acked & ProtocolFeature.GPA_ADDRESSES
                    and self.shmem_mask != 1 << LEGACY_SHMEM_BIT
                ):
                    self._flag(Rule.SHMEM_AT_BIT_22, FRONTEND, f"acked {acked:#x}: bit 21 set")
                s.acked = acked
            case FrontendReq.SET_BACKEND_REQ_FD:
                if s.acked is None:
                    self._flag(
                        Rule.PROTOCOL_FEATURES_FIRST,
                        FRONTEND,
                        "SET_BACKEND_REQ_FD before any SET_PROTOCOL_FEATURES",
                    )
                carried = len(msg.fds) + len(msg.surplus_fds)
                if carried != 1:
                    self._flag(
                        Rule.BACKEND_CHANNEL_FD,
                        FRONTEND,
                        f"SET_BACKEND_REQ_FD with {carried} fds",
                    )
                s.backend_channel = True
            case FrontendReq.SET_FEATURES:
                s.features = msg.payload if isinstance(msg.payload, int) else 0
            case FrontendReq.RESET_DEVICE | FrontendReq.RESET_OWNER:
                self._reset()
            case FrontendReq.SET_STATUS if msg.payload == 0:
                self._reset()
        if owed_by(msg, self.reply_ack) is not Owed.NOTHING:  # by the new features
            self._pending[ChannelKind.MAIN].append(msg)

    def _asked_before_answering(self, msg: Message) -> None:
        shmem = (BackendReq.SHMEM_MAP, BackendReq.SHMEM_UNMAP)
        unanswered = [m for m in self._pending[ChannelKind.BACKEND] if m.request in shmem]
        if unanswered and ChannelKind.BACKEND not in self.blind:
            owed = ", ".join(
                f"{m.name} {_where(m.payload)}" if isinstance(m.payload, ShmemMap) else m.name
                for m in unanswered
            )
            detail = f"{msg.name} asks for an answer while the front-end owes one to {owed}"
            self._flag(Rule.REPLY_BEFORE_FOLLOW_UP, FRONTEND, detail)

    def _reset(self) -> None:
        self._refusals.clear()  # judged against mappings the reset dropped: judged anew
        self.state.resets += 1
        self._drop_all()

    def _drop_all(self) -> None:
        for shmid, held in self.state.mappings.items():
            self.state.dropped.update((shmid, m.shm_offset, m.len) for _, _, m in held)
        self.state.mappings.clear()

    # ------------------------------------------------------------ backend channel

    def _backend_request(self, msg: Message, file: FileFacts | None) -> None:
        owed = owed_by(msg, self.reply_ack) is not Owed.NOTHING
        if owed:
            self._pending[ChannelKind.BACKEND].append(msg)
            if file is not None and msg.request == BackendReq.SHMEM_MAP:
                self._files[id(msg)] = file
        if msg.request not in (BackendReq.SHMEM_MAP, BackendReq.SHMEM_UNMAP):
            return
        if not (self.shmem and self.reply_ack):
            self._flag(
                Rule.SHMEM_NEGOTIATED,
                BACKEND,
                f"{msg.name} with protocol features {self.state.acked or 0:#x}",
            )
        m = msg.payload
        if not isinstance(m, ShmemMap):
            return
        is_map = msg.request == BackendReq.SHMEM_MAP
        why = (_fd_count_problem(msg) if is_map else "") or self.must_refuse(m, is_map=is_map)
        if owed:
            self._refusals[id(msg)] = why
        if why:
            self._flag(Rule.MAP_VALID, BACKEND, f"{msg.name} {_where(m)}: {why}")
        if msg.request == BackendReq.SHMEM_UNMAP and (m.shmid, m.shm_offset, m.len) in (
            self.state.dropped
        ):
            self._flag(
                Rule.NO_UNMAP_AFTER_RESET,
                BACKEND,
                f"SHMEM_UNMAP {_where(m)}: a reset already dropped it",
            )
        if not msg.need_reply or not self.reply_ack:
            self._settle(msg, None, file, why)  # no answer will come: it takes effect if valid

    def must_refuse(self, m: ShmemMap, *, is_map: bool) -> str:
        """Why a front-end following the rules must refuse this request, from the layout
        and the mappings this observer saw made; "" when it need not."""
        config = self.state.config
        if config is None:
            return ""  # the layout was never seen: nothing to judge by
        held = self.state.mappings.get(m.shmid)

        def overlap(start: int, end: int) -> tuple[int, int] | None:
            hit = held.conflict(start, end) if held is not None else None
            return None if hit is None else (hit[0], hit[1] - hit[0])

        return must_refuse(self.state.sizes, overlap, m, is_map=is_map)

    # ------------------------------------------------------------ replies

    def _reply(self, msg: Message) -> None:
        queue = self._pending[msg.channel]
        by = BACKEND if msg.channel is ChannelKind.MAIN else FRONTEND
        if not queue:
            rule = (
                Rule.REPLY_OWED
                if msg.channel is ChannelKind.MAIN
                else (Rule.REPLY_ONLY_UNDER_REPLY_ACK)
            )
            self._flag(rule, by, f"a {msg.name} reply nobody is owed")
            return
        asked = queue.popleft()
        file = self._files.pop(id(asked), None)
        refusal = self._refusals.pop(id(asked), None)
        if msg.request != asked.request:
            self._flag(
                Rule.REPLY_MATCHES_REQUEST, by, f"{asked.name} answered by a {msg.name} reply"
            )
        elif msg.channel is ChannelKind.MAIN:
            self._main_reply(asked, msg)
        else:
            self._settle(asked, msg, file, refusal)

    def _main_reply(self, asked: Message, reply: Message) -> None:
        s = self.state
        if asked.request == FrontendReq.GET_FEATURES and isinstance(reply.payload, int):
            s.device_features = reply.payload
        elif asked.request == FrontendReq.GET_PROTOCOL_FEATURES and isinstance(
            reply.payload, int
        ):
            s.offered = reply.payload
            if reply.payload & self.shmem_mask and reply.payload & ProtocolFeature.GPA_ADDRESSES:
                self._flag(
                    Rule.SHMEM_AT_BIT_22,
                    BACKEND,
                    f"offered {reply.payload:#x}: bits 21 and 22 both set",
                )
        elif asked.request == FrontendReq.GET_SHMEM_CONFIG and isinstance(
            reply.payload, ShmemConfig
        ):
            self._layout(reply.payload)

    def _layout(self, config: ShmemConfig) -> None:
        regions = config.regions()
        odd = {shmid: size for shmid, size in regions.items() if size % PAGE_SIZE}
        if odd:
            self._flag(
                Rule.CONFIG_PAGE_MULTIPLES,
                BACKEND,
                ", ".join(f"region {i} is {z:#x} bytes" for i, z in odd.items()),
            )
        if config.nregions != len(regions):
            self._flag(
                Rule.CONFIG_NREGIONS,
                BACKEND,
                f"nregions {config.nregions}, {len(regions)} sizes non-zero",
            )
        before = self.state.config
        if before is not None and self.state.sizes != regions:
            self._flag(Rule.CONFIG_STABLE, BACKEND, f"was {self.state.sizes}, now {regions}")
        self.state.config = config
        self.state.sizes = regions

    def _settle(
        self,
        asked: Message,
        reply: Message | None,
        file: FileFacts | None,
        refusal: str | None = None,
    ) -> None:
        """A SHMEM request's outcome: a reply's value, or None when none was asked (the
        front-end handles it in order; whether the kernel let it map is not on the wire).
        `refusal`: why it must be refused, as judged when it was sent (None: judge now)."""
        m = asked.payload
        if not isinstance(m, ShmemMap) or asked.request not in (
            BackendReq.SHMEM_MAP,
            BackendReq.SHMEM_UNMAP,
        ):
            return
        is_map = asked.request == BackendReq.SHMEM_MAP
        value = reply.payload if reply is not None else None
        why = self.must_refuse(m, is_map=is_map) if refusal is None else refusal
        if why and value == 0:
            self._flag(
                Rule.REFUSES_INVALID,
                FRONTEND,
                f"{asked.name} {_where(m)} answered ok; it must be refused: {why}",
            )
            return
        if why or (value is not None and value != 0):
            return  # refused, rightly or for what only the front-end's kernel knows
        held = self.state.mappings.get(m.shmid)
        if held is None:  # not setdefault: that would build an index for every answer
            held = self.state.mappings[m.shmid] = IntervalIndex()
        end = m.shm_offset + m.len
        if is_map:
            # judged free when it was sent (or not judged: no layout seen); a map sent
            # since without asking for an answer may have been taken for done over the
            # same range: this one was answered, and a range holds one mapping
            if held.get(m.shm_offset) is not None:  # the same start (zero lengths too)
                held.pop(m.shm_offset)
            while (hit := held.conflict(m.shm_offset, end)) is not None:
                held.pop(hit[0])
            held.add(m.shm_offset, end, (
                Mapping.granted(m)
                if file is None
                else Mapping.granted(m, file=file.file, dev=file.dev, ino=file.ino)
            ))  # fmt: skip
            self.state.dropped.discard((m.shmid, m.shm_offset, m.len))
        elif held.get(m.shm_offset) is not None:  # not already gone by a later unmap
            held.pop(m.shm_offset)


def _fd_count_problem(msg: Message) -> str:
    """Why a SHMEM_MAP's fds alone make it one to refuse (step 2); "" when they do not."""
    try:
        check_fd_count(len(msg.fds) + len(msg.surplus_fds))
    except ShmemRefused as exc:
        return exc.detail
    return ""


def _where(m: ShmemMap) -> str:
    return f"shmid {m.shmid} [{m.shm_offset:#x}, {m.shm_offset + m.len:#x})"
