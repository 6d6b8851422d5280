"""Checks for a back-end under test (virtiofsd, a vhost-device daemon, backend_sim):
shmemctl plays the front-end, handshakes, asks for the layout, answers whatever
SHMEM requests come with real mappings, resets, and comes back without SHMEM."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from ..channel import Channel, ChannelError, close_fds
from ..daemon import open_peer
from ..shmem import RegionTable, ShmemRefused, ShmemSetupError
from ..shmem.libc import PAGE_SIZE
from ..wire import BackendReq, ChannelKind, FrontendReq, Message, ShmemConfig, ShmemMap, WireError
from ..wire.constants import VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1, ProtocolFeature
from ..wire.messages import encode, encode_u64_reply, result_from_errno, summarize
from .report import Collected, Report, collect, one_u64_reply

PF = ProtocolFeature
SHMEM = 1 << 22
BIT21 = int(PF.GPA_ADDRESSES)
#: What this front-end acks when offered (SHMEM aside).
OURS = PF.MQ | PF.REPLY_ACK | PF.BACKEND_REQ | PF.BACKEND_SEND_FD | PF.RESET_DEVICE | PF.STATUS


class _Session:
    def __init__(self, path: str, listen: bool, timeout: float) -> None:
        sock = open_peer(path, listen=listen, timeout=timeout)
        self.main = Channel(sock, ChannelKind.MAIN, replies=True)
        self.main.set_recv_timeout(5.0)  # a peer that stops mid-message cannot hang the suite
        self.backend: Channel | None = None

    def call(self, req: FrontendReq, payload: object = None, fds: tuple[int, ...] = (),
             *, need: bool = False, wait: float = 2.0) -> Collected:  # fmt: skip
        collect(self.main, 0, 0.05)
        self.main.send(encode(ChannelKind.MAIN, req, payload, need_reply=need), fds)  # type: ignore[arg-type]
        return collect(self.main, wait)

    def open_backend_channel(self, need: bool) -> Collected:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            got = self.call(FrontendReq.SET_BACKEND_REQ_FD, None, (theirs.fileno(),), need=need,
                            wait=2.0 if need else 0.3)  # fmt: skip
        finally:
            theirs.close()
        self.backend = Channel(ours, ChannelKind.BACKEND, replies=False)
        self.backend.set_recv_timeout(5.0)
        return got

    def close(self) -> None:
        self.main.close()
        if self.backend is not None:
            self.backend.close()


def _u64(got: Collected) -> int | None:
    if got.error or len(got.messages) != 1 or not isinstance(got.messages[0].payload, int):
        return None
    return got.messages[0].payload


def check_backend(path: str, *, listen: bool = False, wait: float = 3.0,
                  timeout: float = 30.0) -> Report:  # fmt: skip
    report = Report(path, "back-end")
    try:
        s = _Session(path, listen, timeout)
    except OSError as exc:
        report.add("connects", "§1", False, "a back-end on the socket", str(exc))
        return report
    table: RegionTable | None = None
    try:
        got = s.call(FrontendReq.GET_FEATURES)
        features = _u64(got)
        ok = features is not None and got.messages[0].flags == 0x5
        report.add("get-features", "§2 replies carry flags 0x5; §4 bit 30", ok and bool(
            features & VHOST_USER_F_PROTOCOL_FEATURES), "one reply, flags 0x5, with bit 30",
            got.describe())  # fmt: skip
        if not ok or not features & VHOST_USER_F_PROTOCOL_FEATURES:
            return report
        got = s.call(FrontendReq.GET_PROTOCOL_FEATURES)
        offered = _u64(got) or 0
        well_formed = _u64(got) is not None and got.messages[0].flags == 0x5
        report.add("get-protocol-features", "§2, §4", well_formed, "one reply, flags 0x5",
                   got.describe())  # fmt: skip
        report.add("never-offers-bit-21", "§6.1: SHMEM is bit 22; bit 21 is GPA_ADDRESSES",
                   not offered & BIT21, "bit 21 not offered", f"{offered:#x}")  # fmt: skip
        shmem = bool(offered & SHMEM)
        if shmem:
            needed = PF.REPLY_ACK | PF.BACKEND_REQ | PF.BACKEND_SEND_FD
            report.add("offers-what-shmem-needs", "§6.2, §6.4: REPLY_ACK, BACKEND_REQ and "
                       "BACKEND_SEND_FD beside SHMEM", offered & needed == needed,
                       f"bits {int(needed):#x} set", f"{offered:#x}")  # fmt: skip
        else:
            report.na("shmem-at-bit-22", "§6.1", "the back-end does not offer SHMEM at bit 22: "
                      "every SHMEM check below is skipped")  # fmt: skip
        acked = offered & (OURS | SHMEM)
        reply_ack = bool(acked & PF.REPLY_ACK)
        got = s.call(FrontendReq.SET_PROTOCOL_FEATURES, acked, need=reply_ack,
                     wait=2.0 if reply_ack else 0.3)  # fmt: skip
        if reply_ack:
            ok, wrong = one_u64_reply(got, FrontendReq.SET_PROTOCOL_FEATURES)
            report.add("acks-when-asked", "§3: under REPLY_ACK + NEED_REPLY, one u64 ack",
                       ok and _u64(got) == 0, "exactly one ack, flags 0x5, value 0"
                       + (f" (got {wrong})" if wrong else ""), got.describe())  # fmt: skip
            got = s.call(FrontendReq.GET_FEATURES, need=True)
            report.add("need-reply-on-a-getter", "§3: NEED_REPLY on a request with its own "
                       "reply changes nothing", _u64(got) == features,
                       "exactly one reply, the features", got.describe())  # fmt: skip
        got = s.call(FrontendReq.SET_OWNER, wait=0.4)
        report.add("no-reply-unless-asked", "§3: no ack without NEED_REPLY",
                   not got.messages and not got.error, "nothing", got.describe())  # fmt: skip
        if shmem:
            table = _layout_checks(report, s)
        if acked & PF.BACKEND_REQ:
            got = s.open_backend_channel(reply_ack)
            if reply_ack:
                report.add("backend-channel-acked", "§4 step 4", _u64(got) == 0,
                           "one ack, value 0", got.describe())  # fmt: skip
        s.call(FrontendReq.SET_FEATURES, VHOST_USER_F_PROTOCOL_FEATURES | VIRTIO_F_VERSION_1,
               need=reply_ack, wait=2.0 if reply_ack else 0.3)  # fmt: skip
        if shmem and table is not None and s.backend is not None:
            _serve_requests(report, s, table, wait, acked)
    finally:
        s.close()
        if table is not None:
            table.close()
    if shmem:
        _no_shmem_session(report, path, listen, wait, timeout)
    return report


def _layout_checks(report: Report, s: _Session) -> RegionTable | None:
    first = s.call(FrontendReq.GET_SHMEM_CONFIG)
    config = first.messages[0].payload if len(first.messages) == 1 and not first.error else None
    ok = isinstance(config, ShmemConfig) and first.messages[0].flags == 0x5
    report.add("shmem-config-layout", "§2, §5: exactly 2056 bytes, nregions <= 256",
               ok, "one VhostUserShMemConfig reply, flags 0x5", first.describe())  # fmt: skip
    if not isinstance(config, ShmemConfig):
        return None
    sizes = config.regions()
    report.add("shmem-config-page-multiples", "§5: sizes are multiples of the page size",
               all(v % PAGE_SIZE == 0 for v in sizes.values()),
               f"multiples of {PAGE_SIZE:#x}", {str(k): v for k, v in sizes.items()})  # fmt: skip
    report.add("shmem-config-nregions", "§6.3: nregions = the number of non-zero sizes",
               config.nregions == len(sizes), str(len(sizes)), config.nregions)  # fmt: skip
    second = s.call(FrontendReq.GET_SHMEM_CONFIG)
    again = second.messages[0].payload if len(second.messages) == 1 else None
    report.add("shmem-config-stable", "§5: the answer never changes for the connection",
               again == config, "the same answer twice", second.describe())  # fmt: skip
    try:
        return RegionTable(sizes)
    except ShmemSetupError as exc:
        report.add("shmem-config-usable", "§5", False, "a layout a front-end can reserve", str(exc))
        return None


def _serve_requests(report: Report, s: _Session, table: RegionTable, wait: float,
                    acked: int) -> None:  # fmt: skip
    """Answer SHMEM requests for `wait` seconds with real mappings; then reset."""
    assert s.backend is not None
    shape: list[object] = []
    refused: list[object] = []
    count = _answer(s.backend, table, wait, shape, refused)
    if not count:
        for check in ("shmem-requests-well-formed", "shmem-requests-valid", "no-unmap-after-reset"):
            report.na(check, "§5", f"no SHMEM request arrived in {wait:g}s (a device usually "
                      "maps only when a guest asks it to)")  # fmt: skip
        return
    report.add("shmem-requests-well-formed", "§2, §5: flags, payload, exactly one fd per MAP",
               not shape, f"{count} well-formed requests", shape)  # fmt: skip
    report.add("shmem-requests-valid", "§5: a back-end asks only for what a front-end may grant",
               not refused, "every request granted", refused)  # fmt: skip
    live = table.count
    if not live:
        report.na("no-unmap-after-reset", "§5", "nothing was mapped when the reset came")
        return
    if acked & PF.RESET_DEVICE:
        req, payload = FrontendReq.RESET_DEVICE, None
    elif acked & PF.STATUS:
        req, payload = FrontendReq.SET_STATUS, 0
    else:
        req, payload = FrontendReq.RESET_OWNER, None
    dropped = {(m.shmid, m.shm_offset, m.len) for m in table.mappings()}
    table.reset()
    s.call(req, payload, need=bool(acked & PF.REPLY_ACK), wait=2.0)
    stale: list[object] = []

    def watch(msg: Message) -> None:
        # A device may map afresh after a reset, and unmap that; what it may not do is
        # unmap what the reset already dropped.
        if isinstance(msg.payload, ShmemMap):
            key = (msg.payload.shmid, msg.payload.shm_offset, msg.payload.len)
            if msg.request == BackendReq.SHMEM_MAP:
                dropped.discard(key)
            elif key in dropped:
                stale.append(summarize(msg))

    _answer(s.backend, table, 1.5, [], [], watch)
    report.add("no-unmap-after-reset", f"§5: after {req.name} the back-end forgets its mappings "
               "and sends no UNMAP for them", not stale, "no SHMEM_UNMAP of a dropped mapping",
               stale)  # fmt: skip


def _answer(channel: Channel, table: RegionTable, seconds: float, shape: list, refused: list,
            watch: Callable[[Message], None] | None = None) -> int:  # fmt: skip
    count = 0
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0 and channel.wait_readable(left):
        try:
            msg = channel.recv()
        except (WireError, ChannelError) as exc:
            shape.append(f"{type(exc).__name__}: {exc}")
            return count + 1
        count += 1
        if watch is not None:
            watch(msg)
        try:
            result = _grant(msg, table, shape, refused)
        finally:
            close_fds(msg.fds)
        if msg.need_reply:
            channel.send(encode_u64_reply(msg.request, result))
    return count


def _grant(msg: Message, table: RegionTable, shape: list, refused: list) -> int:
    if msg.flags not in (0x1, 0x9) or not isinstance(msg.payload, ShmemMap):
        shape.append(summarize(msg))
        return result_from_errno(22)
    try:
        if msg.request == BackendReq.SHMEM_MAP:
            if len(msg.fds) != 1:
                shape.append(summarize(msg))
                return result_from_errno(9)
            table.map(msg.payload, msg.fds[0])
        else:
            table.unmap(msg.payload)
    except ShmemRefused as exc:
        refused.append({**summarize(msg), "refused": f"{exc.detail} ({exc.errno_name})"})
        return result_from_errno(exc.errno)
    return 0


def _no_shmem_session(report: Report, path: str, listen: bool, wait: float,
                      timeout: float) -> None:  # fmt: skip
    """Connect again acking everything but SHMEM: no SHMEM request may come."""
    check = "no-shmem-without-negotiation"
    passage = "§6.2: no SHMEM request unless SHMEM (and REPLY_ACK) were negotiated"
    time.sleep(0.3)
    try:
        s = _Session(path, listen, timeout)
    except OSError as exc:
        report.na(check, passage, f"could not connect a second time: {exc}")
        return
    try:
        features = _u64(s.call(FrontendReq.GET_FEATURES)) or 0
        offered = _u64(s.call(FrontendReq.GET_PROTOCOL_FEATURES)) or 0
        acked = offered & OURS
        s.call(FrontendReq.SET_PROTOCOL_FEATURES, acked, need=bool(acked & PF.REPLY_ACK))
        s.call(FrontendReq.SET_OWNER, wait=0.2)
        if not acked & PF.BACKEND_REQ:
            report.na(check, passage, "the back-end offers no backend channel")
            return
        s.open_backend_channel(bool(acked & PF.REPLY_ACK))
        s.call(FrontendReq.SET_FEATURES, features & VHOST_USER_F_PROTOCOL_FEATURES, wait=0.2)
        assert s.backend is not None
        got = collect(s.backend, wait)
        shmem = [summarize(m) for m in got.messages
                 if m.request in (BackendReq.SHMEM_MAP, BackendReq.SHMEM_UNMAP)]  # fmt: skip
        report.add(check, passage, not shmem and not got.error, "no SHMEM_MAP or SHMEM_UNMAP",
                   shmem or got.describe())  # fmt: skip
    finally:
        s.close()
