"""The control socket a daemon serves: many clients at once, each with its own
reader and writer thread and a bounded queue, so a slow or hostile client
costs only itself."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import socket
import threading
from collections.abc import Iterable
from typing import Any

from .. import __version__
from ..daemon import listen_unix, peer_credentials
from ..events import NAMES, TRACE, EventHub, known_names
from .protocol import (
    MAX_LINE,
    MAX_QUEUED,
    Arg,
    Command,
    ControlError,
    ErrorClass,
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

    def start(self) -> None:
        threading.Thread(target=self._write_loop, daemon=True, name="control-out").start()
        threading.Thread(target=self._read_loop, daemon=True, name="control-in").start()

    def send(self, obj: dict[str, Any]) -> None:
        if self.closed.is_set():
            return
        try:
            self.out.put_nowait(encode_line(obj))
        except queue.Full:
            log.warning("control client pid %d reads too slowly; dropping it", self.pid)
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
        buf = b""
        try:
            while not self.closed.is_set():
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if len(line) > MAX_LINE:
                        raise ControlError(ErrorClass.BAD_REQUEST, "line too long")
                    if line.strip():
                        self.server._handle(self, line)
                if len(buf) > MAX_LINE:
                    raise ControlError(
                        ErrorClass.BAD_REQUEST, f"line longer than {MAX_LINE} bytes; closing"
                    )
        except ControlError as exc:
            log.warning("control client pid %d: %s", self.pid, exc.desc)
            self.send({"error": {"class": exc.error_class, "desc": exc.desc}})
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


class ControlServer:
    def __init__(self, path: str, role: str, events: EventHub, commands: Iterable[Command]) -> None:
        self.path = path
        self.role = role
        self.events = events
        self.commands: dict[str, Command] = {c.name: c for c in commands}
        self.commands["subscribe"] = Command(
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
        )
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
            if not peer_allowed(uid):
                log.warning("control: refused pid %d of uid %d (not uid %d or root)", pid, uid,
                            os.getuid())  # fmt: skip
                with contextlib.suppress(OSError):
                    sock.sendall(
                        encode_line(
                            {
                                "error": {
                                    "class": ErrorClass.DENIED,
                                    "desc": f"uid {uid} may not use this {self.role}'s control "
                                    f"socket; run as uid {os.getuid()} or root",
                                }
                            }
                        )
                    )
                sock.close()
                continue
            client = _Client(self, sock, pid, uid)
            with self._lock:
                self._clients.add(client)
            client.send(
                {
                    "greeting": {
                        "role": self.role,
                        "version": __version__,
                        "pid": os.getpid(),
                        "commands": sorted(self.commands),
                    }
                }
            )
            client.start()

    def _handle(self, client: _Client, line: bytes) -> None:
        request_id = None
        try:
            request = decode_request(line)
            if not isinstance(request, dict):
                raise ControlError(ErrorClass.BAD_REQUEST, "a request is a JSON object")
            request_id = request.get("id")
            name = request.get("execute")
            if not isinstance(name, str):
                raise ControlError(ErrorClass.BAD_REQUEST, "a request needs 'execute': NAME")
            extra = sorted(set(request) - {"id", "execute", "arguments"})
            if extra:
                raise ControlError(ErrorClass.BAD_REQUEST, f"unknown request keys: {extra}")
            command = self.commands.get(name)
            if command is None:
                offered = ", ".join(sorted(self.commands))
                raise ControlError(
                    ErrorClass.NOT_FOUND,
                    f"no command {name!r} on the {self.role}; it has: {offered}",
                )
            arguments = command.check(request.get("arguments"))
            if command.run is None:
                result = self._subscribe(client, arguments.get("events"))
            else:
                if command.mutating:
                    log.info("control: %s %s by pid %d", name, json.dumps(arguments), client.pid)
                result = command.run(**arguments)
            answer: dict[str, Any] = {"return": {} if result is None else result}
        except ControlError as exc:
            answer = {"error": {"class": exc.error_class, "desc": exc.desc}}
        except Exception as exc:  # a bug answers as an error; the daemon carries on
            log.exception("control command failed")
            answer = {"error": {"class": ErrorClass.FAILED, "desc": f"internal error: {exc!r}"}}
        if request_id is not None:
            answer["id"] = request_id
        client.send(answer)

    def _subscribe(self, client: _Client, names: list[Any] | None) -> dict[str, Any]:
        if names is not None and not all(isinstance(n, str) for n in names):
            raise ControlError(ErrorClass.BAD_ARGUMENT, "subscribe: 'events' is a list of names")
        unknown = [] if names is None else [n for n in names if n not in NAMES]
        if unknown:
            listed = ", ".join(repr(n) for n in dict.fromkeys(unknown))
            raise ControlError(
                ErrorClass.BAD_ARGUMENT,
                f"subscribe: no event {listed}; the events are: {known_names()}",
            )
        if client.subscribed:
            self.events.unsubscribe(client.send)
        self.events.subscribe(client.send, names)
        client.subscribed = True
        return {"events": names or "all but message"}
