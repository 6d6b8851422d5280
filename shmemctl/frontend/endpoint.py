"""The front-end endpoint: what a VMM does for a vhost-user device with shared memory.

Threads: the caller's thread runs `run()` (connect or accept, handshake, then
supervise the main channel until it ends); one thread serves the backend
channel, strictly in order, replying only once a mapping is really in place
or really gone. Requests on the main channel (reset, GET_SHMEM_CONFIG) may
come from any thread and are serialised by one lock.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, TypeVar

from ..channel import DEFAULT_BUSY_POLL, Channel, ChannelClosed, ChannelError, close_fds
from ..daemon import Stopper, connect_unix, listen_unix, profiled
from ..events import Event, EventHub, state_named
from ..faults import Fault, FrontendFaults
from ..latency import LatencyHistogram
from ..session import FrontendSession, HandshakeError, NeedBackendChannel, Negotiated, Note
from ..session.common import Outgoing
from ..session.frontend import DropMappings, Fed, GuestMemory, Layout, Step, drive
from ..session.profiles import STRICT, Profile
from ..shmem import Refusal, RegionTable, ShmemRefused, ShmemSetupError
from ..shmem.region import (
    DEFAULT_MAX_PER_REGION,
    DEFAULT_MAX_RESERVE,
    DEFAULT_MAX_TOTAL,
    GuestRam,
)
from ..sizes import hex_range
from ..wire import (
    BackendReq,
    ChannelKind,
    FrontendReq,
    Message,
    ShmemConfig,
    ShmemMap,
    WireError,
    feature_names,
    result_from_errno,
)
from ..wire.constants import SHMEM_BIT, check_shmem_bit

log = logging.getLogger("frontend")
T = TypeVar("T")


@dataclass
class FrontendOptions:
    connect: str | None = None
    listen: str | None = None
    shmem_bit: int = SHMEM_BIT
    reconnect: float | None = None
    reply_timeout: float = 5.0
    send_timeout: float = 5.0
    busy_poll: float = DEFAULT_BUSY_POLL
    max_per_region: int = DEFAULT_MAX_PER_REGION
    max_total: int = DEFAULT_MAX_TOTAL
    max_reserve: int = DEFAULT_MAX_RESERVE
    #: deliberate protocol faults (shmemctl.faults), for showing conformance catches them
    faults: frozenset[Fault] = frozenset()
    #: whose behaviour it has on the wire (shmemctl.session.profiles)
    profile: Profile = STRICT


class Frontend:
    def __init__(self, options: FrontendOptions, events: EventHub | None = None) -> None:
        if bool(options.connect) == bool(options.listen):
            raise ValueError("give exactly one of --connect PATH or --listen PATH")
        self.options = options
        self.session = FrontendSession(shmem_bit=check_shmem_bit(options.shmem_bit),
                                       profile=options.profile)  # fmt: skip
        if options.profile is not STRICT:
            log.info("behaving as %s: %s", options.profile.name, options.profile.what)
        self._announces = options.profile.announces_mappings  # asked at every SHMEM request
        #: the layer that applies deliberate faults, only when some are asked for
        self.faults = FrontendFaults(options.faults) if options.faults else None
        if options.faults:
            log.warning("deliberate faults on: %s",
                        ", ".join(sorted(f.option for f in options.faults)))  # fmt: skip
        self.events = events or EventHub()
        self.stopper = Stopper()
        self.state = "disconnected"
        self.regions: RegionTable | None = None
        self.counters = {"maps": 0, "unmaps": 0, "resets": 0, "connections": 0}
        #: refusals by the errno they were answered with (EEXIST, EINVAL, ...); their sum
        #: is the `refused` counter status reports
        self.refusals: collections.Counter[str] = collections.Counter()
        #: from a SHMEM request read to its answer sent, for the requests that ask one
        self.ack_latency = LatencyHistogram()
        self._main: Channel | None = None
        self._main_lock = threading.Lock()
        self._backend: Channel | None = None
        self._backend_thread: threading.Thread | None = None
        #: the socket pair of a backend channel offered but not yet acked
        self._offered: tuple[socket.socket, socket.socket] | None = None
        self._listener: socket.socket | None = None
        #: what a profile that starts the device gives it as guest RAM
        self._guest_ram: GuestRam | None = None
        #: held while a backend-channel request is handled (judged, done, answered,
        #: announced) and while the device is reset: neither happens inside the other
        self._shmem_lock = threading.Lock()

    @property
    def negotiated(self) -> Negotiated:
        return self.session.negotiated

    @property
    def listening(self) -> bool:
        """Whether its --listen socket is there to take a back-end."""
        return self._listener is not None

    # ------------------------------------------------------------ lifecycle

    def run(self) -> None:
        """Serve back-ends until stopped. Raises OSError if the very first connect fails
        and no --reconnect was asked for."""
        first = True
        try:
            if self.options.listen:
                self._listener = listen_unix(self.options.listen)
                log.info("listening on %s for a back-end", self.options.listen)
            while not self.stopper.stopped:
                sock = self._open(first)
                first = False
                if sock is None:
                    if self.options.connect and self.options.reconnect is None:
                        log.info(
                            "disconnected; not reconnecting (no --reconnect); waiting for stop"
                        )
                        self.stopper.wait()
                    continue
                self._session(sock)
                if self.stopper.stopped:
                    break
                if self.options.connect and self.options.reconnect is None:
                    log.info("back-end gone; staying up disconnected (no --reconnect)")
                    self.stopper.wait()
        finally:
            self._teardown()

    def stop(self) -> None:
        self.stopper.stop()
        main = self._main
        if main is not None:
            main.shutdown()

    def _open(self, first: bool) -> socket.socket | None:
        if self._listener is not None:
            if not self.stopper.wait_readable(self._listener, None):
                return None
            sock, _ = self._listener.accept()
            return sock
        path = self.options.connect
        assert path is not None
        while True:
            try:
                return connect_unix(path)
            except OSError as exc:
                hint = f"cannot connect to {path}: {exc.strerror}"
                if self.options.reconnect is None:
                    if first:
                        raise OSError(
                            exc.errno,
                            f"{hint}; is a back-end listening there? "
                            f"(e.g. python -m backend_sim --listen {path})",
                        ) from exc
                    return None
                log.info("%s; retrying in %gs", hint, self.options.reconnect)
                self._set_state(Event.RECONNECTING, retry_in=self.options.reconnect)
            if self.stopper.wait(self.options.reconnect):
                return None

    def _session(self, sock: socket.socket) -> None:
        main = Channel(sock, ChannelKind.MAIN, replies=True)
        main.set_send_timeout(self.options.send_timeout)
        main.trace, main.trace_role = self.events, "frontend"
        self._main = main
        # the state first: a new connection's count must never sit beside the state of
        # the last one ("disconnected" would read as this one over already)
        self._set_state(Event.HANDSHAKE, profile=self.session.profile.name)
        self.counters["connections"] += 1
        reason = "back-end closed the connection"
        try:
            self._handshake(main)
            neg = self.negotiated
            log.info(
                "connected: SHMEM %s, %d regions, REPLY_ACK %s",
                "on" if neg.shmem else "off",
                len(self.regions.regions) if neg.shmem and self.regions is not None else 0,
                "on" if neg.reply_ack else "off",
            )
            self._set_state(Event.CONNECTED)
            reason = self._supervise(main)
        except (ChannelError, WireError, HandshakeError, ShmemSetupError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            log.error("connection ended: %s", reason)
        except Exception as exc:  # a bug must cost the connection, never the daemon
            reason = f"internal error: {exc!r}"
            log.exception("connection ended by an internal error")
        finally:
            self._drop_connection(reason)

    def _supervise(self, main: Channel) -> str:
        """Watch the idle main channel: the back-end only ever replies, so anything
        readable while no request is waiting is EOF or a protocol violation."""
        while not self.stopper.stopped:
            if not self.stopper.wait_readable(main.sock, None):
                return "stopped"
            with self._main_lock:
                if not main.wait_readable(0):
                    continue  # a request in flight took its reply
                try:
                    msg = main.recv()
                except ChannelClosed:
                    return "back-end closed the main channel"
                close_fds(msg.fds)
                raise HandshakeError(f"unsolicited {msg.name} reply on the main channel")
        return "stopped"

    def _drop_connection(self, reason: str) -> None:
        self._forget_offered()
        backend, self._backend = self._backend, None
        if backend is not None:
            backend.shutdown()
        if (
            self._backend_thread is not None
            and self._backend_thread is not threading.current_thread()
        ):
            self._backend_thread.join(5)
        self._backend_thread = None
        if backend is not None:
            backend.close()
        with self._main_lock:
            main, self._main = self._main, None
            if main is not None:
                main.close()
        dropped = self.regions.reset() if self.regions is not None else 0
        if dropped:
            log.info("dropped %d mappings (%s)", dropped, reason)
        self.session.negotiated = Negotiated()
        self._set_state(Event.DISCONNECTED, reason=reason, dropped=dropped)

    def _teardown(self) -> None:
        if self.regions is not None:
            self.regions.close()
            self.regions = None
        if self._guest_ram is not None:
            self._guest_ram.close()
            self._guest_ram = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                os.unlink(self.options.listen or "")

    def _set_state(self, event: Event, **data: Any) -> None:
        """Enter the state this event announces (status says it in lower case)."""
        self.state = state_named(event)
        if self.events.active:
            self.events.emit(event, data)

    # ------------------------------------------------------------ main channel

    def exchange(self, out: Outgoing) -> Message | None:
        """Send one main-channel request and wait for its reply, if one is owed; the
        session judges the reply (HandshakeError if it does not answer `out`)."""
        with self._main_lock:
            main = self._main
            if main is None:
                raise ChannelError("not connected to a back-end")
            main.send(out.encode(), out.fds)
            if not self.session.expects_reply(out):
                return None
            reply = main.recv(timeout=self.options.reply_timeout)
            close_fds(reply.fds)
            return self.session.check_reply(out, reply)

    def _drive(self, steps: Generator[Step, Fed, T]) -> T:
        """Carry out a session's sequence of requests and effects; return its result."""
        return drive(steps, self._act)

    def _act(self, step: Step) -> Fed:
        match step:
            case Outgoing():
                reply = self.exchange(step)
                if step.request == FrontendReq.SET_BACKEND_REQ_FD:
                    self._start_backend_channel()
                return reply
            case NeedBackendChannel():
                return self._offer_backend_channel()
            case Layout(config):
                self._setup_regions(config)
            case GuestMemory(size):
                if self._guest_ram is None:
                    self._guest_ram = GuestRam(size)
                return self._guest_ram.fd, self._guest_ram.base
            case DropMappings():
                if self.regions is not None:
                    self.regions.reset()
            case Note(text, routine):
                log.log(logging.INFO if routine else logging.WARNING, "%s", text)
        return None

    def _handshake(self, main: Channel) -> None:
        session = self.session
        steps = session.handshake() if self.faults is None else self.faults.handshake(session)
        neg = self._drive(steps)
        log.info(
            "back-end offers %s; acked %s",
            ",".join(feature_names(neg.offered, self.options.shmem_bit)) or "nothing",
            ",".join(feature_names(neg.protocol_features, self.options.shmem_bit)) or "nothing",
        )

    def get_shmem_config(self) -> ShmemConfig:
        """Send GET_SHMEM_CONFIG now and return the decoded answer."""
        return self._drive(self.session.get_shmem_config())

    def _setup_regions(self, config: ShmemConfig) -> None:
        sizes = config.regions()
        if self.regions is not None and self.regions.sizes == sizes:
            return  # same layout as the last peer: keep the reservations
        if self.regions is not None:
            self.regions.close()
            self.regions = None
        self.regions = RegionTable(
            sizes,
            max_per_region=self.options.max_per_region,
            max_total=self.options.max_total,
            max_reserve=self.options.max_reserve,
        )
        for region in self.regions.regions.values():
            log.info("region %d: %s reserved at %#x", region.shmid, hex(region.size), region.base)

    def _offer_backend_channel(self) -> int:
        """A fresh socket pair; the fd of the end the back-end gets, to send it. A channel
        still in use (a profile that makes a fresh one at each activation) is ended
        first: the new one is the only one served from then on."""
        self._retire_backend_channel()
        self._forget_offered()
        self._offered = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        return self._offered[1].fileno()

    def _forget_offered(self) -> None:
        offered, self._offered = self._offered, None
        for sock in offered or ():
            sock.close()

    def _start_backend_channel(self) -> None:
        """SET_BACKEND_REQ_FD went through: serve our end, let go of theirs."""
        assert self._offered is not None
        ours, theirs = self._offered
        self._offered = None
        theirs.close()
        channel = Channel(ours, ChannelKind.BACKEND, replies=False,
                          busy_poll=self.options.busy_poll, read_ahead=True)  # fmt: skip
        channel.set_send_timeout(self.options.send_timeout)
        channel.trace, channel.trace_role = self.events, "frontend"
        self._backend = channel
        self._backend_thread = threading.Thread(
            target=profiled(self._serve_backend, "frontend-backend-channel"),
            args=(channel,),
            name="backend-channel",
            daemon=True,
        )
        self._backend_thread.start()

    def reset(self) -> tuple[int, str]:
        """Reset the device as the profile does (strict: drop every mapping, then tell
        the back-end). Returns (mappings dropped, the first message it took)."""
        with self._shmem_lock:  # no map between: what is gone is what the reset dropped
            held = self.regions.count if self.regions is not None else 0
            self.counters["resets"] += 1
            via = self._drive(self.session.reset())
            dropped = held - (self.regions.count if self.regions is not None else 0)
        log.info("reset with %s: dropped %d mappings", via, dropped)
        if self.events.active:
            self.events.emit(Event.RESET, {"dropped": dropped, "via": via})
        return dropped, via

    def _retire_backend_channel(self) -> None:
        """End the backend channel in use, to serve a new one in its place: its thread
        sees the end, and closes it (not waited for: it may wait for a reset under way)."""
        old, self._backend = self._backend, None
        self._backend_thread = None
        if old is not None:
            old.shutdown()

    # ------------------------------------------------------------ backend channel

    def _serve_backend(self, channel: Channel) -> None:
        reason = "back-end closed the backend channel"
        try:
            while True:
                msg = channel.recv()
                with self._shmem_lock:
                    self._handle_backend(channel, msg, time.perf_counter())
        except ChannelClosed:
            pass
        except (ChannelError, WireError, HandshakeError) as exc:
            reason = f"backend channel: {exc}"
            log.error("%s; closing the connection", reason)
        except Exception as exc:  # a bug must cost the connection, never the daemon
            reason = f"backend channel: internal error {exc!r}"
            log.exception("backend channel: internal error; closing the connection")
        if self._backend is channel:  # not a disconnect we started ourselves
            log.info("%s", reason)
            main = self._main
            if main is not None:
                main.shutdown()  # the supervisor sees EOF and drops the connection
        elif self._backend is not None:  # retired for a fresh one: nobody else closes it
            channel.close()

    def _handle_backend(self, channel: Channel, msg: Message, read_at: float) -> None:
        faults = self.faults
        refusal: Refusal | None = None
        # the fd goes before the answer (whoever reads the answer finds it closed), but
        # where the profile announces the mapping with it (QEMU's ADD_MEM_REG)
        announces = self._announces
        fds = msg.fds  # closed exactly once, whichever way this ends
        try:
            if faults is not None and faults.does_nothing(msg):
                result = result_from_errno(5)  # the fault: nothing is done
            else:
                result, refusal = self._shmem(msg)
                if faults is not None:
                    result = faults.result(self.regions, msg, refusal, result)
            if not announces:
                close_fds(fds)
                fds = ()
            if faults is None:
                out = self.session.answer(msg, result)
                if out is not None:
                    channel.send(out.encode())
                    self.ack_latency.observe(time.perf_counter() - read_at)
            else:
                for out in faults.answers(self.session, msg, result):
                    channel.send(out.encode())
            if announces and result == 0:
                self._announce(msg)
        finally:
            close_fds(fds)

    def _announce(self, msg: Message) -> None:
        """Tell the back-end of a mapping made or gone as the profile does (QEMU: a
        memory-table change on the main channel, whose ack it waits for before it
        reads the backend channel again)."""
        m, table = msg.payload, self.regions
        if table is None or not isinstance(m, ShmemMap) or m.shmid not in table.regions:
            return
        out = self.session.announcement(msg, table.address_of(m.shmid, m.shm_offset))
        if out is not None:
            self.exchange(out)

    def _shmem(self, msg: Message) -> tuple[int, Refusal | None]:
        """Carry out one backend-channel request: its result, and why it was refused."""
        is_map = msg.request == BackendReq.SHMEM_MAP
        try:
            m = self.session.admit_shmem(msg)
            table = self.regions
            if table is None:  # SHMEM negotiated but no layout yet: nothing can be mapped
                raise ShmemRefused(Refusal.NO_REGION, "no region layout was received")
            if is_map:
                mapping = table.map(m, msg.fds[0])
                self.counters["maps"] += 1
            else:
                mapping = table.unmap(m)
                self.counters["unmaps"] += 1
        except ShmemRefused as exc:
            self._refused(msg, exc)
            return self.session.result(exc), exc.reason
        if self.events.active:
            if is_map:  # the fd is still open here: name its file for whoever watches
                with contextlib.suppress(OSError):
                    mapping = mapping._replace(file=os.readlink(f"/proc/self/fd/{msg.fds[0]}"))
            self.events.emit(
                Event.MAPPED if is_map else Event.UNMAPPED, mapping.to_json(time.time())
            )
        return 0, None

    def _refused(self, msg: Message, exc: ShmemRefused) -> None:
        self.refusals[exc.errno_name] += 1
        m = msg.payload
        if not isinstance(m, ShmemMap):  # not a SHMEM request at all
            log.warning("%s; refusing it", exc.detail)
            return
        where = hex_range(m.shm_offset, m.len)
        log.warning("refused %s shmid %d %s: %s (%s)", msg.name, m.shmid, where, exc.detail,
                    exc.errno_name)  # fmt: skip
        if self.events.active:
            self.events.emit(Event.REFUSED, {
                "request": msg.name, "shmid": m.shmid, "shm_offset": m.shm_offset,
                "len": m.len, "reason": exc.reason.name, "errno": exc.errno_name,
                "detail": exc.detail,
            })  # fmt: skip
