"""Checks for a front-end under test (QEMU, a rust-vmm VMM, ours): shmemctl plays the
back-end, answers the whole handshake, then asks for maps and unmaps, good and bad.

Every wait ends on an event. The handshake is over when SET_FEATURES has come and SHMEM
requests can be sent (or never will be on this connection), or when the front-end goes
away. Each crafted request is followed by a barrier, a request the front-end must answer:
replies come strictly in order, so the replies before the barrier's are all the request
drew. Time ends a wait only as a last resort: a front-end that stops answering for
`timeout` seconds, or whose handshake goes quiet for QUIET seconds (QEMU waits for a
guest before SET_FEATURES)."""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass

from ..backend import BackendEndpoint, DeviceModel
from ..channel import Channel, ChannelError, close_fds
from ..daemon import open_peer
from ..session.backend import OFFERED
from ..shmem.rules import Refusal, must_refuse, overlap_in
from ..sizes import human_size, parse_regions
from ..wire import BackendReq, ChannelKind, FrontendReq, Message, ShmemMap, WireError
from ..wire.constants import ProtocolFeature
from ..wire.messages import encode_shmem_request, summarize
from .peer import Peer, PeerGone, Stopped, hung_up
from .report import CONNECTS, STAYS_CONNECTED, Collected, Report, one_u64_reply

MiB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
U64 = (1 << 64) - 1
#: The layout offered unless --regions says otherwise; shmid 1 is left at size 0 on
#: purpose: a map into it must fail.
REGIONS = {0: 8 * MiB, 2: 64 << 10}
#: The map checks work in slots of the largest region: 0 for acked maps, 1 for an
#: unasked one, 2 for refused ones, 3 never mapped (holes and barriers), 4 for a batch;
#: its last page is where out of bounds begins.
SLOT = 16 * PAGE
MIN_REGION = 6 * SLOT
BUFFER = 4 * SLOT  # the file mapped from; refuses-file-too-short asks past its end
BIT21 = int(ProtocolFeature.GPA_ADDRESSES)
SHMEM = 1 << 22
PF = ProtocolFeature
#: A handshake quiet this long before SET_FEATURES is taken as over (a last resort).
QUIET = 3.0
MAP, UNMAP = BackendReq.SHMEM_MAP, BackendReq.SHMEM_UNMAP

CHECKS = {
    CONNECTS: "§1: a front-end on the socket",
    "requests-well-formed": "§2 header: version 1, no reserved bits, no REPLY on a request",
    "protocol-features-before-backend-channel":
        "§4: SET_PROTOCOL_FEATURES must precede SET_BACKEND_REQ_FD",
    "acks-only-offered-features": "§4: the front-end acks the intersection",
    "never-claims-bit-21": "§6.1: SHMEM is bit 22; bit 21 is GPA_ADDRESSES",
    "shmem-at-bit-22": "§6.1",
    "reply-ack-with-shmem": "§6.2: replies only under REPLY_ACK + NEED_REPLY",
    "shmem-config-asked-once": "§5: the answer never changes; ask once per connection",
    "backend-channel-fd": "§1: SET_BACKEND_REQ_FD carries exactly one fd",
    "map-acked-once": "§5: reply once the mapping is in place; exactly one",
    "no-reply-unless-asked": "§6.2: a reply only under NEED_REPLY",
    "unasked-map-took-effect": "§5: requests are handled strictly in order",
    # the refusals cite the rulebook's passages (shmem/rules.py)
    "refuses-overlap": Refusal.OVERLAP.passage,
    "refuses-out-of-bounds": Refusal.OUT_OF_BOUNDS.passage,
    "refuses-zero-length": Refusal.ZERO_LENGTH.passage,
    "refuses-misaligned-offset": Refusal.MISALIGNED.passage,
    "refuses-misaligned-length": Refusal.MISALIGNED.passage,
    "refuses-misaligned-fd-offset": Refusal.MISALIGNED.passage,
    "refuses-unknown-flags": Refusal.BAD_FLAGS.passage,
    "refuses-unknown-shmid": Refusal.NO_REGION.passage,
    "refuses-zero-size-shmid": Refusal.NO_REGION.passage,
    "refuses-overflow": Refusal.OVERFLOW.passage,
    "refuses-map-without-fd": Refusal.BAD_FD_COUNT.passage,
    "refuses-map-with-two-fds": Refusal.BAD_FD_COUNT.passage,
    "refuses-file-too-short": Refusal.FILE_TOO_SHORT.passage,
    "refuses-partial-unmap": Refusal.NOT_A_MAPPING.passage,
    "refuses-unmap-of-a-hole": Refusal.NOT_A_MAPPING.passage,
    "unmaps-a-whole-mapping": "§5 UNMAP",
    "batch-one-ack": "§5: one ack confirms the batch before it",
    "batch-took-effect": "§5: every map of the batch is in place",
    "unknown-request": "§3: unknown ids on the backend channel are refused, not fatal",
    "channel-survives-unknown-request": "§3",
    STAYS_CONNECTED: "§1: both channels stay open while the suite runs",
}  # fmt: skip
_names = list(CHECKS)
#: The checks that need the backend channel.
MAP_CHECKS = _names[_names.index("map-acked-once") : _names.index(STAYS_CONNECTED)]
BACKEND_CHANNEL_CHECKS = ["protocol-features-before-backend-channel", "backend-channel-fd"]
SHMEM_CHECKS = ["shmem-at-bit-22", "reply-ack-with-shmem", "shmem-config-asked-once"]
NO_BACKEND_CHANNEL = ("could not run: the front-end sent no usable SET_BACKEND_REQ_FD before "
                      "its handshake ended")
#: What SHMEM requests need acked, beside SHMEM itself.
NEEDED = ((SHMEM, "SHMEM (bit 22)"), (PF.REPLY_ACK, "REPLY_ACK"), (PF.BACKEND_REQ, "BACKEND_REQ"))


def parse_layout(spec: str | None) -> dict[int, int]:
    """--regions (`0=8M,2=64K`) as a layout the map checks can use; ValueError if not."""
    return _usable(REGIONS if spec is None else parse_regions(spec, PAGE))


def _usable(regions: dict[int, int]) -> dict[int, int]:
    regions = {shmid: size for shmid, size in regions.items() if size}
    if not regions or max(regions.values()) < MIN_REGION:
        raise ValueError(
            f"the map checks need one region of at least {human_size(MIN_REGION)} "
            f"({MIN_REGION // PAGE} pages)"
        )
    return regions


@dataclass(frozen=True)
class Layout:
    """The regions offered, and where the map checks put things."""

    regions: dict[int, int]

    @property
    def shmid(self) -> int:
        """The largest region (the lowest shmid of equals): the map checks use it."""
        return max(self.regions, key=lambda shmid: (self.regions[shmid], -shmid))

    @property
    def size(self) -> int:
        return self.regions[self.shmid]

    @staticmethod
    def slot(n: int) -> int:
        return n * SLOT

    @property
    def gap(self) -> int | None:
        """An unused shmid below the highest used one: a region of size 0."""
        return next((i for i in range(max(self.regions)) if i not in self.regions), None)

    @property
    def unknown(self) -> int | None:
        """A shmid above every used one."""
        return max(self.regions) + 1 if max(self.regions) < 255 else None


def check_frontend(
    path: str,
    *,
    listen: bool = True,
    timeout: float = 30.0,
    offer_bit_21: bool = True,
    require_shmem: bool = False,
    regions: dict[int, int] | None = None,
) -> Report:
    layout = Layout(_usable(REGIONS if regions is None else regions))
    plan = {k: v for k, v in CHECKS.items() if offer_bit_21 or k != "never-claims-bit-21"}
    report = Report(path, "front-end", plan)
    peer = Peer()
    endpoint = BackendEndpoint(DeviceModel(layout.regions), reply_timeout=timeout, busy_poll=0,
                               offered=OFFERED | (BIT21 if offer_bit_21 else 0))  # fmt: skip
    try:
        sock = open_peer(path, listen=listen, timeout=timeout)
    except OSError as exc:
        report.add(CONNECTS, False, "a front-end on the socket", str(exc))
        return report.finish(None)
    report.add(CONNECTS, True, "a front-end on the socket", "one connected")
    served = _Served(sock, endpoint, peer, timeout)
    try:
        served.settle(timeout)
        _map_checks_if_possible(report, served, layout, peer, timeout)
    finally:
        served.close()
    _handshake_checks(report, served, offer_bit_21, require_shmem)
    if served.broke:
        report.give_up(f"could not run: the suite stopped serving the main channel: {served.broke}")
    return report.finish(peer.gone)


class _Served:
    """The main channel, served by a back-end endpoint in a thread of its own. Every
    request the front-end sends is kept; each one, and the end of serving, wakes
    `changed` (the endpoint's own condition, which it also signals when SHMEM
    requests become possible)."""

    def __init__(self, sock: socket.socket, endpoint: BackendEndpoint, peer: Peer,
                 timeout: float) -> None:  # fmt: skip
        self.main = Channel(sock, ChannelKind.MAIN, replies=False)
        self.main.set_recv_timeout(timeout)  # a peer that stops mid-message cannot hang the suite
        self.endpoint = endpoint
        self.peer = peer
        self.changed = endpoint.ready
        self.seen: list[tuple[float, Message]] = []
        self.broke = ""  # the protocol error that ended serving, if one did
        self.ended = False
        self.backend: Channel | None = None  # once the map checks have taken it
        self._closing = False
        endpoint.observer = self._observe
        self._thread = threading.Thread(target=self._serve, daemon=True, name="conformance-main")
        self._thread.start()

    def _observe(self, msg: Message) -> None:
        with self.changed:
            self.seen.append((time.monotonic(), msg))
            self.peer.did(f"after it sent {msg.name}")
            self.changed.notify_all()

    def _serve(self) -> None:
        try:
            self.endpoint.serve(self.main)
        except WireError as exc:
            self.broke = f"WireError: {exc}"
        except ChannelError as exc:
            if not (self._closing or hung_up(self.main.sock)):
                self.broke = f"{type(exc).__name__}: {exc}"
        with self.changed:
            self.ended = True
            if not (self.broke or self._closing):
                self.peer.hang_up()
            self.changed.notify_all()

    def messages(self) -> list[Message]:
        with self.changed:
            return [m for _, m in self.seen]

    def acked(self) -> int | None:
        """What the front-end's SET_PROTOCOL_FEATURES acked, once it has sent one."""
        spf = FrontendReq.SET_PROTOCOL_FEATURES
        acks = [m.payload for m in self.messages() if m.request == spf]
        if not acks:
            return None
        ack = acks[-1] or 0
        if not isinstance(ack, int):  # the codec decodes its payload as a u64, or refuses it
            raise TypeError(f"SET_PROTOCOL_FEATURES decoded to {ack!r}, not a u64")
        return ack

    def settle(self, timeout: float) -> None:
        """Until the handshake is over, the front-end is gone, or (the last resort) it
        has been quiet for QUIET seconds or `timeout` has passed."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not self.ended and not self._handshake_over():
                end = min(deadline, self.seen[-1][0] + QUIET) if self.seen else deadline
                left = end - time.monotonic()
                if left <= 0:
                    return
                self.changed.wait(left)

    def _handshake_over(self) -> bool:
        if not any(m.request == FrontendReq.SET_FEATURES for _, m in self.seen):
            return False
        acked = self.acked()
        return acked is not None and (
            self.endpoint.why_not_ready() is None or _declined(acked) is not None
        )

    def take_backend_channel(self) -> Channel | None:
        """The backend channel, the checks' own from now on: the endpoint lets go of it,
        so that the end of serving the main channel cannot close it under them."""
        with self.changed:
            held, self.endpoint.backend_channel = self.endpoint.backend_channel, None
        self.backend = None if held is None else held.channel
        return self.backend

    def close(self) -> None:
        """Note a hang-up nobody saw yet; then close both channels (a front-end drops
        the connection when either closes, which is no hang-up of its own)."""
        with self.changed:
            if not self.ended and (hung_up(self.main.sock) or (
                    self.backend is not None and hung_up(self.backend.sock))):  # fmt: skip
                self.peer.hang_up()
            self._closing = True
        self.main.close()
        if self.backend is not None:
            self.backend.close()
        self._thread.join(5)


def _declined(acked: int) -> str | None:
    missing = [name for bit, name in NEEDED if not acked & bit]
    return f"the front-end did not ack {' or '.join(missing)}" if missing else None


def _map_checks_if_possible(report: Report, served: _Served, layout: Layout, peer: Peer,
                            timeout: float) -> None:  # fmt: skip
    acked = served.acked()
    if served.ended or acked is None:
        return  # the end of serving, or the handshake checks, say why they could not run
    declined = _declined(acked)
    if declined is not None:
        report.na(MAP_CHECKS, f"{declined}: no SHMEM request can be sent")
        return
    channel = served.take_backend_channel()
    if channel is None:
        report.not_run(MAP_CHECKS, NO_BACKEND_CHANNEL)
        return
    asker = _Asker(report, channel, layout, peer, timeout)
    try:
        _map_checks(report, asker, layout)
    except PeerGone:
        pass  # the report's end says how it went, for every check left
    except Stopped as exc:
        report.give_up(f"could not run: {exc}", among=MAP_CHECKS)
    finally:
        asker.close()


def _handshake_checks(report: Report, served: _Served, offer_bit_21: bool,
                      require_shmem: bool) -> None:  # fmt: skip
    """Judged on everything the front-end sent. A check whose evidence never came from a
    front-end that went away is left to the report's end, which says how it went."""
    messages = served.messages()
    names = [m.name for m in messages]
    if messages or served.broke:
        bad = [summarize(m) for m in messages if m.flags not in (0x1, 0x9)]
        expected = "flags 0x1 or 0x9 on every main-channel request"
        report.add("requests-well-formed", not bad and not served.broke, expected,
                   bad or served.broke)  # fmt: skip
    acked = served.acked()
    fd_msgs = [m for m in messages if m.request == FrontendReq.SET_BACKEND_REQ_FD]
    if fd_msgs:
        before = names[: names.index("SET_BACKEND_REQ_FD")]
        report.add("protocol-features-before-backend-channel", "SET_PROTOCOL_FEATURES" in before,
                   "SET_PROTOCOL_FEATURES first", names)  # fmt: skip
        report.add(
            "backend-channel-fd", all(len(m.fds) + len(m.surplus_fds) == 1 for m in fd_msgs),
            "one fd", [{**summarize(m), "fds": len(m.fds) + len(m.surplus_fds)} for m in fd_msgs],
        )  # fmt: skip
    elif acked is not None and not acked & PF.BACKEND_REQ:
        report.na(BACKEND_CHANNEL_CHECKS, "the front-end did not ack BACKEND_REQ")
    elif not served.ended:
        report.not_run(BACKEND_CHANNEL_CHECKS, NO_BACKEND_CHANNEL)
    if acked is None:
        if not served.ended:
            report.add("acks-only-offered-features", False, "a SET_PROTOCOL_FEATURES", names)
            report.give_up("could not run: the front-end sent no SET_PROTOCOL_FEATURES")
        return
    offered = served.endpoint.offered
    report.add("acks-only-offered-features", acked & ~offered == 0, f"a subset of {offered:#x}",
               f"{acked:#x}")  # fmt: skip
    if offer_bit_21:
        report.add(
            "never-claims-bit-21", not acked & BIT21, "bit 21 not acked", f"{acked:#x}",
            note="a front-end that really uses guest-physical addresses may ack 21: run with "
            "--no-offer-bit-21",
        )  # fmt: skip
    if acked & SHMEM:
        report.add("shmem-at-bit-22", True, "SHMEM acked at bit 22", f"{acked:#x}")
        report.add("reply-ack-with-shmem", bool(acked & PF.REPLY_ACK),
                   "REPLY_ACK acked beside SHMEM", f"{acked:#x}")  # fmt: skip
        configs = names.count("GET_SHMEM_CONFIG")
        report.add("shmem-config-asked-once", configs <= 1, "at most one GET_SHMEM_CONFIG",
                   f"{configs} times")  # fmt: skip
        return
    if require_shmem:
        report.add("shmem-at-bit-22", False, "SHMEM acked at bit 22", f"{acked:#x}")
    report.na([c for c in SHMEM_CHECKS if c not in report.verdicts], "the front-end did not ack "
              "SHMEM at bit 22: it does not implement the extension")  # fmt: skip


def _shmem(req: int, m: ShmemMap, fds: tuple[int, ...], need: bool = True) -> tuple:
    return req, encode_shmem_request(req, m, need_reply=need), fds


class _Asker:
    """Crafted requests on the backend channel, each followed by a barrier: a request of
    the other id that the front-end must refuse (an UNMAP of a hole after a MAP, a map of
    length 0 after an UNMAP), so the replies before the barrier's belong to the request."""

    def __init__(self, report: Report, channel: Channel, layout: Layout, peer: Peer,
                 timeout: float) -> None:  # fmt: skip
        self.report = report
        self.channel = channel
        self.peer = peer
        self.timeout = timeout
        self.broken = ""  # why the channel cannot carry the next check
        self.buffer = os.memfd_create("shmemctl-conformance", os.MFD_CLOEXEC)
        os.ftruncate(self.buffer, BUFFER)
        hole = ShmemMap(layout.shmid, layout.slot(3), PAGE)
        self.barriers = {
            UNMAP: _shmem(UNMAP, hole, ()),
            MAP: _shmem(MAP, hole._replace(len=0), (self.buffer,)),
        }

    def exchange(self, check: str, sends: list[tuple]) -> Collected:
        """Send the requests and a barrier; what arrived before the barrier's reply."""
        self.peer.waiting = check
        try:
            return self._exchange(check, sends)
        finally:
            self.peer.waiting = ""

    def _exchange(self, check: str, sends: list[tuple]) -> Collected:
        barrier = self.barriers[MAP if any(req == UNMAP for req, _, _ in sends) else UNMAP]
        for _, data, fds in [*sends, barrier]:
            self._send(data, fds)
        messages: list[Message] = []
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.channel.wait_readable(left):
                self.broken = f"the front-end stopped answering the backend channel at {check}"
                return Collected(messages, f"no reply within {self.timeout:g}s", unanswered=True)
            try:
                msg = self.channel.recv()
            except (WireError, ChannelError) as exc:
                if not isinstance(exc, WireError) and hung_up(self.channel.sock):
                    raise self.peer.hang_up() from exc
                self.broken = f"the backend channel broke at {check} ({exc})"
                return Collected(messages, f"{type(exc).__name__}: {exc}")
            close_fds(msg.fds)
            self.peer.did(f"after it answered {msg.name} ({check})")
            if msg.request == barrier[0]:
                return Collected(messages)
            messages.append(msg)

    def _send(self, data: bytes, fds: tuple[int, ...]) -> None:
        try:
            self.channel.send(data, fds)
        except ChannelError as exc:
            if hung_up(self.channel.sock):
                raise self.peer.hang_up() from exc
            raise Stopped(f"the backend channel broke at {self.peer.waiting} ({exc})") from exc

    def judge(self, check: str, ok: bool, expected: str, arrived: object) -> bool:
        """The verdict; then, if the channel broke on the way, the checks left stop."""
        self.report.add(check, ok, expected, arrived)
        if self.broken:
            raise Stopped(self.broken)
        return ok

    def probe(self, check: str, sends: list[tuple], *, ok: bool, need: bool = True,
              why: str = "") -> tuple[bool, str, object]:  # fmt: skip
        """Requests whose last one is judged: (as expected?, what was expected, what arrived).
        `why`: for a request to be refused, the rule that refuses it."""
        got = self.exchange(check, sends)
        if not need:
            ok = not got.messages and not got.error
            return ok, "no reply (NEED_REPLY not set)", got.describe()
        shape_ok, wrong = one_u64_reply(got, sends[-1][0])
        value_ok = shape_ok and (got.messages[0].payload == 0) == ok
        wanted = "0" if ok else "non-zero" + (f" ({why})" if why else "")
        expected = f"exactly one reply, flags 0x5, u64 {wanted}" + (
            f" (got {wrong})" if wrong else ""
        )
        return value_ok, expected, got.describe()

    def expect(self, check: str, req: int, m: ShmemMap, *, ok: bool,
               fds: tuple[int, ...] | None = None, need: bool = True) -> bool:  # fmt: skip
        if fds is None:
            fds = (self.buffer,) if req == MAP else ()
        sends = [_shmem(req, m, fds, need)]
        return self.judge(check, *self.probe(check, sends, ok=ok, need=need))

    def expect_refused(self, case: RefusalCase) -> bool:
        """A request the rulebook refuses: refused, and the expectation says by which rule
        (its reading of this very request where the layout alone decides it)."""
        fds = (self.buffer,) if case.fds is None else case.fds
        rule = case.refusal
        why = f"{case.reading or rule.summary}; shmemctl answers -{errno.errorcode[rule.errno]}"
        sends = [_shmem(case.request, case.m, fds)]
        return self.judge(case.check, *self.probe(case.check, sends, ok=False, why=why))

    def expect_all(self, check: str, steps: list[tuple[int, ShmemMap]]) -> bool:
        """Several requests that must all succeed: one verdict."""
        bad = []
        for req, m in steps:
            fds = (self.buffer,) if req == MAP else ()
            ok, _, arrived = self.probe(check, [_shmem(req, m, fds)], ok=True)
            if not ok:
                bad.append(arrived)
            if self.broken:
                break
        return self.judge(check, not bad, f"{len(steps)} replies of 0", bad)

    def close(self) -> None:
        os.close(self.buffer)


#: Checks a layout given with --regions may leave without a shmid to ask for.
_NO_SUCH_SHMID = {
    "refuses-unknown-shmid": "the layout uses shmid 255: no shmid above it is left to ask for",
    "refuses-zero-size-shmid": "the layout has no unused shmid below its highest one "
    "(--regions with a gap, e.g. 0=4M,2=4M, has one)",
}


def _first_page(shmid: int | None) -> ShmemMap | None:
    return None if shmid is None else ShmemMap(shmid, 0, PAGE, 0)


@dataclass(frozen=True)
class RefusalCase:
    """A request a front-end must refuse, the rule that refuses it, and the fds it
    carries (None: the suite's buffer on a map)."""

    check: str
    request: int
    m: ShmemMap
    refusal: Refusal
    fds: tuple[int, ...] | None = None
    #: the rulebook's reading of the request, where the layout and the mappings the
    #: suite holds decide it ("" where only fds or the file can: steps 2 and 11)
    reading: str = ""


def refusal_cases(layout: Layout, buffer: int) -> list[RefusalCase | str]:
    """The requests the map checks expect refused, in the order they are sent, with the
    mapping of slot 0 in place (`map-acked-once`). A check the layout leaves nothing to
    ask for is its name alone."""
    t, refused = layout.shmid, layout.slot(2)
    R = Refusal
    wanted: list[tuple[str, int, ShmemMap | None, Refusal, tuple[int, ...] | None]] = [
        ("refuses-overlap", MAP, ShmemMap(t, SLOT // 2, SLOT, 0), R.OVERLAP, None),
        ("refuses-out-of-bounds", MAP, ShmemMap(t, layout.size - PAGE, 2 * PAGE, 0),
         R.OUT_OF_BOUNDS, None),
        ("refuses-zero-length", MAP, ShmemMap(t, refused, 0, 0), R.ZERO_LENGTH, None),
        ("refuses-misaligned-offset", MAP, ShmemMap(t, refused + 1, PAGE, 0), R.MISALIGNED, None),
        ("refuses-misaligned-length", MAP, ShmemMap(t, refused, PAGE + 1, 0), R.MISALIGNED, None),
        ("refuses-misaligned-fd-offset", MAP, ShmemMap(t, refused, PAGE, 1), R.MISALIGNED, None),
        ("refuses-unknown-flags", MAP, ShmemMap(t, refused, PAGE, 0, 2), R.BAD_FLAGS, None),
        ("refuses-unknown-shmid", MAP, _first_page(layout.unknown), R.NO_REGION, None),
        ("refuses-zero-size-shmid", MAP, _first_page(layout.gap), R.NO_REGION, None),
        ("refuses-overflow", MAP, ShmemMap(t, U64 - PAGE + 1, 2 * PAGE, 0), R.OVERFLOW, None),
        ("refuses-map-without-fd", MAP, ShmemMap(t, refused, PAGE, 0), R.BAD_FD_COUNT, ()),
        ("refuses-map-with-two-fds", MAP, ShmemMap(t, refused, PAGE, 0), R.BAD_FD_COUNT,
         (buffer, buffer)),
        ("refuses-file-too-short", MAP, ShmemMap(t, refused, SLOT, BUFFER), R.FILE_TOO_SHORT,
         None),
        ("refuses-partial-unmap", UNMAP, ShmemMap(t, 0, PAGE), R.NOT_A_MAPPING, None),
        ("refuses-unmap-of-a-hole", UNMAP, ShmemMap(t, layout.slot(3), PAGE), R.NOT_A_MAPPING,
         None),
    ]  # fmt: skip
    held = [(0, SLOT)]
    cases: list[RefusalCase | str] = []
    for check, req, m, refusal, fds in wanted:
        if m is None:
            cases.append(check)
            continue
        reading = must_refuse(layout.regions, overlap_in(held), m, is_map=req == MAP)
        cases.append(RefusalCase(check, req, m, refusal, fds, reading))
    return cases


def _map_checks(report: Report, a: _Asker, layout: Layout) -> None:
    t = layout.shmid
    a.expect("map-acked-once", MAP, ShmemMap(t, 0, SLOT, 0), ok=True)
    a.expect("no-reply-unless-asked", MAP, ShmemMap(t, layout.slot(1), SLOT, 0), ok=True,
             need=False)  # fmt: skip
    a.expect("unasked-map-took-effect", UNMAP, ShmemMap(t, layout.slot(1), SLOT), ok=True)
    for case in refusal_cases(layout, a.buffer):
        if isinstance(case, str):
            report.na(case, _NO_SUCH_SHMID[case])
        else:
            a.expect_refused(case)
    a.expect("unmaps-a-whole-mapping", UNMAP, ShmemMap(t, 0, SLOT), ok=True)
    batch = [ShmemMap(t, layout.slot(4) + i * PAGE, PAGE, 0) for i in range(4)]
    sends = [_shmem(MAP, m, (a.buffer,), need=m is batch[-1]) for m in batch]
    a.judge("batch-one-ack", *a.probe("batch-one-ack", sends, ok=True))
    a.expect_all("batch-took-effect", [(UNMAP, ShmemMap(t, m.shm_offset, PAGE)) for m in batch])
    unknown = (42, struct.pack("<III", 42, 0x9, 0), ())
    got = a.exchange("unknown-request", [unknown])
    shape_ok, wrong = one_u64_reply(got, 42)
    a.judge("unknown-request", shape_ok and got.messages[0].payload != 0,
            "exactly one non-zero u64 reply" + (f" (got {wrong})" if wrong else ""),
            got.describe())  # fmt: skip
    a.expect_all("channel-survives-unknown-request",
                 [(MAP, ShmemMap(t, 0, PAGE, 0)), (UNMAP, ShmemMap(t, 0, PAGE))])  # fmt: skip
