"""The front-end endpoint: what a VMM does for a vhost-user device with shared memory.

Threads: the caller's thread runs `run()` (connect or accept, handshake, then
supervise the main channel until it ends); one thread serves the backend
channel, strictly in order, replying only once a mapping is really in place
or really gone. Requests on the main channel (reset, GET_SHMEM_CONFIG) may
come from any thread and are serialised by one lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

from ..channel import DEFAULT_BUSY_POLL, Channel, ChannelClosed, ChannelError, close_fds
from ..daemon import Stopper, connect_unix, listen_unix, profiled
from ..events import EventHub
from ..shmem import Refusal, RegionTable, ShmemRefused, ShmemSetupError
from ..shmem.region import DEFAULT_MAX_PER_REGION, DEFAULT_MAX_RESERVE, DEFAULT_MAX_TOTAL
from ..sizes import hex_range
from ..wire import (
    BackendReq,
    ChannelKind,
    FrontendReq,
    Message,
    ShmemConfig,
    ShmemMap,
    WireError,
    encode,
    encode_u64_reply,
    feature_names,
    result_from_errno,
)
from ..wire.constants import (
    SHMEM_BIT,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    ProtocolFeature,
    check_shmem_bit,
)
from ..wire.messages import spec_of

log = logging.getLogger("frontend")

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
    """The back-end answered the handshake in a way we cannot go on from."""


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
    faults: frozenset[str] = frozenset()


@dataclass
class Negotiated:
    features: int = 0
    protocol_features: int = 0
    shmem: bool = False
    reply_ack: bool = False
    queues: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


class Frontend:
    def __init__(self, options: FrontendOptions, events: EventHub | None = None) -> None:
        if bool(options.connect) == bool(options.listen):
            raise ValueError("give exactly one of --connect PATH or --listen PATH")
        self.options = options
        self.shmem_mask = 1 << check_shmem_bit(options.shmem_bit)
        self.faults = options.faults
        if self.faults:
            log.warning("deliberate faults on: %s", ", ".join(sorted(self.faults)))
        self.events = events or EventHub()
        self.stopper = Stopper()
        self.state = "disconnected"
        self.negotiated = Negotiated()
        self.regions: RegionTable | None = None
        self.counters = {"maps": 0, "unmaps": 0, "refused": 0, "resets": 0, "connections": 0}
        self._main: Channel | None = None
        self._main_lock = threading.Lock()
        self._backend: Channel | None = None
        self._backend_thread: threading.Thread | None = None
        self._listener: socket.socket | None = None

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
                        self.stopper.event.wait()
                    continue
                self._session(sock)
                if self.stopper.stopped:
                    break
                if self.options.connect and self.options.reconnect is None:
                    log.info("back-end gone; staying up disconnected (no --reconnect)")
                    self.stopper.event.wait()
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
                self._set_state("reconnecting", retry_in=self.options.reconnect)
            if self.stopper.wait(self.options.reconnect):
                return None

    def _session(self, sock: socket.socket) -> None:
        main = Channel(sock, ChannelKind.MAIN, replies=True)
        main.set_send_timeout(self.options.send_timeout)
        main.trace, main.trace_role = self.events, "frontend"
        self._main = main
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
            self._set_state("connected")
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
        self.negotiated = Negotiated()
        self._set_state("disconnected", reason=reason, dropped=dropped)

    def _teardown(self) -> None:
        if self.regions is not None:
            self.regions.close()
            self.regions = None
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(OSError):
                os.unlink(self.options.listen or "")

    def _set_state(self, state: str, **data: Any) -> None:
        self.state = state
        if self.events.active:
            self.events.emit(state, data)

    # ------------------------------------------------------------ main channel

    def request(
        self,
        req: FrontendReq,
        payload: Any = None,
        fds: tuple[int, ...] = (),
        *,
        ack: bool = False,
    ) -> Message | None:
        """Send one main-channel request and wait for its reply, if one is owed:
        always for ids with their own reply, else an ack when `ack` and REPLY_ACK."""
        with self._main_lock:
            main = self._main
            if main is None:
                raise ChannelError("not connected to a back-end")
            own_reply = spec_of(ChannelKind.MAIN, req).own_reply
            need_ack = ack and self.negotiated.reply_ack and not own_reply
            data = encode(ChannelKind.MAIN, req, payload, need_reply=need_ack)
            if req == FrontendReq.SET_OWNER and "bad-request-flags" in self.faults:
                data = data[:4] + struct.pack("<I", 0x11 | (0x8 if need_ack else 0)) + data[8:]
            main.send(data, fds)
            if not (own_reply or need_ack):
                return None
            reply = main.recv(timeout=self.options.reply_timeout)
            close_fds(reply.fds)
            if reply.request != req:
                raise HandshakeError(f"asked {req.name}, the back-end answered {reply.name}")
            if need_ack and reply.payload != 0:
                raise HandshakeError(f"{req.name} failed: the back-end replied {reply.payload}")
            return reply

    def _handshake(self, main: Channel) -> None:
        neg = self.negotiated = Negotiated()
        self._set_state("handshake")
        features = self._get_u64(FrontendReq.GET_FEATURES)
        if "backend-channel-first" in self.faults:
            self._open_backend_channel()
        if not features & VHOST_USER_F_PROTOCOL_FEATURES:
            log.warning(
                "back-end offers no protocol features (virtio bit 30): serving without SHMEM"
            )
        else:
            offered = self._get_u64(FrontendReq.GET_PROTOCOL_FEATURES)
            ours = IMPLEMENTED | self.shmem_mask
            if "ack-gpa" in self.faults:
                ours |= ProtocolFeature.GPA_ADDRESSES
            if "no-reply-ack" in self.faults:
                ours &= ~ProtocolFeature.REPLY_ACK
            acked = offered & ours
            if "ack-unoffered" in self.faults:
                acked |= ProtocolFeature.INBAND_NOTIFICATIONS
            self.request(FrontendReq.SET_PROTOCOL_FEATURES, acked)
            neg.protocol_features = acked
            neg.reply_ack = bool(acked & ProtocolFeature.REPLY_ACK)
            neg.shmem = bool(acked & self.shmem_mask)
            log.info(
                "back-end offers %s; acked %s",
                ",".join(feature_names(offered, self.options.shmem_bit)) or "nothing",
                ",".join(feature_names(acked, self.options.shmem_bit)) or "nothing",
            )
            if not neg.shmem:
                log.warning(
                    "back-end does not offer SHMEM (protocol feature bit %d): serving without "
                    "shared memory regions",
                    self.options.shmem_bit,
                )
            elif not neg.reply_ack:
                log.warning("SHMEM without REPLY_ACK: the back-end can never learn a map's outcome")
            if acked & ProtocolFeature.MQ:
                neg.queues = self._get_u64(FrontendReq.GET_QUEUE_NUM)
        self.request(FrontendReq.SET_OWNER, ack=True)
        if neg.shmem:
            self._setup_regions(self.get_shmem_config())
            if "ask-config-twice" in self.faults:
                self.get_shmem_config()
        if neg.protocol_features & ProtocolFeature.BACKEND_REQ and self._backend is None:
            self._open_backend_channel()
        if "exit-mid-handshake" in self.faults:
            log.error("fault exit-mid-handshake: exiting before SET_FEATURES")
            os._exit(1)
        neg.features = features & (VHOST_USER_F_PROTOCOL_FEATURES | VIRTIO_F_VERSION_1)
        self.request(FrontendReq.SET_FEATURES, neg.features, ack=True)

    def _get_u64(self, req: FrontendReq) -> int:
        reply = self.request(req)
        assert reply is not None
        if not isinstance(reply.payload, int):
            raise HandshakeError(f"{req.name} reply has no u64 payload")
        return reply.payload

    def get_shmem_config(self) -> ShmemConfig:
        """Send GET_SHMEM_CONFIG now and return the decoded answer."""
        if not self.negotiated.shmem:
            raise HandshakeError("SHMEM is not negotiated with this back-end")
        reply = self.request(FrontendReq.GET_SHMEM_CONFIG)
        assert reply is not None
        config = reply.payload
        if not isinstance(config, ShmemConfig):
            raise HandshakeError("GET_SHMEM_CONFIG reply is not a VhostUserShMemConfig")
        in_use = len(config.regions())
        if config.nregions != in_use:
            log.warning(
                "GET_SHMEM_CONFIG: nregions is %d but %d sizes are non-zero; the sizes win",
                config.nregions,
                in_use,
            )
        return config

    def _setup_regions(self, config: ShmemConfig) -> None:
        sizes = config.regions()
        if self.regions is not None and self.regions.sizes == sizes:
            return  # same layout as the last peer: keep the reservations
        if self.regions is not None:
            self.regions.close()
            self.regions = None
        skip = {Refusal.OVERLAP} if "skip-overlap-check" in self.faults else set()
        if "skip-alignment-check" in self.faults:
            skip.add(Refusal.MISALIGNED)
        self.regions = RegionTable(
            sizes,
            max_per_region=self.options.max_per_region,
            max_total=self.options.max_total,
            max_reserve=self.options.max_reserve,
            skip_checks=frozenset(skip),
        )
        for region in self.regions.regions.values():
            log.info("region %d: %s reserved at %#x", region.shmid, hex(region.size), region.base)

    def _open_backend_channel(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            fds = (theirs.fileno(),) * (2 if "backend-fd-twice" in self.faults else 1)
            self.request(FrontendReq.SET_BACKEND_REQ_FD, None, fds, ack=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        channel = Channel(
            ours, ChannelKind.BACKEND, replies=False, busy_poll=self.options.busy_poll
        )
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
        """Reset the device: drop every mapping, then tell the back-end. Returns
        (mappings dropped, the message used)."""
        dropped = self.regions.reset() if self.regions is not None else 0
        self.counters["resets"] += 1
        pf = self.negotiated.protocol_features
        if pf & ProtocolFeature.RESET_DEVICE:
            req = FrontendReq.RESET_DEVICE
            self.request(req, ack=True)
        elif pf & ProtocolFeature.STATUS:
            req = FrontendReq.SET_STATUS
            self.request(req, 0, ack=True)
        else:
            req = FrontendReq.RESET_OWNER
            self.request(req, ack=True)
        log.info("reset with %s: dropped %d mappings", req.name, dropped)
        if self.events.active:
            self.events.emit("reset", {"dropped": dropped, "via": req.name})
        return dropped, req.name

    # ------------------------------------------------------------ backend channel

    def _serve_backend(self, channel: Channel) -> None:
        reason = "back-end closed the backend channel"
        try:
            while True:
                self._handle_backend(channel, channel.recv())
        except ChannelClosed:
            pass
        except (ChannelError, WireError) as exc:
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

    def _handle_backend(self, channel: Channel, msg: Message) -> None:
        req = msg.request
        try:
            if req == BackendReq.SHMEM_MAP or req == BackendReq.SHMEM_UNMAP:
                result = self._shmem(msg)
            else:
                log.warning("backend channel: %s is not supported; refusing it", msg.name)
                result = result_from_errno(Refusal.NOT_NEGOTIATED.errno)
        finally:
            close_fds(msg.fds)
        if self.faults:
            self._reply_with_faults(channel, msg, result)
        elif msg.need_reply and self.negotiated.reply_ack:
            channel.send(encode_u64_reply(req, result))

    def _reply_with_faults(self, channel: Channel, msg: Message, result: int) -> None:
        """The reply path with deliberate faults (see shmemctl.faults)."""
        faults = self.faults
        owed = msg.need_reply and self.negotiated.reply_ack
        if "reply-ok-always" in faults:
            result = 0
        elif "reply-fail-always" in faults:
            result = result_from_errno(5)
        if "no-reply" in faults or not (owed or "reply-always" in faults):
            return
        data = encode_u64_reply(msg.request, result)
        if "stale-reply" in faults:  # the request's own payload sent back as the "result"
            body = encode(ChannelKind.BACKEND, msg.request, msg.payload)[12:]
            data = struct.pack("<III", msg.request, 0x5, len(body)) + body
        if "bad-reply-flags" in faults:
            data = data[:4] + struct.pack("<I", 0xD) + data[8:]
        channel.send(data)
        if "reply-twice" in faults:
            channel.send(data)

    def _shmem(self, msg: Message) -> int:
        m = msg.payload
        assert isinstance(m, ShmemMap)
        if self.faults and (
            "reply-fail-always" in self.faults
            or ("ignore-unasked" in self.faults and not msg.need_reply)
        ):
            return result_from_errno(5)  # the fault: nothing is done
        is_map = msg.request == BackendReq.SHMEM_MAP
        try:
            if not self.negotiated.shmem or self.regions is None:
                raise ShmemRefused(
                    Refusal.NOT_NEGOTIATED,
                    f"SHMEM (protocol feature bit {self.options.shmem_bit}) was not negotiated",
                )
            if is_map:
                if len(msg.fds) != 1:
                    raise ShmemRefused(
                        Refusal.BAD_FD_COUNT,
                        f"SHMEM_MAP carries {len(msg.fds)} fds; it needs exactly one",
                    )
                mapping = self.regions.map(m, msg.fds[0])
                self.counters["maps"] += 1
            else:
                mapping = self.regions.unmap(m)
                self.counters["unmaps"] += 1
        except ShmemRefused as exc:
            self.counters["refused"] += 1
            log.warning(
                "refused %s shmid %d %s: %s (%s)",
                msg.name,
                m.shmid,
                hex_range(m.shm_offset, m.len),
                exc.detail,
                exc.errno_name,
            )
            if self.events.active:
                self.events.emit(
                    "refused",
                    {
                        "request": msg.name,
                        "shmid": m.shmid,
                        "shm_offset": m.shm_offset,
                        "len": m.len,
                        "reason": exc.reason.name,
                        "errno": exc.errno_name,
                        "detail": exc.detail,
                    },
                )
            return result_from_errno(exc.errno)
        if self.events.active:
            data = {
                "shmid": mapping.shmid,
                "shm_offset": mapping.shm_offset,
                "len": mapping.len,
                "fd_offset": mapping.fd_offset,
                "writable": mapping.writable,
            }
            if is_map:  # the fd is still open here: name its file for whoever watches
                with contextlib.suppress(OSError):
                    data["file"] = os.readlink(f"/proc/self/fd/{msg.fds[0]}")
            self.events.emit("mapped" if is_map else "unmapped", data)
        return 0
