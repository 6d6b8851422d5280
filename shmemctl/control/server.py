"""The control socket a daemon serves, in QMP (docs/control.md): many clients at
once, each with its own reader and writer thread and a bounded queue, so a slow
or hostile client costs only itself."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import socket
import threading
from collections.abc import Iterable
from typing import Any

from .. import __version__
from ..daemon import listen_unix, peer_credentials
from ..events import NAMES, TRACE, EventHub, known_names
from .protocol import (
    MAX_QUEUED,
    Arg,
    Command,
    ControlError,
    ErrorClass,
    RequestStream,
    RequestTooLong,
    decode_request,
    encode_line,
)

log = logging.getLogger("control")

#: How long a client that has stopped sending may take to read its last answers.
_FLUSH_TIMEOUT = 30.0


def peer_allowed(uid: int) -> bool:
    """Who may drive a daemon: its own user, or root."""
    return uid == os.getuid() or uid == 0


class _Client:
    def __init__(self, server: ControlServer, sock: socket.socket, pid: int, uid: int) -> None:
        self.server = server
        self.sock = sock
        self.pid = pid
        self.uid = uid
        self.out: queue.Queue[bytes | None] = queue.Queue(MAX_QUEUED)
        self.closed = threading.Event()
        self.subscribed = False
        #: qmp_capabilities has been sent: until then it is the only command served
        self.negotiated = False
        #: why this client may do nothing at all (its uid), told at its first request
        self.denied: str | None = None

    def start(self) -> None:
        threading.Thread(target=self._write_loop, daemon=True, name="control-out").start()
        threading.Thread(target=self._read_loop, daemon=True, name="control-in").start()

    def send(self, obj: dict[str, Any]) -> None:
        """An event (or the greeting): a subscriber that lets MAX_QUEUED of them pile up
        unread is too slow, and is dropped rather than let the daemon wait on it."""
        if self.closed.is_set():
            return
        try:
            self.out.put_nowait(encode_line(obj))
        except queue.Full:
            log.warning("control client pid %d reads too slowly; dropping it", self.pid)
            self.close()

    def answer(self, obj: dict[str, Any]) -> None:
        """An answer, from the thread that reads this client's requests: when its queue
        is full, that thread waits for the client to read, so a client that sends many
        requests at once is slowed by its own socket, never dropped; one that reads
        nothing for _FLUSH_TIMEOUT is."""
        if self.closed.is_set():
            return
        try:
            self.out.put(encode_line(obj), timeout=_FLUSH_TIMEOUT)
        except queue.Full:
            log.warning("control client pid %d reads nothing; dropping it", self.pid)
            self.close()

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        if self.subscribed:
            self.server.events.unsubscribe(self.send)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(queue.Full):
            self.out.put_nowait(None)  # wakes the writer
        self.server._forget(self)

    def _write_loop(self) -> None:
        try:
            while True:
                data = self.out.get()
                if data is None or self.closed.is_set():
                    break
                self.sock.sendall(data)
        except OSError:
            pass
        finally:
            self.close()
            self.sock.close()

    def _read_loop(self) -> None:
        requests = RequestStream()
        try:
            while not self.closed.is_set():
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                for request in requests.feed(chunk):
                    if self.denied is not None:  # told why, at its first request; no more
                        self.answer({**ControlError(self.denied).answer(), **_echo_of(request)})
                        return
                    if isinstance(request, RequestTooLong):
                        raise request  # answered below, and the client dropped
                    if isinstance(request, ControlError):
                        self.answer(request.answer())
                    else:
                        self.server._handle(self, request)
        except ControlError as exc:
            log.warning("control client pid %d: %s", self.pid, exc.desc)
            self.answer(exc.answer())
        except OSError:
            pass
        finally:
            self.finish()

    def finish(self) -> None:
        """The client sent its last line (or broke the protocol): every answer already
        queued still goes out, then the writer closes the connection."""
        if self.closed.is_set():
            return
        try:
            self.out.put(None, timeout=_FLUSH_TIMEOUT)
        except queue.Full:  # it does not read what it is sent: nothing more is owed
            self.close()


NEGOTIATE = "qmp_capabilities"


def qmp_version() -> dict[str, Any]:
    """shmemctl's version as QMP's greeting and query-version carry a version."""
    numbers = [int(n) for n in re.findall(r"\d+", __version__)[:3]]
    major, minor, micro = (*numbers, 0, 0, 0)[:3]
    return {
        "qemu": {"major": major, "minor": minor, "micro": micro},
        "package": f"shmemctl {__version__}",
    }


class ControlServer:
    def __init__(self, path: str, role: str, events: EventHub, commands: Iterable[Command]) -> None:
        self.path = path
        self.role = role
        self.events = events
        self.commands: dict[str, Command] = {c.name: c for c in commands}
        # the commands the server serves itself (`run` is None): they act on the connection
        for builtin in (
            Command(
                NEGOTIATE,
                None,
                {"enable": Arg(list, required=False, help="capabilities to enable (none offered)")},
                help="leave capabilities negotiation: the first command of every connection",
            ),
            Command("query-commands", None, help="the commands this daemon serves"),
            Command("query-version", None, help="shmemctl's version, as QMP carries one"),
            Command(
                "subscribe",
                None,
                {
                    "events": Arg(
                        list,
                        required=False,
                        help=f"event names ({known_names()}); all but {TRACE.value!r} if absent",
                    )
                },
                help="receive events on this connection",
            ),
        ):
            self.commands[builtin.name] = builtin
        self._clients: set[_Client] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None

    def start(self) -> None:
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._listener = listen_unix(self.path, 0o600)
        threading.Thread(target=self._accept_loop, daemon=True, name="control-accept").start()
        log.info("control socket %s", self.path)

    def __enter__(self) -> ControlServer:
        """Serving from here to the end of the block: a daemon's lifetime."""
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            client.close()

    def _forget(self, client: _Client) -> None:
        with self._lock:
            self._clients.discard(client)

    def _accept_loop(self) -> None:
        while self._listener is not None:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            pid, uid, _gid = peer_credentials(sock)
            client = _Client(self, sock, pid, uid)
            if not peer_allowed(uid):
                log.warning("control: refused pid %d of uid %d (not uid %d or root)", pid, uid,
                            os.getuid())  # fmt: skip
                # told as the answer to its first request, where a QMP client reads it
                client.denied = (
                    f"uid {uid} may not use this {self.role}'s control socket; "
                    f"run as uid {os.getuid()} or root"
                )
                sock.settimeout(_FLUSH_TIMEOUT)  # and it may not hold the connection open
            with self._lock:
                self._clients.add(client)
            client.send({"QMP": {"version": qmp_version(), "capabilities": []}})
            client.start()

    def _handle(self, client: _Client, text: bytes) -> None:
        request_id: object = _NO_ID
        try:
            request = decode_request(text)
            if not isinstance(request, dict):
                raise ControlError("QMP input must be a JSON object")
            request_id = request.get("id", _NO_ID)
            name = self._command_name(request)
            command = self._command(client, name)
            arguments = command.check(request.get("arguments"))
            if command.run is None:
                result = self._builtin(client, name, arguments)
            else:
                if command.mutating:
                    log.info("control: %s %s by pid %d", name, json.dumps(arguments), client.pid)
                result = command.run(**arguments)
            answer: dict[str, Any] = {"return": {} if result is None else result}
        except ControlError as exc:
            answer = exc.answer()
        except Exception as exc:  # a bug answers as an error; the daemon carries on
            log.exception("control command failed")
            answer = ControlError(f"internal error: {exc!r}").answer()
        client.answer({**answer, **_echo(request_id)})

    @staticmethod
    def _command_name(request: dict[str, Any]) -> str:
        if "exec-oob" in request:
            raise ControlError(
                "out-of-band execution is not offered (the greeting's capabilities are empty); "
                "send 'execute'"
            )
        name = request.get("execute")
        if not isinstance(name, str):
            raise ControlError("QMP input lacks member 'execute': send {\"execute\": NAME}")
        extra = sorted(set(request) - {"id", "execute", "arguments"})
        if extra:
            raise ControlError(
                f"QMP input member {extra[0]!r} is unexpected; a request has only "
                "'execute', 'arguments' and 'id'"
            )
        return name

    def _command(self, client: _Client, name: str) -> Command:
        """The command a client may run now: QMP serves nothing but the negotiation
        before it, and the negotiation only once."""
        if not client.negotiated and name != NEGOTIATE:
            raise ControlError(
                f"Expecting capabilities negotiation with '{NEGOTIATE}' before {name!r}",
                ErrorClass.NOT_FOUND,
            )
        if client.negotiated and name == NEGOTIATE:
            raise ControlError(
                "Capabilities negotiation is already complete, command ignored",
                ErrorClass.NOT_FOUND,
            )
        command = self.commands.get(name)
        if command is None:
            offered = ", ".join(sorted(self.commands))
            raise ControlError(
                f"The command {name} has not been found on the {self.role}; it has: {offered}",
                ErrorClass.NOT_FOUND,
            )
        return command

    def _builtin(self, client: _Client, name: str, arguments: dict[str, Any]) -> Any:
        if name == NEGOTIATE:
            wanted = arguments.get("enable") or []
            if wanted:
                raise ControlError(
                    f"{NEGOTIATE}: capability {json.dumps(wanted[0])} is not offered; "
                    "this server offers none (send no 'enable')"
                )
            client.negotiated = True
            return {}
        if name == "query-commands":
            return [{"name": n} for n in sorted(self.commands)]
        if name == "query-version":
            return qmp_version()
        return self._subscribe(client, arguments.get("events"))

    def _subscribe(self, client: _Client, names: list[Any] | None) -> dict[str, Any]:
        if names is not None and not all(isinstance(n, str) for n in names):
            raise ControlError("subscribe: 'events' is a list of names")
        unknown = [] if names is None else [n for n in names if n not in NAMES]
        if unknown:
            listed = ", ".join(repr(n) for n in dict.fromkeys(unknown))
            raise ControlError(f"subscribe: no event {listed}; the events are: {known_names()}")
        if client.subscribed:
            self.events.unsubscribe(client.send)
        self.events.subscribe(client.send, names)
        client.subscribed = True
        return {"events": f"all but {TRACE.value}" if names is None else names}


def _echo_of(request: bytes | ControlError) -> dict[str, Any]:
    """The `id` echo for a request that is answered without being served."""
    if isinstance(request, ControlError):
        return {}
    with contextlib.suppress(ControlError):
        decoded = decode_request(request)
        if isinstance(decoded, dict):
            return _echo(decoded.get("id", _NO_ID))
    return {}


#: A request without an `id` (None would be one: `"id": null`).
_NO_ID = object()


def _echo(request_id: object) -> dict[str, Any]:
    """QMP answers with the request's `id`, whatever JSON value it was (null too), if it
    had one."""
    return {} if request_id is _NO_ID else {"id": request_id}
