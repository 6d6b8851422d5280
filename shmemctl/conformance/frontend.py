"""Checks for a front-end under test (QEMU, a rust-vmm VMM, ours): shmemctl plays the
back-end, answers the whole handshake, then asks for maps and unmaps, good and bad."""

from __future__ import annotations

import os
import threading
import time

from ..backend import BackendEndpoint, DeviceModel
from ..channel import Channel, ChannelError
from ..daemon import open_peer
from ..wire import BackendReq, ChannelKind, FrontendReq, Message, ShmemMap, WireError
from ..wire.constants import ProtocolFeature
from ..wire.messages import encode_shmem_request, summarize
from .report import Collected, Report, collect, one_u64_reply

MiB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
U64 = (1 << 64) - 1
#: shmid 1 is left at size 0 on purpose: a map into it must fail.
REGIONS = {0: 8 * MiB, 2: 64 << 10}
BIT21 = int(ProtocolFeature.GPA_ADDRESSES)
SHMEM = 1 << 22


def check_frontend(
    path: str,
    *,
    listen: bool = True,
    timeout: float = 30.0,
    offer_bit_21: bool = True,
    require_shmem: bool = False,
) -> Report:
    report = Report(path, "front-end")
    seen: list[tuple[float, Message]] = []
    endpoint = BackendEndpoint(
        DeviceModel(REGIONS), reply_timeout=2.0, busy_poll=0,
        observer=lambda m: seen.append((time.monotonic(), m)),
    )  # fmt: skip
    if offer_bit_21:
        endpoint.offered |= BIT21
    try:
        sock = open_peer(path, listen=listen, timeout=timeout)
    except OSError as exc:
        report.add("connects", "§1", False, "a front-end on the socket", str(exc))
        return report
    main = Channel(sock, ChannelKind.MAIN, replies=False)
    main.set_recv_timeout(timeout)  # a peer that stops mid-message cannot hang the suite
    broke: list[str] = []

    def serve() -> None:
        try:
            endpoint.serve(main)
        except (WireError, ChannelError) as exc:
            broke.append(f"{type(exc).__name__}: {exc}")

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    _settle(endpoint, seen, server, timeout)
    try:
        _handshake_checks(report, endpoint, seen, broke, offer_bit_21, require_shmem)
        if _can_map(report, endpoint):
            _backend_channel_checks(report, endpoint)
    finally:
        main.close()
        server.join(5)
    return report


def _settle(
    endpoint: BackendEndpoint, seen: list, server: threading.Thread, timeout: float
) -> None:
    """Until the handshake is over: SHMEM usable, or the front-end quiet for 1.5 s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.is_alive():
        if endpoint.why_not_ready() is None and any(
            m.request == FrontendReq.SET_FEATURES for _, m in seen
        ):
            return
        if seen and time.monotonic() - seen[-1][0] > 1.5:
            return
        time.sleep(0.05)


def _handshake_checks(
    report: Report, endpoint: BackendEndpoint, seen: list[tuple[float, Message]],
    broke: list[str], offer_bit_21: bool, require_shmem: bool,
) -> None:  # fmt: skip
    messages = [m for _, m in seen]
    names = [m.name for m in messages]
    bad = [summarize(m) for m in messages if m.flags not in (0x1, 0x9)]
    report.add(
        "requests-well-formed", "§2 header: version 1, no reserved bits, no REPLY on a request",
        not bad and not broke, "flags 0x1 or 0x9 on every main-channel request",
        bad or broke,
    )  # fmt: skip
    acked = next(
        (m.payload for m in messages if m.request == FrontendReq.SET_PROTOCOL_FEATURES), None
    )
    if "SET_BACKEND_REQ_FD" in names and acked is not None:
        order_ok = names.index("SET_PROTOCOL_FEATURES") < names.index("SET_BACKEND_REQ_FD")
        report.add(
            "protocol-features-before-backend-channel", "§4: SET_PROTOCOL_FEATURES must precede "
            "SET_BACKEND_REQ_FD", order_ok, "SET_PROTOCOL_FEATURES first", names,
        )  # fmt: skip
    else:
        report.na("protocol-features-before-backend-channel", "§4", "no backend channel was set up")
    if not isinstance(acked, int):
        report.add("acks-protocol-features", "§4", False, "a SET_PROTOCOL_FEATURES", names)
        return
    report.add(
        "acks-only-offered-features", "§4: the front-end acks the intersection",
        acked & ~endpoint.offered == 0, f"a subset of {endpoint.offered:#x}", f"{acked:#x}",
    )  # fmt: skip
    if offer_bit_21:
        report.add(
            "never-claims-bit-21", "§6.1: SHMEM is bit 22; bit 21 is GPA_ADDRESSES",
            not acked & BIT21, "bit 21 not acked", f"{acked:#x}",
            note="a front-end that really uses guest-physical addresses may ack 21: run with "
            "--no-offer-bit-21",
        )  # fmt: skip
    if acked & SHMEM:
        report.add("shmem-at-bit-22", "§6.1", True, "SHMEM acked at bit 22", f"{acked:#x}")
        report.add(
            "reply-ack-with-shmem", "§6.2: replies only under REPLY_ACK + NEED_REPLY",
            bool(acked & ProtocolFeature.REPLY_ACK), "REPLY_ACK acked beside SHMEM",
            f"{acked:#x}",
        )  # fmt: skip
        configs = names.count("GET_SHMEM_CONFIG")
        report.add(
            "shmem-config-asked-once", "§5: the answer never changes; ask once per connection",
            configs <= 1, "at most one GET_SHMEM_CONFIG", f"{configs} times",
        )  # fmt: skip
    elif require_shmem:
        report.add("shmem-at-bit-22", "§6.1", False, "SHMEM acked at bit 22", f"{acked:#x}")
    else:
        report.na("shmem-at-bit-22", "§6.1", "the front-end did not ack SHMEM: it does not "
                  "implement the extension (every SHMEM check below is skipped)")  # fmt: skip
    fd_msgs = [m for m in messages if m.request == FrontendReq.SET_BACKEND_REQ_FD]
    if fd_msgs:
        report.add(
            "backend-channel-fd", "§1: SET_BACKEND_REQ_FD carries exactly one fd",
            all(len(m.fds) + len(m.surplus_fds) == 1 for m in fd_msgs), "one fd",
            [{**summarize(m), "fds": len(m.fds) + len(m.surplus_fds)} for m in fd_msgs],
        )  # fmt: skip


def _can_map(report: Report, endpoint: BackendEndpoint) -> bool:
    why = endpoint.why_not_ready()
    if why is None:
        return True
    for name in ("map-acked-once", "map-validation", "unmap-validation", "batch-one-ack",
                 "unknown-request"):  # fmt: skip
        report.na(name, "§5", f"no SHMEM requests can be sent: {why}")
    return False


class _Asker:
    """Crafted SHMEM requests on the backend channel, each with the replies it drew."""

    def __init__(self, report: Report, channel: Channel) -> None:
        self.report = report
        self.channel = channel
        self.broken = ""
        self.buffer = os.memfd_create("shmemctl-conformance", os.MFD_CLOEXEC)
        os.ftruncate(self.buffer, 4 * MiB)

    def send(self, req: int, m: ShmemMap, fds: tuple[int, ...], need: bool) -> Collected:
        collect(self.channel, 0, 0.05)  # leftovers of an earlier check do not count here
        self.channel.send(encode_shmem_request(req, m, need_reply=need), fds)
        return collect(self.channel, 2.0 if need else 0.4)

    def probe(self, req: int, m: ShmemMap, *, ok: bool, fds: tuple[int, ...] | None = None,
              need: bool = True) -> tuple[bool, str, object]:  # fmt: skip
        """Send one request: (as expected?, what was expected, what arrived)."""
        if fds is None:
            fds = (self.buffer,) if req == BackendReq.SHMEM_MAP else ()
        got = self.send(req, m, fds, need)
        if got.error:
            self.broken = got.error
        if not need:
            return (
                not got.messages and not got.error,
                "no reply (NEED_REPLY not set)",
                got.describe(),
            )
        shape_ok, wrong = one_u64_reply(got, req)
        value_ok = shape_ok and (got.messages[0].payload == 0) == ok
        wanted = "0" if ok else "a non-zero u64"
        expected = f"exactly one reply, flags 0x5, u64 {wanted}" + (
            f" (got {wrong})" if wrong else ""
        )
        return value_ok, expected, got.describe()

    def expect(self, check: str, passage: str, req: int, m: ShmemMap, *, ok: bool,
               fds: tuple[int, ...] | None = None, need: bool = True) -> bool:  # fmt: skip
        if self.broken:
            self.report.na(check, passage, f"the channel broke earlier ({self.broken})")
            return False
        return self.report.add(check, passage, *self.probe(req, m, ok=ok, fds=fds, need=need))

    def expect_all(self, check: str, passage: str, steps: list[tuple[int, ShmemMap]]) -> bool:
        """Several requests that must all succeed: one verdict."""
        if self.broken:
            self.report.na(check, passage, f"the channel broke earlier ({self.broken})")
            return False
        outcomes = [self.probe(req, m, ok=True) for req, m in steps]
        bad = [arrived for ok, _, arrived in outcomes if not ok]
        return self.report.add(check, passage, not bad, f"{len(steps)} replies of 0", bad)

    def close(self) -> None:
        os.close(self.buffer)


def _backend_channel_checks(report: Report, endpoint: BackendEndpoint) -> None:
    assert endpoint.backend_channel is not None
    a = _Asker(report, endpoint.backend_channel.channel)
    MAP, UNMAP = BackendReq.SHMEM_MAP, BackendReq.SHMEM_UNMAP
    try:
        a.expect("map-acked-once", "§5: reply once the mapping is in place; exactly one",
                 MAP, ShmemMap(0, 0, 64 << 10, 0), ok=True)  # fmt: skip
        a.expect("no-reply-unless-asked", "§6.2: a reply only under NEED_REPLY",
                 MAP, ShmemMap(0, MiB, 64 << 10, 0), ok=True, need=False)  # fmt: skip
        a.expect("unasked-map-took-effect", "§5: requests are handled strictly in order",
                 UNMAP, ShmemMap(0, MiB, 64 << 10), ok=True)  # fmt: skip
        bad_maps = [
            ("refuses-overlap", "§5 step 10", ShmemMap(0, 32 << 10, 64 << 10, 0), None),
            ("refuses-out-of-bounds", "§5 step 8", ShmemMap(0, 8 * MiB - PAGE, 2 * PAGE, 0), None),
            ("refuses-zero-length", "§5 step 6", ShmemMap(0, 2 * MiB, 0, 0), None),
            ("refuses-misaligned-offset", "§5 step 9", ShmemMap(0, 2 * MiB + 1, PAGE, 0), None),
            ("refuses-misaligned-length", "§5 step 9", ShmemMap(0, 2 * MiB, PAGE + 1, 0), None),
            ("refuses-misaligned-fd-offset", "§5 step 9", ShmemMap(0, 2 * MiB, PAGE, 1), None),
            ("refuses-unknown-flags", "§5 step 4, §2", ShmemMap(0, 2 * MiB, PAGE, 0, 2), None),
            ("refuses-unknown-shmid", "§5 step 5", ShmemMap(7, 0, PAGE, 0), None),
            ("refuses-zero-size-shmid", "§5 step 5", ShmemMap(1, 0, PAGE, 0), None),
            ("refuses-overflow", "§5 step 7", ShmemMap(0, U64 - PAGE + 1, 2 * PAGE, 0), None),
            ("refuses-map-without-fd", "§5 step 2, §6.5", ShmemMap(0, 2 * MiB, PAGE, 0), ()),
            ("refuses-map-with-two-fds", "§5 step 2, §6.5", ShmemMap(0, 2 * MiB, PAGE, 0),
             (a.buffer, a.buffer)),
            ("refuses-file-too-short", "§5 step 11", ShmemMap(0, 2 * MiB, 64 << 10, 4 * MiB),
             None),
        ]  # fmt: skip
        for check, passage, m, fds in bad_maps:
            a.expect(check, passage, MAP, m, ok=False, fds=fds)
        a.expect("refuses-partial-unmap", "§5 UNMAP: one whole existing mapping",
                 UNMAP, ShmemMap(0, 0, PAGE), ok=False)  # fmt: skip
        a.expect("refuses-unmap-of-a-hole", "§5 UNMAP", UNMAP, ShmemMap(0, 3 * MiB, PAGE), ok=False)
        a.expect("unmaps-a-whole-mapping", "§5 UNMAP", UNMAP, ShmemMap(0, 0, 64 << 10), ok=True)
        if not a.broken:
            batch = [ShmemMap(0, 4 * MiB + i * PAGE, PAGE, 0) for i in range(4)]
            for m in batch[:-1]:
                a.channel.send(encode_shmem_request(MAP, m, need_reply=False), (a.buffer,))
            a.expect("batch-one-ack", "§5: one ack confirms the batch before it",
                     MAP, batch[-1], ok=True)  # fmt: skip
            a.expect_all("batch-took-effect", "§5: every map of the batch is in place",
                         [(UNMAP, ShmemMap(0, m.shm_offset, PAGE)) for m in batch])  # fmt: skip
        if not a.broken:
            a.channel.send(b"".join([
                (42).to_bytes(4, "little"), (0x9).to_bytes(4, "little"), (0).to_bytes(4, "little"),
            ]))  # fmt: skip
            got = collect(a.channel, 2.0)
            shape_ok, wrong = one_u64_reply(got, 42)
            report.add(
                "unknown-request", "§3: unknown ids on the backend channel are refused, not fatal",
                shape_ok and got.messages[0].payload != 0,
                "exactly one non-zero u64 reply" + (f" (got {wrong})" if wrong else ""),
                got.describe(),
            )  # fmt: skip
            a.expect(
                "channel-survives-unknown-request", "§3", MAP, ShmemMap(0, 0, PAGE, 0), ok=True
            )
            a.expect("channel-survives-unknown-request", "§3", UNMAP, ShmemMap(0, 0, PAGE), ok=True)
    finally:
        a.close()
