"""A control-socket client: what the CLI and the TUI use to talk to a daemon."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterable, Iterator
from typing import Any

from .protocol import MAX_ANSWER, ControlError, ErrorClass, encode_line


class DaemonUnreachable(Exception):
    """Nothing answers on the control socket (no daemon, or a dead one)."""


class ControlClient:
    def __init__(self, path: str, timeout: float | None = 30.0) -> None:
        self.path = path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except PermissionError:
            sock.close()
            raise ControlError(
                ErrorClass.DENIED,
                f"no permission to open {path}; run as the daemon's user or root",
            ) from None
        except OSError as exc:
            sock.close()
            raise DaemonUnreachable(f"no daemon answers on {path} ({exc.strerror})") from None
        self.sock = sock
        self._file = sock.makefile("rb")
        self._next_id = 1
        self._pending_events: list[dict[str, Any]] = []
        first = self._read()
        if "error" in first:
            self.close()
            raise ControlError(first["error"]["class"], first["error"]["desc"])
        self.greeting: dict[str, Any] = first.get("greeting", {})

    @property
    def role(self) -> str:
        return str(self.greeting.get("role", "?"))

    def offers(self, command: str) -> bool:
        return command in self.greeting.get("commands", ())

    def _read(self) -> dict[str, Any]:
        try:
            line = self._file.readline(MAX_ANSWER)
        except TimeoutError:
            raise DaemonUnreachable(f"the daemon on {self.path} stopped answering") from None
        except OSError as exc:
            raise DaemonUnreachable(f"lost the daemon on {self.path} ({exc})") from None
        if not line:
            raise DaemonUnreachable(f"the daemon on {self.path} closed the connection")
        try:
            answer = json.loads(line)
        except ValueError:
            raise ControlError(
                ErrorClass.BAD_REQUEST, f"the daemon on {self.path} sent a line that is not JSON"
            ) from None
        if not isinstance(answer, dict):
            raise ControlError(ErrorClass.BAD_REQUEST, f"the daemon on {self.path} sent {answer!r}")
        return answer

    def execute(self, name: str, /, **arguments: Any) -> Any:
        """Run a command; its `return` value, or ControlError with the daemon's reason."""
        request_id = self._next_id
        self._next_id += 1
        request: dict[str, Any] = {"id": request_id, "execute": name}
        if arguments:
            request["arguments"] = arguments
        try:
            self.sock.sendall(encode_line(request))
        except OSError as exc:
            raise DaemonUnreachable(f"lost the daemon on {self.path} ({exc})") from None
        while True:
            answer = self._read()
            if "event" in answer:
                self._pending_events.append(answer)
                continue
            if answer.get("id") != request_id:
                continue
            if "error" in answer:
                raise ControlError(answer["error"]["class"], answer["error"]["desc"])
            return answer.get("return")

    def subscribe(self, events: Iterable[str] | None = None) -> None:
        """Receive these events (shmemctl.events.Event, or their names) from here on; all
        but the trace if None. A name the daemon does not know is refused (ControlError)."""
        if events is None:
            self.execute("subscribe")
        else:
            self.execute("subscribe", events=list(events))
        self.sock.settimeout(None)

    def events(self) -> Iterator[dict[str, Any]]:
        """Events as they come, forever (until the daemon goes away)."""
        while True:
            while self._pending_events:
                yield self._pending_events.pop(0)
            message = self._read()
            if "event" in message:
                yield message

    def interrupt(self) -> None:
        """Wake a thread blocked reading events: it sees the connection end."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
            self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
