"""Checks for a back-end under test (virtiofsd, a vhost-device daemon, backend_sim):
shmemctl plays the front-end, handshakes, asks for the layout, answers whatever
SHMEM requests come with real mappings, resets, and comes back without SHMEM.

Under a profile (`--profile qemu`, ...), it plays that front-end: it answers as it
does, announces mappings, starts the device and resets it as it does, and adds the
checks that front-end's behaviour calls for (docs/protocol.md §8).

Every wait ends on an event. Each main-channel request is followed by a barrier, a getter
the back-end must answer: replies come in order, so the replies before the barrier's are
all the request drew. SHMEM requests are answered whenever the suite waits, as a
front-end's would be. Time ends a wait only as a last resort (`timeout` for an answer),
or where absence is the finding: `wait` seconds for a back-end to map at all, to see
no UNMAP after a reset, and no SHMEM request on a connection without SHMEM."""

from __future__ import annotations

import contextlib
import errno
import math
import select
import socket
import time
from collections.abc import Callable, Iterator

from ..channel import Channel, ChannelError, close_fds
from ..daemon import open_peer
from ..session import FrontendSession, GuestMemory
from ..session.common import Outgoing
from ..session.frontend import Fed, Step, drive
from ..session.profiles import STRICT, Profile, Reset
from ..session.profiles import Step as SetUp
from ..shmem import RegionTable, ShmemRefused, ShmemSetupError
from ..shmem.libc import PAGE_SIZE
from ..shmem.region import GuestRam
from ..sizes import hex_range
from ..wire import BackendReq, ChannelKind, FrontendReq, Message, ShmemConfig, ShmemMap, WireError
from ..wire.constants import (
    SHMEM_BIT,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    ProtocolFeature,
)
from ..wire.messages import VringState, encode, encode_u64_reply, summarize
from .peer import Peer, PeerGone, Stopped, hung_up
from .report import CONNECTS, STAYS_CONNECTED, Collected, Report, one_u64_reply

PF = ProtocolFeature
SHMEM = 1 << 22
BIT21 = int(PF.GPA_ADDRESSES)
#: What this front-end acks when offered (SHMEM aside).
OURS = PF.MQ | PF.REPLY_ACK | PF.BACKEND_REQ | PF.BACKEND_SEND_FD | PF.RESET_DEVICE | PF.STATUS
MAP, UNMAP = BackendReq.SHMEM_MAP, BackendReq.SHMEM_UNMAP

CHECKS = {
    CONNECTS: "§1: a back-end on the socket",
    "get-features": "§2 replies carry flags 0x5; §4 bit 30",
    "get-protocol-features": "§2, §4",
    "never-offers-bit-21": "§6.1: SHMEM is bit 22; bit 21 is GPA_ADDRESSES",
    "shmem-at-bit-22": "§6.1",
    "offers-what-shmem-needs":
        "§6.2, §6.4: REPLY_ACK, BACKEND_REQ and BACKEND_SEND_FD beside SHMEM",
    "acks-when-asked": "§3: under REPLY_ACK + NEED_REPLY, one u64 ack",
    "need-reply-on-a-getter": "§3: NEED_REPLY on a request with its own reply changes nothing",
    "no-reply-unless-asked": "§3: no ack without NEED_REPLY",
    "shmem-config-layout": "§2, §5: exactly 2056 bytes, nregions <= 256",
    "shmem-config-page-multiples": "§5: sizes are multiples of the page size",
    "shmem-config-nregions": "§6.3: nregions = the number of non-zero sizes",
    "shmem-config-stable": "§5: the answer never changes for the connection",
    "backend-channel-acked": "§4 step 4",
    "shmem-requests-well-formed": "§2, §5: flags, payload, exactly one fd per MAP",
    "shmem-requests-valid": "§5: a back-end asks only for what a front-end may grant",
    "no-unmap-after-reset":
        "§5: after a reset the back-end forgets its mappings and sends no UNMAP for them",
    "no-shmem-without-negotiation":
        "§6.2: no SHMEM request unless SHMEM (and REPLY_ACK) were negotiated",
    STAYS_CONNECTED: "§1: both channels stay open while the suite runs",
}  # fmt: skip
#: The checks a profile adds, by what in its behaviour calls for them.
SERVES_MAIN = "serves-main-while-mapping"
ANY_NONZERO_REFUSES = "nonzero-reply-refuses"
FRESH_CHANNEL = "fresh-backend-channel"
PROFILE_CHECKS = {
    SERVES_MAIN: "§8 (QEMU): the main channel is answered while a map waits for its ack; "
    "QEMU announces each mapping there and reads the backend channel only once answered",
    ANY_NONZERO_REFUSES: "§8 (QEMU): any non-zero reply refuses a map (QEMU answers 1, "
    "never an errno)",
    FRESH_CHANNEL: "§8 (Cloud Hypervisor): after an activation, SHMEM requests come on "
    "the fresh backend channel",
}


def checks_for(profile: Profile) -> dict[str, str]:
    """The checks of a run under `profile`: every one of CHECKS, and what it adds."""
    added = [
        *([SERVES_MAIN] if profile.announces_mappings else []),
        *([ANY_NONZERO_REFUSES] if profile.refusal_value is not None else []),
        *([FRESH_CHANNEL] if profile.fresh_channel else []),
    ]
    plan = dict(CHECKS)
    last = plan.pop(STAYS_CONNECTED)
    return {**plan, **{c: PROFILE_CHECKS[c] for c in added}, STAYS_CONNECTED: last}


LAYOUT_CHECKS = ["shmem-config-page-multiples", "shmem-config-nregions", "shmem-config-stable"]
SERVED_CHECKS = ["shmem-requests-well-formed", "shmem-requests-valid", "no-unmap-after-reset"]
#: Checks about SHMEM: n/a against a back-end that does not offer it.
SHMEM_CHECKS = ["shmem-at-bit-22", "offers-what-shmem-needs", "shmem-config-layout",
                *LAYOUT_CHECKS, *SERVED_CHECKS, "no-shmem-without-negotiation"]  # fmt: skip


def check_backend(path: str, *, listen: bool = False, wait: float = 3.0, timeout: float = 30.0,
                  require_shmem: bool = False, profile: Profile = STRICT) -> Report:  # fmt: skip
    role = "back-end" if profile is STRICT else f"back-end, under {profile.name}'s behaviour"
    report = Report(path, role, checks_for(profile))
    peer = Peer()
    try:
        s = _Session(report, path, listen, timeout, peer, profile)
    except OSError as exc:
        report.add(CONNECTS, False, "a back-end on the socket", str(exc))
        return report.finish(None)
    report.add(CONNECTS, True, "a back-end on the socket", "connected")
    again = False
    with _stopping(report):
        try:
            again = _first_session(report, s, wait, require_shmem)
        finally:
            s.close()
    if again:
        with _stopping(report):
            _no_shmem_session(report, path, listen, wait, timeout, peer, profile)
    return report.finish(peer.gone)


@contextlib.contextmanager
def _stopping(report: Report) -> Iterator[None]:
    """A peer that went away is the report's end to tell; any other stop, the checks left."""
    try:
        yield
    except PeerGone:
        pass
    except Stopped as exc:
        report.give_up(f"could not run: {exc}")


class _Session:
    """One connection to the back-end: main-channel requests, each with the replies it
    drew; SHMEM requests on the backend channel are answered (with real mappings, once
    there is a layout) whenever the suite waits for anything."""

    def __init__(self, report: Report, path: str, listen: bool, timeout: float,
                 peer: Peer, profile: Profile = STRICT) -> None:  # fmt: skip
        sock = open_peer(path, listen=listen, timeout=timeout)
        self.report = report
        #: whose behaviour the suite has, and the session that says what it does
        self.profile = profile
        self.session = FrontendSession(shmem_bit=SHMEM_BIT, profile=profile)
        self.guest_ram: GuestRam | None = None
        #: main-channel exchanges under way, and the maps answered meanwhile whose
        #: announcement waits for them to end (one request at a time on the main channel)
        self._exchanging = 0
        self._deferred: list[Message] = []
        self.main = Channel(sock, ChannelKind.MAIN, replies=True)
        self.main.set_recv_timeout(timeout)  # a peer that stops mid-message cannot hang the suite
        self.main.set_send_timeout(timeout)
        self.timeout = timeout
        self.peer = peer
        self.backend: Channel | None = None
        self.table: RegionTable | None = None
        self.poller = select.poll()  # both channels
        self.poller.register(sock, select.POLLIN)
        self.main_only = select.poll()
        self.main_only.register(sock, select.POLLIN)
        self.acks = False  # the back-end acks exactly once when asked (acks-when-asked)
        self.requests = 0  # SHMEM requests that arrived
        self.shape: list[object] = []  # what was malformed about them
        self.refused: list[object] = []  # what the suite, as a front-end, refused
        #: sees every SHMEM request; an errno it returns refuses the request
        self.watch: Callable[[Message], int | None] | None = None
        self.broken = ""  # why the main channel cannot carry another request

    # ------------------------------------------------------------ main channel

    def exchange(self, req: FrontendReq, payload: object = None, fds: tuple[int, ...] = (),
                 *, need: bool = False, barrier: bool = True, serve: bool = True,
                 within: float | None = None) -> Collected:  # fmt: skip
        """Send `req`, then (unless `barrier` is False) a getter of another id. What `req`
        drew: the replies before the getter's, or without a barrier the first reply.
        SHMEM requests are answered meanwhile, unless `serve` is False. Unanswered after
        `within` seconds (by default the timeout), the channel counts as stuck."""
        self.peer.waiting = req.name
        self._exchanging += 1
        try:
            self._send(encode(ChannelKind.MAIN, req, payload, need_reply=need), fds)  # type: ignore[arg-type]
            stop = None
            if barrier:
                stop = FrontendReq.GET_PROTOCOL_FEATURES if req == FrontendReq.GET_FEATURES else (
                    FrontendReq.GET_FEATURES)  # fmt: skip
                self._send(encode(ChannelKind.MAIN, stop))
            return self._replies(req, stop, serve, self.timeout if within is None else within)
        finally:
            self.peer.waiting = ""
            self._exchanging -= 1
            if not self._exchanging:
                self._announce_deferred()

    def _replies(self, req: FrontendReq, stop: FrontendReq | None, serve: bool,
                 within: float) -> Collected:  # fmt: skip
        messages: list[Message] = []
        error = None
        deadline = time.monotonic() + within
        while self._wait_main(deadline, serve):
            try:
                msg = self._recv_main()
            except WireError as exc:
                error = error or f"WireError: {exc}"
                if stop is None:
                    break
                continue  # the channel stays aligned: read on to the barrier's reply
            if stop is None:
                messages.append(msg)
                break
            if msg.request == stop:
                break
            messages.append(msg)
        else:
            self.broken = f"the back-end stopped answering ({req.name} went unanswered)"
            return Collected(messages, f"no reply within {within:g}s", unanswered=True)
        return Collected(messages, error)

    def tell(self, req: FrontendReq, payload: object = None, fds: tuple[int, ...] = (),
             *, need: bool = False, barrier: bool = True,
             serve: bool = True) -> Collected:  # fmt: skip
        """A request no check judges; the suite stops if it went unanswered."""
        got = self.exchange(req, payload, fds, need=need, barrier=barrier, serve=serve)
        self.go_on()
        return got

    def act(self, step: Step) -> Fed:
        """Carry out one step of the profile's session (starting the device, say)."""
        if isinstance(step, Outgoing):
            got = self.tell(FrontendReq(step.request), step.payload, step.fds,
                            need=step.need_reply)  # fmt: skip
            return got.messages[0] if got.messages else None
        if isinstance(step, GuestMemory):
            if self.guest_ram is None:
                self.guest_ram = GuestRam(step.size)
            return self.guest_ram.fd, self.guest_ram.base
        return None

    def go_on(self) -> None:
        """Stop the suite if the main channel cannot carry another request."""
        if self.broken:
            raise Stopped(self.broken)

    def judge(self, check: str, ok: bool, expected: str, got: Collected) -> bool:
        """The verdict; then, if the main channel broke on the way, the checks left stop."""
        self.report.add(check, ok, expected, got.describe())
        self.go_on()
        return ok

    def _send(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        try:
            self.main.send(data, fds)
        except ChannelError as exc:
            if hung_up(self.main.sock):
                raise self.peer.hang_up() from exc
            raise Stopped(f"the main channel broke ({exc})") from exc

    def _recv_main(self) -> Message:
        try:
            msg = self.main.recv()
        except WireError:
            raise
        except ChannelError as exc:
            if hung_up(self.main.sock):
                raise self.peer.hang_up() from exc
            raise Stopped(f"the main channel broke ({exc})") from exc
        close_fds(msg.fds)
        self.peer.did(f"after it answered {msg.name}")
        return msg

    def _poll(self, deadline: float, backend: bool = True) -> int | None:
        """The next fd with something to read (the main channel first, the backend channel
        only if `backend`), None at the deadline."""
        poller = self.poller if backend else self.main_only
        while (left := deadline - time.monotonic()) > 0:
            ready = dict(poller.poll(math.ceil(left * 1000)))
            if self.main.fileno() in ready:
                return self.main.fileno()
            if ready:
                return next(iter(ready))
        return None

    def _wait_main(self, deadline: float, serve: bool = True) -> bool:
        """Until the main channel has something to read (False at the deadline),
        answering SHMEM requests meanwhile if `serve`."""
        while (fd := self._poll(deadline, serve)) is not None:
            if fd == self.main.fileno():
                return True
            self._serve_one()
        return False

    # ------------------------------------------------------------ backend channel

    def open_backend_channel(self, need: bool) -> Collected:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.backend = Channel(ours, ChannelKind.BACKEND, replies=False)
        self.backend.set_recv_timeout(self.timeout)
        self.backend.set_send_timeout(self.timeout)
        self.poller.register(ours, select.POLLIN)
        try:
            return self.exchange(FrontendReq.SET_BACKEND_REQ_FD, None, (theirs.fileno(),),
                                 need=need)  # fmt: skip
        finally:
            theirs.close()

    def serve_until(self, done: Callable[[], bool], deadline: float) -> None:
        """Answer SHMEM requests until done() or the deadline."""
        while not done() and (fd := self._poll(deadline)) is not None:
            if fd == self.main.fileno():
                self._stray()
            else:
                self._serve_one()

    def hold_next(self, deadline: float) -> Message | None:
        """Answer SHMEM requests until one asks for a reply: that one comes back unanswered
        (None if none came by the deadline). Its fds are the caller's to `serve`."""
        while (fd := self._poll(deadline)) is not None:
            if fd == self.main.fileno():
                self._stray()
            elif (msg := self._take()) is not None:
                if msg.need_reply:
                    return msg
                self.serve(msg)
        return None

    def drain(self) -> None:
        """Answer every SHMEM request that has already arrived."""
        for msg in self.take_arrived():
            self.serve(msg)

    def take_arrived(self) -> list[Message]:
        """Every request already on the backend channel, not answered yet."""
        taken: list[Message] = []
        while self.backend is not None and self.backend.wait_readable(0):
            if (msg := self._take()) is not None:
                taken.append(msg)
        return taken

    def _stray(self) -> None:
        """The main channel is readable with nothing owed: its end, or a stray reply."""
        with contextlib.suppress(WireError):
            self._recv_main()

    def _serve_one(self) -> None:
        if (msg := self._take()) is not None:
            self.serve(msg)

    def _take(self) -> Message | None:
        """The next request on the backend channel; None if it could not be decoded (noted
        as malformed), or broke the channel."""
        assert self.backend is not None
        try:
            msg = self.backend.recv()
        except WireError as exc:
            self.requests += 1
            self.shape.append(f"WireError: {exc}")
            return None
        except ChannelError as exc:
            if hung_up(self.backend.sock):
                raise self.peer.hang_up() from exc
            self.shape.append(f"{type(exc).__name__}: {exc}")
            self._drop_backend()  # broke mid-message: it carries nothing more
            return None
        self.peer.did(f"after it sent {msg.name}")
        return msg

    def serve(self, msg: Message) -> None:
        """Answer a request as a front-end would (its fds closed after; a profile that
        announces the mapping sends them with that first)."""
        announces = self.profile.announces_mappings
        keep = False  # its fd, for an announcement that must wait
        fds = msg.fds  # closed exactly once, whichever way this ends
        try:
            result = self._answer(msg)
            if not announces:
                close_fds(fds)
                fds = ()
            if msg.need_reply and self.backend is not None:
                try:
                    self.backend.send(encode_u64_reply(msg.request, result))
                except ChannelError as exc:
                    if hung_up(self.backend.sock):
                        raise self.peer.hang_up() from exc
                    self._drop_backend()
            if announces and result == 0:
                if self._exchanging:  # the main channel waits for another answer
                    self._deferred.append(msg)
                    keep = True
                else:
                    self._announce(msg)
        finally:
            if not keep:
                close_fds(fds)

    def _announce_deferred(self) -> None:
        while self._deferred:
            msg = self._deferred.pop(0)
            try:
                self._announce(msg)
            finally:
                close_fds(msg.fds)

    def _announce(self, msg: Message) -> None:
        """The profile's word to the back-end on a mapping made or gone (QEMU's
        ADD_MEM_REG or REM_MEM_REG), with nothing read from the backend channel until
        it is answered. Unanswered, it is the deadlock QEMU would be in."""
        m, table = msg.payload, self.table
        if table is None or not isinstance(m, ShmemMap) or m.shmid not in table.regions:
            return
        out = self.session.announcement(msg, table.address_of(m.shmid, m.shm_offset))
        if out is None:
            return
        got = self.exchange(FrontendReq(out.request), out.payload, out.fds,
                            need=out.need_reply, serve=False)  # fmt: skip
        if got.unanswered and SERVES_MAIN not in self.report.verdicts:
            where = f"{hex_range(m.shm_offset, m.len)} of region {m.shmid}"
            self.report.add(SERVES_MAIN, False, f"{out.name} for {where} answered", got.describe(),
                            note=_DEADLOCK)  # fmt: skip

    def _answer(self, msg: Message) -> int:
        """As a front-end would: map, unmap or refuse; what the back-end asked, recorded."""
        reply = self.profile.reply
        if msg.request not in (MAP, UNMAP):
            return reply(errno.EOPNOTSUPP)  # not SHMEM: not this suite's to judge
        self.requests += 1
        fds = len(msg.fds) + len(msg.surplus_fds)
        mmap = msg.payload if isinstance(msg.payload, ShmemMap) else None
        malformed = msg.flags not in (0x1, 0x9) or mmap is None or (
            msg.request == MAP and fds != 1)  # fmt: skip
        if malformed:
            self.shape.append({**summarize(msg), "fds": fds})
        refusal = self.watch(msg) if self.watch is not None else None
        if malformed or mmap is None:  # (a wrong payload is malformed: said again for mypy)
            return reply(errno.EINVAL)
        if refusal is not None:
            return reply(refusal)
        if self.table is None:
            return reply(errno.EOPNOTSUPP)
        try:
            if msg.request == MAP:
                self.table.map(mmap, msg.fds[0])
            else:
                self.table.unmap(mmap)
        except ShmemRefused as exc:
            self.refused.append({**summarize(msg), "refused": f"{exc.detail} ({exc.errno_name})"})
            return reply(exc.errno, exc.reason)
        return 0

    def _drop_backend(self) -> None:
        if self.backend is not None:
            self.poller.unregister(self.backend.sock)
            self.backend.close()
            self.backend = None

    def close(self) -> None:
        """Note a hang-up nobody saw yet (the last thing to ask a peer before leaving)."""
        if self.peer.gone is None and (hung_up(self.main.sock) or (
                self.backend is not None and hung_up(self.backend.sock))):  # fmt: skip
            self.peer.hang_up()
        self.main.close()
        self._drop_backend()
        for msg in self._deferred:
            close_fds(msg.fds)
        if self.table is not None:
            self.table.close()
        if self.guest_ram is not None:
            self.guest_ram.close()


def _u64(got: Collected) -> int | None:
    if got.error or len(got.messages) != 1 or not isinstance(got.messages[0].payload, int):
        return None
    return got.messages[0].payload


def _first_session(report: Report, s: _Session, wait: float, require_shmem: bool) -> bool:
    """Everything but the connection without SHMEM; whether that one should follow."""
    got = s.exchange(FrontendReq.GET_FEATURES, barrier=False)
    features = _u64(got)
    ok = features is not None and got.messages[0].flags == 0x5 and bool(
        features & VHOST_USER_F_PROTOCOL_FEATURES)  # fmt: skip
    if not s.judge("get-features", ok, "one reply, flags 0x5, with bit 30", got):
        raise Stopped("GET_FEATURES drew no reply offering protocol features (bit 30)")
    got = s.exchange(FrontendReq.GET_PROTOCOL_FEATURES)
    offered = _u64(got)
    s.judge("get-protocol-features", offered is not None and got.messages[0].flags == 0x5,
            "one reply, flags 0x5", got)  # fmt: skip
    if offered is None:
        raise Stopped("GET_PROTOCOL_FEATURES drew no usable reply")
    report.add("never-offers-bit-21", not offered & BIT21, "bit 21 not offered", f"{offered:#x}")
    shmem = bool(offered & SHMEM)
    if shmem:
        report.add("shmem-at-bit-22", True, "SHMEM offered at bit 22", f"{offered:#x}")
        needed = PF.REPLY_ACK | PF.BACKEND_REQ | PF.BACKEND_SEND_FD
        report.add("offers-what-shmem-needs", offered & needed == needed,
                   f"bits {int(needed):#x} set", f"{offered:#x}")  # fmt: skip
    else:
        if require_shmem:
            report.add("shmem-at-bit-22", False, "SHMEM offered at bit 22", f"{offered:#x}")
        report.na([c for c in SHMEM_CHECKS if c not in report.verdicts], "the back-end does not "
                  "offer SHMEM at bit 22: it does not implement the extension")  # fmt: skip
    acked = offered & (OURS | SHMEM | _more(s.profile))
    reply_ack = bool(acked & PF.REPLY_ACK)
    neg = s.session.negotiated  # what the profile's session goes by
    neg.protocol_features, neg.reply_ack, neg.shmem = acked, reply_ack, shmem
    got = s.exchange(FrontendReq.SET_PROTOCOL_FEATURES, acked, need=reply_ack)
    if reply_ack:
        ok, wrong = one_u64_reply(got, FrontendReq.SET_PROTOCOL_FEATURES)
        s.acks = s.judge("acks-when-asked", ok and _u64(got) == 0, "exactly one ack, flags "
                         "0x5, value 0" + (f" (got {wrong})" if wrong else ""), got)  # fmt: skip
        got = s.exchange(FrontendReq.GET_FEATURES, need=True)
        s.judge("need-reply-on-a-getter", _u64(got) == features,
                "exactly one reply, the features", got)  # fmt: skip
    else:
        report.na(["acks-when-asked", "need-reply-on-a-getter"],
                  "the back-end does not offer REPLY_ACK")  # fmt: skip
    got = s.exchange(FrontendReq.SET_OWNER)
    s.judge("no-reply-unless-asked", not got.messages and not got.error, "nothing", got)
    if shmem:
        _layout_checks(report, s)
    if acked & PF.BACKEND_REQ:
        got = s.open_backend_channel(reply_ack)
        if reply_ack:
            s.judge("backend-channel-acked", _u64(got) == 0, "one ack, value 0", got)
        else:
            s.go_on()
            report.na("backend-channel-acked", "REPLY_ACK is not offered: no ack is owed")
    else:
        report.na("backend-channel-acked", "the back-end does not offer BACKEND_REQ")
        no_channel = "the back-end does not offer BACKEND_REQ: it has no channel to ask on"
        report.na([c for c in SHMEM_CHECKS if c not in report.verdicts], no_channel)
    s.tell(FrontendReq.SET_FEATURES, VHOST_USER_F_PROTOCOL_FEATURES | VIRTIO_F_VERSION_1,
           need=reply_ack)  # fmt: skip
    if SetUp.START in s.profile.order:  # as the booted guest of that front-end would
        drive(s.session.start_device(), s.act)
    if shmem and s.table is not None and s.backend is not None:
        _served_checks(report, s, acked, wait)
    else:
        _profile_checks_na(report, "the back-end asks for no mapping on this connection")
    return shmem and bool(acked & PF.BACKEND_REQ)


def _profile_checks_na(report: Report, why: str) -> None:
    """The checks the profile added that have no verdict yet are not applicable."""
    report.na([c for c in PROFILE_CHECKS if c in report.plan and c not in report.verdicts], why)


def _more(profile: Profile) -> int:
    """What a profile acks beyond OURS: memory slots, to announce mappings in."""
    return int(PF.CONFIGURE_MEM_SLOTS) if profile.announces_mappings else 0


#: Why a back-end that stops answering its main channel while a map waits fails.
_DEADLOCK = (
    "the back-end stopped serving its main channel while its SHMEM_MAP waited for an "
    "answer. QEMU answers a map, then announces it with ADD_MEM_REG on the main channel "
    "and reads nothing more from the backend channel until that is answered: a back-end "
    "that sends its next map and waits for that ack without reading the main channel "
    "deadlocks with it. Serve the main channel from its own thread, or keep reading it "
    "while a reply is awaited."
)


def _layout_checks(report: Report, s: _Session) -> None:
    first = s.exchange(FrontendReq.GET_SHMEM_CONFIG)
    config = first.messages[0].payload if len(first.messages) == 1 and not first.error else None
    ok = isinstance(config, ShmemConfig) and first.messages[0].flags == 0x5
    s.judge("shmem-config-layout", ok, "one VhostUserShMemConfig reply, flags 0x5", first)
    if not isinstance(config, ShmemConfig):
        report.not_run([*LAYOUT_CHECKS, *SERVED_CHECKS],
                       "could not run: GET_SHMEM_CONFIG drew no layout")  # fmt: skip
        return
    sizes = config.regions()
    report.add("shmem-config-page-multiples", all(v % PAGE_SIZE == 0 for v in sizes.values()),
               f"multiples of {PAGE_SIZE:#x}", {str(k): v for k, v in sizes.items()})  # fmt: skip
    report.add("shmem-config-nregions", config.nregions == len(sizes), str(len(sizes)),
               config.nregions)  # fmt: skip
    second = s.exchange(FrontendReq.GET_SHMEM_CONFIG)
    again = second.messages[0].payload if len(second.messages) == 1 else None
    s.judge("shmem-config-stable", again == config, "the same answer twice", second)
    s.session.negotiated.config = config
    try:
        s.table = RegionTable(sizes)
    except ShmemSetupError as exc:
        report.not_run(SERVED_CHECKS, f"could not run: the suite cannot reserve it ({exc})")


def _served_checks(report: Report, s: _Session, acked: int, wait: float) -> None:
    """The SHMEM requests the back-end makes by itself: served until one mapping is in
    place (or `wait` seconds), judged, then a reset."""
    assert s.table is not None
    table = s.table
    if ANY_NONZERO_REFUSES in report.plan:
        _nonzero_check(report, s, table, wait)
    s.serve_until(lambda: table.count > 0, time.monotonic() + wait)
    if not s.requests:
        why = (f"no SHMEM request arrived in {wait:g}s (a device usually maps only when a "
               "guest asks it to)")  # fmt: skip
        report.na(SERVED_CHECKS, why)
        _profile_checks_na(report, why)
        return
    report.add("shmem-requests-well-formed", not s.shape, f"{s.requests} well-formed requests",
               s.shape)  # fmt: skip
    report.add("shmem-requests-valid", not s.refused, "every request granted", s.refused)
    if SERVES_MAIN in report.plan and SERVES_MAIN not in report.verdicts:
        _serves_main_check(report, s, wait)
    _reset_check(report, s, table, acked, wait)
    if FRESH_CHANNEL in report.plan:
        _fresh_channel_check(report, s, acked, wait)


def _nonzero_check(report: Report, s: _Session, table: RegionTable, wait: float) -> None:
    """The first maps are refused with the profile's value (QEMU's 1, no errno). A
    back-end that took that for success believes in mappings that do not exist, and
    unmaps one of them sooner or later; for `wait` seconds, it must not."""
    refused: set[tuple[int, int, int]] = set()
    granted: set[tuple[int, int, int]] = set()
    stale: list[object] = []
    unmaps = 0

    def watch(msg: Message) -> int | None:
        nonlocal unmaps
        if not isinstance(msg.payload, ShmemMap):
            return None
        key = (msg.payload.shmid, msg.payload.shm_offset, msg.payload.len)
        if msg.request == MAP:
            if len(refused) < 3 and key not in granted:
                refused.add(key)
                return errno.ENOSPC  # the profile answers it with its own value
            granted.add(key)
            refused.discard(key)
        else:
            unmaps += 1
            if key in refused:
                stale.append(summarize(msg))
        return None

    s.watch = watch
    started = time.monotonic()
    s.serve_until(lambda: len(refused) >= 3 or bool(stale), started + wait)
    if not refused:
        s.watch = None
        report.na(ANY_NONZERO_REFUSES, f"no SHMEM_MAP arrived in {wait:g}s to refuse")
        return
    s.serve_until(lambda: bool(stale), started + wait)
    s.watch = None
    if not unmaps:  # what it believes shows only in what it unmaps
        report.na(ANY_NONZERO_REFUSES, f"it unmapped nothing in {wait:g}s: whether it took "
                  f"{s.profile.reply(errno.ENOSPC)} for a refusal does not show")  # fmt: skip
        return
    value = s.profile.reply(errno.ENOSPC)
    report.add(ANY_NONZERO_REFUSES, not stale, f"no SHMEM_UNMAP of the {len(refused)} maps "
               f"refused with {value} (among {unmaps} unmaps)", stale or "none")  # fmt: skip


def _serves_main_check(report: Report, s: _Session, wait: float) -> None:
    """A map held unanswered; meanwhile a request on the main channel must be answered."""
    deadline = time.monotonic() + wait
    while (held := s.hold_next(deadline)) is not None and held.request != MAP:
        s.serve(held)  # an UNMAP: the map is what the deadlock is about
    if held is None:
        report.na(SERVES_MAIN, f"no SHMEM_MAP asking for a reply came in {wait:g}s to hold")
        return
    try:  # a device answers in milliseconds: `wait` seconds without one is the deadlock
        got = s.exchange(FrontendReq.GET_FEATURES, barrier=False, serve=False, within=wait)
    except BaseException:
        close_fds(held.fds)
        raise
    ok = not got.unanswered and len(got.messages) == 1
    report.add(SERVES_MAIN, ok, "GET_FEATURES answered while a SHMEM_MAP waits for its reply",
               got.describe(), note="" if ok else _DEADLOCK)  # fmt: skip
    if ok:
        s.serve(held)
    else:
        close_fds(held.fds)
    s.go_on()


def _fresh_channel_check(report: Report, s: _Session, acked: int, wait: float) -> None:
    """After the reset, the device is activated again on a fresh backend channel, the
    old one left open: its next SHMEM request must come on the new one. As for the
    reset, the activation comes while a request of the device's waits for its answer
    (given on the old channel once the new one is acked, as a refusal): one that sends
    a request at a time can have sent nothing else on the old one meanwhile."""
    old = s.backend
    if old is None:
        report.na(FRESH_CHANNEL, "the backend channel is gone")
        return
    held = s.hold_next(time.monotonic() + wait)
    s.poller.unregister(old.sock)
    s.backend = None
    before = s.requests  # what comes from here on is on the new channel (it is served)
    try:
        got = s.open_backend_channel(bool(acked & PF.REPLY_ACK))
        if held is not None:
            close_fds(held.fds)
            with contextlib.suppress(ChannelError):  # it may have let go of the old one
                old.send(encode_u64_reply(held.request, s.profile.reply(errno.ENOSPC)))
        s.go_on()
        if got.error:
            report.add(FRESH_CHANNEL, False, "the fresh channel taken", got.describe())
            return
        deadline = time.monotonic() + wait
        late = None
        watching_old = True  # until the back-end lets go of it (EOF), as it should
        while s.requests == before and time.monotonic() < deadline:
            fresh = s.backend
            if fresh is None or (hung_up(fresh.sock) and not hung_up(s.main.sock)):
                report.add(FRESH_CHANNEL, False, "requests on the fresh backend channel",
                           "the back-end closed the fresh channel")  # fmt: skip
                s._drop_backend()
                return
            if watching_old and old.wait_readable(0):
                try:
                    late = old.recv()
                except ChannelError:  # closed: the back-end took the fresh one
                    watching_old = False
                    continue
                close_fds(late.fds)
                break
            s.serve_until(lambda: s.requests > before, min(deadline, time.monotonic() + 0.05))
        if late is not None:
            report.add(FRESH_CHANNEL, False, "requests on the fresh backend channel",
                       f"{late.name} on the old one")  # fmt: skip
        elif s.requests == before:
            report.na(FRESH_CHANNEL, f"no SHMEM request came in {wait:g}s after the activation")
        else:
            report.add(FRESH_CHANNEL, True, "requests on the fresh backend channel",
                       f"{s.requests - before} there, none on the old one")  # fmt: skip
    finally:
        old.close()


def _reset_check(report: Report, s: _Session, table: RegionTable, acked: int,
                 wait: float) -> None:  # fmt: skip
    """After a reset, no UNMAP of what it dropped. The channels are not ordered with each
    other, so an UNMAP that arrives before the back-end has answered the reset may have
    been sent before it read the reset: that one is answered, not judged. To leave nothing
    in doubt, the reset comes while a request of the back-end's waits for its reply: a
    back-end that sends one request at a time (backend_sim, libvhost-user, rust-vmm) can
    send nothing else before that reply, which comes after the reset's. What it sends
    from then on, up to its answer to the next main-channel request and for `wait`
    seconds from the reset, is judged."""
    if not table.count:
        report.na("no-unmap-after-reset", "nothing was mapped when the reset came")
        return
    rings = s.profile.reset is Reset.RINGS
    payload: object
    if rings:  # QEMU's guest reset: the ring stops; GET_VRING_BASE's answer says it has
        req, payload = FrontendReq.GET_VRING_BASE, VringState(0, 0)
    elif acked & PF.RESET_DEVICE:
        req, payload = FrontendReq.RESET_DEVICE, None
    elif acked & PF.STATUS:
        req, payload = FrontendReq.SET_STATUS, 0
    else:
        req, payload = FrontendReq.RESET_OWNER, None
    held = s.hold_next(time.monotonic() + wait)
    dropped = {(m.shmid, m.shm_offset, m.len) for m in table.mappings()}
    started = time.monotonic()
    table.reset()
    try:
        if rings:
            s.tell(FrontendReq.SET_VRING_ENABLE, VringState(0, 0), serve=False)
            s.tell(req, payload, barrier=False, serve=False)
        else:
            # Its ack says the back-end has handled the reset; without a reliable ack, a
            # barrier.
            s.tell(req, payload, need=bool(acked & PF.REPLY_ACK), barrier=not s.acks,
                   serve=False)  # fmt: skip
    except Stopped:
        if held is not None:
            close_fds(held.fds)
        raise
    for msg in ([held] if held is not None else []) + s.take_arrived():
        s.serve(msg)
    stale: list[object] = []

    def watch(msg: Message) -> int | None:
        # A device may map afresh after a reset, and unmap that; what it may not do is
        # unmap what the reset already dropped. A fresh map of exactly a dropped range
        # is refused, as a front-end may refuse any map (§5 step 12), so that an UNMAP
        # of that range is never one of a fresh mapping.
        if isinstance(msg.payload, ShmemMap):
            key = (msg.payload.shmid, msg.payload.shm_offset, msg.payload.len)
            if key in dropped:
                if msg.request == MAP:
                    return errno.ENOSPC
                stale.append(summarize(msg))
        return None

    s.watch = watch
    s.tell(FrontendReq.GET_FEATURES, barrier=False)  # what it sent before answering is here now
    s.drain()
    s.serve_until(lambda: bool(stale), started + wait)
    s.watch = None
    report.add("no-unmap-after-reset", not stale,
               f"no SHMEM_UNMAP of a mapping {req.name} dropped", stale)  # fmt: skip


def _no_shmem_session(report: Report, path: str, listen: bool, wait: float, timeout: float,
                      peer: Peer, profile: Profile) -> None:  # fmt: skip
    """Connect again acking everything but SHMEM: no SHMEM request may come."""
    check = "no-shmem-without-negotiation"
    try:
        s = _Session(report, path, listen, timeout, peer, profile)
    except OSError as exc:
        report.na(check, f"the back-end did not take a second connection: {exc}")
        return
    try:
        features = _u64(s.tell(FrontendReq.GET_FEATURES, barrier=False)) or 0
        offered = _u64(s.tell(FrontendReq.GET_PROTOCOL_FEATURES)) or 0
        acked = offered & OURS
        reply_ack = bool(acked & PF.REPLY_ACK)
        s.tell(FrontendReq.SET_PROTOCOL_FEATURES, acked, need=reply_ack)
        s.tell(FrontendReq.SET_OWNER)
        if not acked & PF.BACKEND_REQ:
            report.na(check, "the back-end offers no backend channel")
            return
        s.open_backend_channel(reply_ack)
        s.go_on()
        s.tell(FrontendReq.SET_FEATURES, features & VHOST_USER_F_PROTOCOL_FEATURES,
               need=reply_ack)  # fmt: skip
        shmem: list[object] = []

        def watch(msg: Message) -> None:  # records every SHMEM request, refuses none
            shmem.append(summarize(msg))

        s.watch = watch
        s.serve_until(lambda: bool(shmem), time.monotonic() + wait)
        report.add(check, not shmem, "no SHMEM_MAP or SHMEM_UNMAP", shmem or "nothing")
    finally:
        s.close()
