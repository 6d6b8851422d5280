"""The simulated device: memfd buffers, what it believes is mapped, and the script runner."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from shmemctl.backend import (
    AnswerLost,
    BackendChannel,
    BackendEndpoint,
    NotReady,
    NotSent,
    PeerProtocolError,
    SendGuard,
)
from shmemctl.bench_layout import CHURN, bench_span, churn_base
from shmemctl.channel import ChannelError, ChannelTimeout
from shmemctl.daemon import cpu_seconds, peer_credentials
from shmemctl.events import Event
from shmemctl.faults import Fault
from shmemctl.session import Outgoing
from shmemctl.shmem.libc import PAGE_SIZE
from shmemctl.shmem.mapping import Mapping
from shmemctl.shmem.rules import (
    U64_MAX,
    ShmemRefused,
    check_request,
    must_refuse,
    overlap_detail,
    overlap_in,
)
from shmemctl.sizes import hex_range, human_size, parse_size
from shmemctl.wire import BackendReq, ChannelKind, ShmemMap
from shmemctl.wire.messages import MMAP_FLAG_WRITE, describe_reply, errno_name

log = logging.getLogger("backend")


def page_tag(buffer_id: int, page: int) -> bytes:
    """The readable tag at the start of every page of a buffer."""
    return f"shmemctl buffer {buffer_id} page {page}\n".encode()


#: What `unmap(only_if_believed=True)` returns when a reset dropped the mapping first.
NOT_SENT = -1
#: What one buffer may cost unless --max-buffer says otherwise: every page of a new
#: buffer is written (its tag), so a buffer costs its whole size in shared memory.
DEFAULT_MAX_BUFFER = 1 << 30


class Buffer:
    """A memfd the device owns; every page starts with a tag naming buffer and page.
    A buffer can also be a real file (`path`). A buffer lives while a mapping the
    device believes in uses it, or while its owner (a scenario) holds it."""

    def __init__(
        self, buffer_id: int, size: int, *, tagged: bool = True, path: str | None = None
    ) -> None:
        self.id = buffer_id
        self.size = size
        self.path = path
        #: who keeps it alive besides its mappings: the owner of a file (a scenario), and
        #: each map request in flight with it; a memfd otherwise goes with its mappings
        self.pins = 1 if path is not None else 0
        if path is not None:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            return
        fd = os.memfd_create(f"shmemctl-buffer-{buffer_id}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            if tagged:
                for page in range(size // PAGE_SIZE):
                    os.pwrite(fd, page_tag(buffer_id, page), page * PAGE_SIZE)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class RequestRefused(ValueError):
    """The device will not send a request: it cannot be right, or costs too much."""


class _Sent(NamedTuple):
    """A map sent without NEED_REPLY: when, and on which backend channel."""

    generation: int
    channel: BackendChannel | None
    map: ShmemMap


@dataclass(slots=True)
class _Sending:
    """Filled in by the send: the generation a request went out in."""

    generation: int = -1


@dataclass(slots=True)
class _InFlight:
    """The request waiting for its answer (the backend channel carries one at a time):
    its generation, its own range if it is a map, and the maps sent without NEED_REPLY
    before it (with the generation each was sent in), which its answer confirms."""

    generation: int
    channel: BackendChannel | None
    replies_before: int
    own: ShmemMap | None
    earlier: list[_Sent]
    answered_before_reset: bool = False


class SimDevice:
    """Buffers and the device's mapping table; every SHMEM request goes through here.

    Resets race requests: the front-end's RESET_DEVICE arrives on the main channel
    while a SHMEM_MAP may wait for its answer on the backend channel, and the two
    channels are not ordered. Each reset starts a new `generation`; an answer that
    was already on its way when the reset was read belongs to the old one (the
    reset dropped what it confirmed). An answer that came later is ambiguous: the
    front-end may have mapped before or after its reset. The device settles that
    with an UNMAP of exactly those ranges (answered 0 if they were mapped after the
    reset, refused if the reset had dropped them): either way both sides end with
    nothing there, as a reset means.
    """

    def __init__(self, endpoint: BackendEndpoint, *, max_buffer: int = DEFAULT_MAX_BUFFER) -> None:
        self.endpoint = endpoint
        self.max_buffer = max_buffer
        self.lock = threading.Lock()
        #: one request at a time, and what its answer makes the device believe with it:
        #: held by map and unmap from before the send until the table says the outcome
        self._sending = threading.RLock()
        self.buffers: dict[int, Buffer] = {}
        #: what the device believes the front-end holds (`confirmed` False when the
        #: front-end's answer never came or made no sense: it may or may not exist)
        self.mapped: dict[tuple[int, int], Mapping] = {}
        #: how many believed mappings use each buffer: whether a buffer is still in use
        #: is asked after every map and unmap, and must not cost a pass over them all
        self._uses: Counter[int] = Counter()
        self.generation = 0
        self._in_flight: _InFlight | None = None
        #: maps sent without NEED_REPLY since the last answer, with their generation
        self._unconfirmed: list[_Sent] = []
        self._next_buffer = 1

    # ------------------------------------------------------------ buffers

    def new_buffer(
        self, size: int, *, tagged: bool = True, path: str | None = None, pinned: bool = False
    ) -> Buffer:
        with self.lock:
            buffer = Buffer(self._next_buffer, size, tagged=tagged, path=path)
            buffer.pins += pinned
            self._next_buffer += 1
            self.buffers[buffer.id] = buffer
            return buffer

    def free_unmapped_buffers(self) -> None:
        with self.lock:
            for buffer_id, buffer in list(self.buffers.items()):
                if not self._uses[buffer_id] and not buffer.pins:
                    self.buffers.pop(buffer_id).close()

    def release_buffer(self, buffer: Buffer) -> None:
        """The owner lets go: the buffer lives on only while mappings use it."""
        with self.lock:
            buffer.pins -= 1
        self.free_unmapped_buffers()

    def forget(self, why: str) -> None:
        """Reset or disconnect: the front-end dropped every mapping; no UNMAPs are sent."""
        with self.lock:
            dropped = list(self.mapped.values())
            self.mapped.clear()
            self._uses.clear()
            self.generation += 1
            flight = self._in_flight
            if flight is not None and not flight.answered_before_reset:
                channel = self.endpoint.backend_channel
                flight.answered_before_reset = channel is not None and (
                    channel.answered_since(flight.replies_before)
                )
        self.free_unmapped_buffers()
        if dropped:
            log.info("forgot %d mappings (%s)", len(dropped), why)
        if dropped and Fault.UNMAP_AFTER_RESET in self.endpoint.device.faults and (
            "disconnect" not in why
        ):
            # the fault: unmap what the reset already dropped (after the ack, from elsewhere)
            threading.Thread(target=self._unmap_all, args=(dropped,), daemon=True).start()

    def _unmap_all(self, dropped: list[Mapping]) -> None:
        # straight onto the channel: a device stopped by its rings is not ready to ask
        # for anything, and the fault asks all the same
        channel = self.endpoint.backend_channel
        if channel is None:
            return
        for b in dropped:
            with contextlib.suppress(ChannelError):
                channel.request(Outgoing(ChannelKind.BACKEND, BackendReq.SHMEM_UNMAP,
                                         ShmemMap(b.shmid, b.shm_offset, b.len)))  # fmt: skip

    def close(self) -> None:
        self.forget("shutting down")
        with self.lock:
            buffers, self.buffers = list(self.buffers.values()), {}
        for buffer in buffers:
            buffer.close()

    # ------------------------------------------------------------ requests

    def check_map(self, m: ShmemMap, buffer: Buffer | None = None) -> None:
        """Refuse, before anything is allocated, a map that cannot be right for this
        device's own layout (shmem/rules.py, the rules a front-end applies too), and a
        buffer that would cost more than `max_buffer`. Overlap is left to the front-end:
        the device only believes what is mapped there."""
        try:
            check_request(self.endpoint.device.regions, m, is_map=True)
        except ShmemRefused as exc:
            raise RequestRefused(
                f"the device will not send it: {exc.detail} (a front-end must refuse it: "
                f"{exc.errno_name})"
            ) from None
        if buffer is None and m.fd_offset + m.len > self.max_buffer:
            raise RequestRefused(
                f"a buffer of fd_offset + len = {m.fd_offset + m.len:#x} bytes is more than "
                f"--max-buffer ({human_size(self.max_buffer)}) allows; map less, or raise "
                "--max-buffer"
            )
        if buffer is not None and m.fd_offset + m.len > buffer.size:
            raise RequestRefused(
                f"buffer {buffer.id} has {buffer.size:#x} bytes; fd_offset + len needs "
                f"{m.fd_offset + m.len:#x}"
            )

    def map(
        self,
        m: ShmemMap,
        *,
        buffer: Buffer | None = None,
        need_reply: bool = True,
    ) -> int | None:
        """Ask the front-end to map (a new tagged buffer unless one is given). A refused
        map leaves nothing behind; an unknown outcome is kept as an unconfirmed mapping."""
        if buffer is None:
            buffer = self.new_buffer(m.fd_offset + m.len, pinned=True)
        else:
            with self.lock:
                if self.buffers.get(buffer.id) is not buffer:
                    raise RequestRefused(f"buffer {buffer.id} is gone: nothing maps it any more")
                buffer.pins += 1
        # Pinned while in flight: another thread's unmap or a reset frees unused buffers.
        # Once nothing else refers to it (refused, never sent, settled after a reset), the
        # release frees it; a believed mapping keeps it.
        try:
            # Another thread's request, answered but not yet believed, must not slip
            # between this one's checks and its belief (a scenario beside a batch).
            with self._sending:
                if not need_reply:
                    self._refuse_silent_overlap(m)
                sent = _Sending()
                try:
                    result, crossed_reset = self._request(
                        BackendReq.SHMEM_MAP, m, buffer.fd, need_reply, sending=sent
                    )
                except (ChannelTimeout, PeerProtocolError, AnswerLost):
                    # it may be mapped: keep it
                    self._believe(m, buffer, sent.generation, confirmed=False)
                    raise
                result = self._as_read(result)
                if result in (0, None) and not crossed_reset:
                    self._believe(m, buffer, sent.generation, confirmed=True)
        finally:
            self.release_buffer(buffer)
        self._report(Event.MAPPED, m, result, buffer.id)
        return result

    def _as_read(self, result: int | None) -> int | None:
        """A map's answer as the device takes it: 0 made it, any other value refused it,
        an errno or not (QEMU answers 1); but for the fault that reads 1 as success."""
        if result is not None and result > 0 and (
            Fault.POSITIVE_REPLY_IS_SUCCESS in self.endpoint.device.faults
        ):
            return 0  # the fault: only a negated errno would refuse
        return result

    def _refuse_silent_overlap(self, m: ShmemMap) -> None:
        """A map without NEED_REPLY where the device believes a mapping starts: a
        front-end refuses it, silently, and believing it would replace the belief in the
        mapping the front-end holds, which the device could then never unmap. Checked
        while no other request can change the table (`_sending` held); a batch's own
        overlap check ran before, when another thread's map could still be unanswered."""
        with self.lock:
            held = self.mapped.get((m.shmid, m.shm_offset))
        if held is not None:
            raise RequestRefused(
                f"{overlap_detail(held.shm_offset, held.len)} (in region {m.shmid}); a map "
                "sent without NEED_REPLY would be refused silently"
            )

    def unmap(
        self, m: ShmemMap, *, need_reply: bool = True, only_if_believed: bool = False
    ) -> int | None:
        """Ask the front-end to unmap. With `only_if_believed` (a device unmapping what
        it mapped), the check that the mapping is still believed and the send are one
        step for a reset: an UNMAP of what a reset already dropped is never sent, and
        NOT_SENT is returned instead."""
        guard = self._still_believed(m) if only_if_believed else None
        # Held until the table says the outcome: a map of the same range answered in
        # between would otherwise be forgotten by this unmap's pop.
        with self._sending:
            try:
                result, _ = self._request(BackendReq.SHMEM_UNMAP, m, None, need_reply, guard)
            except NotSent:
                return NOT_SENT
            except (ChannelTimeout, PeerProtocolError, AnswerLost):
                with self.lock:
                    held = self.mapped.get((m.shmid, m.shm_offset))
                    if held is not None and held.len == m.len:
                        self.mapped[(m.shmid, m.shm_offset)] = held._replace(confirmed=False)
                raise
            gone = None
            if result in (0, None):
                with self.lock:
                    gone = self.mapped.pop((m.shmid, m.shm_offset), None)
                    if gone is not None:
                        self._uses[gone.buffer] -= 1
        if gone is not None:
            self.free_unmapped_buffers()
        self._report(Event.UNMAPPED, m, result, 0)
        return result

    @contextlib.contextmanager
    def _still_believed(self, m: ShmemMap) -> Iterator[bool]:
        """Held around a send: forget() waits for the send, and the send for forget()."""
        with self.lock:
            held = self.mapped.get((m.shmid, m.shm_offset))
            yield held is not None and held.len == m.len

    def _request(
        self,
        req: BackendReq,
        m: ShmemMap,
        fd: int | None,
        need_reply: bool,
        guard: SendGuard | None = None,
        sending: _Sending | None = None,
    ) -> tuple[int | None, bool]:
        """Send one request; return the answer and whether it crossed a reset. One at a
        time: the record of the request in flight and its send must not interleave with
        another thread's (a scenario beside a control command). `sending`, when given,
        learns the generation the request was sent in."""
        with self._sending:
            return self._request_alone(req, m, fd, need_reply, guard, sending or _Sending())

    def _request_alone(
        self,
        req: BackendReq,
        m: ShmemMap,
        fd: int | None,
        need_reply: bool,
        guard: SendGuard | None,
        sending: _Sending,
    ) -> tuple[int | None, bool]:
        channel = self.endpoint.backend_channel
        is_map = req == BackendReq.SHMEM_MAP
        with self.lock:
            sending.generation = self.generation
            if not need_reply:
                if is_map:
                    self._unconfirmed.append(_Sent(self.generation, channel, m))
            else:
                replies = channel.replies if channel is not None else 0
                own = m if is_map else None
                self._in_flight = _InFlight(
                    self.generation, channel, replies, own, self._unconfirmed
                )
                self._unconfirmed = []
        try:
            result = self.endpoint.shmem_request(
                req, m, fd, need_reply=need_reply, guard=guard, channel=channel
            )
        except BaseException as exc:
            with self.lock:
                flight, self._in_flight = self._in_flight, None
                if flight is not None:  # never answered: what it would have confirmed waits
                    self._unconfirmed[:0] = flight.earlier
                if isinstance(exc, ChannelError):
                    # no answer will confirm the maps sent before it, perhaps never read
                    self._doubt(
                        sent.map
                        for sent in self._unconfirmed
                        if sent.generation == self.generation and sent.channel is channel
                    )
            raise
        return result, need_reply and self._settle(result)

    def _settle(self, result: int | None) -> bool:
        """An answer arrived. If a reset was read while it was on its way, the maps it
        confirms may have been made before the front-end's reset (and dropped) or after
        it (and live); unmap exactly those ranges so both sides end with nothing there.
        An answer that was already waiting when the reset was read needs nothing: all it
        confirms came before the reset, which dropped it. True if it crossed a reset."""
        with self.lock:
            flight, self._in_flight = self._in_flight, None
            if flight is None:
                return False
            current = self.generation
            crossed = flight.generation != current
            if flight.answered_before_reset:
                return crossed
            # only on the connection they were made on: a disconnect dropped the rest
            unsure = [
                sent.map
                for sent in flight.earlier
                if sent.generation != current and sent.channel is flight.channel
            ]
            if crossed and flight.own is not None and result == 0:
                unsure.append(flight.own)
        channel = flight.channel
        if channel is None:
            return crossed
        for m in unsure:
            log.info(
                "unmapping %s of region %d: its map crossed a reset, so either side may hold it",
                hex_range(m.shm_offset, m.len), m.shmid,
            )  # fmt: skip
            # A reset read since the answer dropped whatever the front-end holds there:
            # then the UNMAP is not sent. And if the connection is gone, so is all of it.
            with contextlib.suppress(ChannelError, NotSent):
                channel.request(Outgoing(ChannelKind.BACKEND, BackendReq.SHMEM_UNMAP,
                                         ShmemMap(m.shmid, m.shm_offset, m.len), need_reply=True),
                                guard=self._in_generation(current))  # fmt: skip
        return crossed

    @contextlib.contextmanager
    def _in_generation(self, generation: int) -> Iterator[bool]:
        """Held around a send: no reset is read while it is sent, and it is wanted only
        if none was read since `generation` began."""
        with self.lock:
            yield self.generation == generation

    def _doubt(self, maps: Iterable[ShmemMap]) -> None:
        """These maps' outcome is unknown: believed still, but as unconfirmed. (Held:
        self.lock.)"""
        for m in maps:
            key = (m.shmid, m.shm_offset)
            held = self.mapped.get(key)
            if held is not None and (held.len, held.fd_offset, held.writable) == (
                m.len, m.fd_offset, m.writable
            ):  # fmt: skip
                self.mapped[key] = held._replace(confirmed=False)

    def _believe(self, m: ShmemMap, buffer: Buffer, generation: int, *, confirmed: bool) -> None:
        """Believe a map sent in `generation`, unless a reset or a hang-up has been read
        since: that dropped it (or, for a map whose answer is still to come, leaves it to
        be settled with an UNMAP)."""
        with self.lock:
            if generation != self.generation:
                return
            replaced = self.mapped.get((m.shmid, m.shm_offset))
            if replaced is not None:
                self._uses[replaced.buffer] -= 1
            self.mapped[(m.shmid, m.shm_offset)] = Mapping.granted(
                m, created=time.time(), buffer=buffer.id, confirmed=confirmed
            )
            self._uses[buffer.id] += 1
        if replaced is not None:  # a front-end acked a map over one: the old one is gone
            self.free_unmapped_buffers()

    def _report(self, done: Event, m: ShmemMap, result: int | None, buffer: int) -> None:
        """Publish an outcome: `mapped` (the mapping now believed) or `unmapped` (the
        range), or `refused` with the device's own reading beside the answer."""
        events = self.endpoint.events
        if not events.active:
            return
        is_map = done == Event.MAPPED
        where: dict[str, object] = {"shmid": m.shmid, "shm_offset": m.shm_offset, "len": m.len}
        if result:
            # a refusal changed nothing, so the table still shows what was wrong
            refusal: dict[str, object] = {
                "request": "map" if is_map else "unmap", **where,
                "errno": describe_reply(result), "reply": result,
                "explanation": self.own_reading(m, is_map=is_map),
            }  # fmt: skip
            if is_map:
                refusal |= {"fd_offset": m.fd_offset, "writable": m.writable, "buffer": buffer}
            events.emit(Event.REFUSED, refusal)
            return
        data: dict[str, object] = (
            dict(Mapping.granted(m, buffer=buffer).to_json()) if is_map else where
        )
        data["acked"] = result is not None
        events.emit(done, data)

    def explain(self, m: ShmemMap, *, is_map: bool) -> str:
        """The device's own reading of a request: what a front-end following the rules
        would object to, from the device's layout and the mappings it believes exist.
        Empty when it sees nothing wrong."""
        with self.lock:
            held = [(b.shm_offset, b.len) for b in self.mapped.values() if b.shmid == m.shmid]
        return must_refuse(self.endpoint.device.regions, overlap_in(held), m, is_map=is_map)

    def own_reading(self, m: ShmemMap, *, is_map: bool) -> str:
        """`explain`, labelled as the device's reading (never the front-end's words)."""
        own = self.explain(m, is_map=is_map)
        if own:
            return f"the device's own reading: {own}"
        return "the device sees nothing wrong with the request; the front-end's log may say why"

    def refusal(self, m: ShmemMap, result: int, *, is_map: bool) -> str:
        """A refusal in words: what the front-end said (an errno, or a bare value that
        carries no reason: QEMU answers 1), and beside it the device's own reading."""
        name = errno_name(result)
        said = (
            f"{name} (reply value -{(1 << 64) - result})"
            if name
            else f"reply value {result}, no reason given"
        )
        return f"refused by the front-end: {said}; {self.own_reading(m, is_map=is_map)}"


# ---------------------------------------------------------------- scripts


class ScriptError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Step:
    line: int
    text: str
    verb: str
    args: dict


def _num(text: str, what: str, line: int) -> int:
    try:
        value = parse_size(text)
    except ValueError as exc:
        raise ScriptError(f"line {line}: {what}: {exc}") from None
    if value > U64_MAX:
        raise ScriptError(f"line {line}: {what} {text} does not fit the wire's 64 bits")
    return value


def parse_script(lines: Iterable[str]) -> list[Step]:
    """Check a whole script before anything runs, so a typo on line 20 costs nothing."""
    steps = []
    for n, raw in enumerate(lines, 1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        verb, *words = text.split()
        if verb in ("map", "unmap"):
            positional = [w for w in words if "=" not in w and w not in ("ro", "noreply")]
            if len(positional) != 3:
                got = " ".join(words) or "nothing"
                raise ScriptError(f"line {n}: {verb} needs SHMID SHM_OFFSET LEN, got {got}")
            shmid = _num(positional[0], "shmid", n)
            if not 0 <= shmid <= 255:
                raise ScriptError(f"line {n}: shmid {shmid} is outside 0-255")
            args: dict[str, object] = {
                "shmid": shmid,
                "shm_offset": _num(positional[1], "shm_offset", n),
                "length": _num(positional[2], "len", n),
                "fd_offset": 0,
                "ro": "ro" in words,
                "noreply": "noreply" in words,
            }
            for w in words:
                if "=" in w:
                    key, _, value = w.partition("=")
                    if key != "fd_offset" or verb != "map":
                        raise ScriptError(f"line {n}: unknown option {w!r} for {verb}")
                    args["fd_offset"] = _num(value, "fd_offset", n)
            if verb == "unmap" and args["ro"]:
                raise ScriptError(f"line {n}: 'ro' belongs to map, not unmap")
        elif verb == "sleep":
            if len(words) != 1 or not words[0].isdigit():
                raise ScriptError(f"line {n}: sleep needs milliseconds, e.g. 'sleep 100'")
            args = {"ms": int(words[0])}
        elif verb == "bench":
            if len(words) != 4 or words[0] not in ("ack", "batch16", "batch64"):
                raise ScriptError(
                    f"line {n}: bench needs MODE(ack|batch16|batch64) LEN EXISTING PAIRS"
                )
            args = {
                "mode": words[0],
                "length": _num(words[1], "len", n),
                "existing": _num(words[2], "existing", n),
                "pairs": _num(words[3], "pairs", n),
            }
        else:
            raise ScriptError(
                f"line {n}: unknown command {verb!r}; use map, unmap or sleep (and bench)"
            )
        steps.append(Step(n, text, verb, args))
    return steps


class ScriptRunner:
    """Runs a checked script against the front-end; one result line per step."""

    def __init__(self, device: SimDevice, out: Callable[[str], None]) -> None:
        self.device = device
        self.out = out
        self._bench_filled = 0
        self._bench_buffer: Buffer | None = None
        self._churn_base = CHURN

    def run(self, steps: list[Step]) -> None:
        most = max((s.args["existing"] for s in steps if s.verb == "bench"), default=0)
        self._churn_base = churn_base(most)
        for step in steps:
            try:
                result = getattr(self, f"_do_{step.verb}")(**step.args)
            except (NotReady, RequestRefused) as exc:
                result = f"not sent: {exc}"
            except ChannelError as exc:
                result = f"failed: {exc} (request reported failed; buffer kept)"
            self.out(f"{step.text}: {result}")

    def _do_map(
        self, shmid: int, shm_offset: int, length: int, fd_offset: int, ro: bool, noreply: bool
    ) -> str:
        m = ShmemMap(shmid, shm_offset, length, fd_offset, 0 if ro else MMAP_FLAG_WRITE)
        self.device.check_map(m)
        return describe_reply(self.device.map(m, need_reply=not noreply))

    def _do_unmap(
        self, shmid: int, shm_offset: int, length: int, fd_offset: int, ro: bool, noreply: bool
    ) -> str:
        m = ShmemMap(shmid, shm_offset, length)
        return describe_reply(self.device.unmap(m, need_reply=not noreply))

    def _do_sleep(self, ms: int) -> str:
        time.sleep(ms / 1000)
        return "ok"

    # ------------------------------------------------------------ bench

    # The bench maps and unmaps inside a window of region 0 (shmemctl.bench_layout.CHURN, at
    # `_churn_base`); the existing 4 KiB mappings alternate below and above it, so every
    # churn request lands in the middle of the front-end's index, its worst case.

    def _existing_offset(self, i: int) -> tuple[int, int]:
        """(shm_offset, fd_offset) of the i-th existing mapping: contiguous runs of one
        buffer, so the kernel can merge them and the VMA count stays small."""
        page = i // 2
        base = self._churn_base
        if i % 2 == 0:
            return page * PAGE_SIZE, page * PAGE_SIZE
        return base + CHURN + page * PAGE_SIZE, base + page * PAGE_SIZE

    def _fill(self, existing: int) -> None:
        """Grow the existing 4 KiB mappings of region 0 to `existing`, 64 per ack."""
        if existing < self._bench_filled:
            raise ScriptError("bench lines must not lower EXISTING")
        needed = bench_span(self._churn_base, existing)
        size = self.device.endpoint.device.regions.get(0, 0)
        if needed > size:
            raise ScriptError(
                f"bench EXISTING {existing} needs region 0 of {needed:#x} bytes at least "
                f"(it is {size:#x}): start backend_sim with a larger --regions 0=SIZE"
            )
        if self._bench_buffer is None:
            self._bench_buffer = self.device.new_buffer(
                2 * self._churn_base, tagged=False, pinned=True
            )
        buf = self._bench_buffer
        for i in range(self._bench_filled, existing):
            last = i == existing - 1 or (i + 1) % 64 == 0
            shm_offset, fd_offset = self._existing_offset(i)
            m = ShmemMap(0, shm_offset, PAGE_SIZE, fd_offset)
            r = self.device.map(m, buffer=buf, need_reply=last)
            if r not in (0, None):
                raise ChannelError(f"filling existing mappings failed at {i}: {describe_reply(r)}")
        self._bench_filled = existing

    def _do_bench(self, mode: str, length: int, existing: int, pairs: int) -> str:
        self._fill(existing)
        base = self._churn_base
        batch = 1 if mode == "ack" else int(mode.removeprefix("batch"))
        buf = self.device.new_buffer(length, tagged=False, pinned=True)
        maps = [ShmemMap(0, base + k * length, length, 0) for k in range(batch)]
        samples: list[float] = []
        groups = max(1, pairs // batch)
        clock = time.perf_counter_ns
        peer = self._bench_peer()
        # Untimed warm-up first: caches, branch predictors and the kernel's
        # slab and VMA caches, so the first cell of a run is not penalised.
        for warmup in (True, False):
            if not warmup:
                samples.clear()
                start = clock()
                cpu, peer_cpu = time.process_time(), cpu_seconds(peer)
            self._bench_groups(
                maps, buf.fd, batch, max(1, groups // 10) if warmup else groups, samples
            )
        elapsed = (clock() - start) / 1e9
        cpu = time.process_time() - cpu
        peer_cpu = cpu_seconds(peer) - peer_cpu
        buf.close()
        self.device.buffers.pop(buf.id, None)
        samples.sort()
        result = {
            "mode": mode,
            "len": length,
            "existing": existing,
            "pairs": groups * batch,
            "pairs_per_s": round(groups * batch / elapsed, 1),
            "p50_us": round(samples[len(samples) // 2] / 1000, 2),
            "p99_us": round(samples[min(len(samples) - 1, int(len(samples) * 0.99))] / 1000, 2),
            # CPU per pair while timed: this process's, and the peer's on the backend
            # channel (the front-end, or a tap between); none when the peer is unknown
            "cpu_us": round(cpu / (groups * batch) * 1e6, 1),
            "peer_cpu_us": None if peer is None else round(peer_cpu / (groups * batch) * 1e6, 1),
        }
        log.debug("bench %s at %s: %s", mode, hex_range(base, length), result)
        return json.dumps(result)

    def _bench_peer(self) -> int | None:
        """The pid on the other end of the backend channel (SO_PEERCRED), if it can be
        read."""
        channel = self.device.endpoint.backend_channel
        if channel is None:
            return None
        try:
            pid, _, _ = peer_credentials(channel.channel.sock)
        except OSError:
            return None
        return pid if pid > 0 else None

    def _bench_groups(
        self, maps: list[ShmemMap], fd: int, batch: int, groups: int, samples: list[float]
    ) -> None:
        """`groups` times: map every range of `maps`, then unmap them, one ack per batch."""
        request = self.device.endpoint.shmem_request
        clock = time.perf_counter_ns
        last = batch - 1
        for _ in range(groups):
            t0 = clock()
            for k, m in enumerate(maps):
                r = request(BackendReq.SHMEM_MAP, m, fd, need_reply=k == last)
            if r:
                raise ChannelError(f"bench map refused: {describe_reply(r)}")
            for k, m in enumerate(maps):
                r = request(BackendReq.SHMEM_UNMAP, m, need_reply=k == last)
            if r:
                raise ChannelError(f"bench unmap refused: {describe_reply(r)}")
            samples.append((clock() - t0) / batch)
