"""The console's links to the daemons: nothing but their control sockets.

One thread per daemon keeps a subscription open: a full status when it
connects, then events. When the daemon goes away the link says so and tries
again after a pause the console can show as a countdown.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from shmemctl.control import ControlClient
from shmemctl.events import ALL_BUT_TRACE, TRACE, Event

#: Every event a daemon publishes except the protocol trace.
EVENTS: tuple[Event, ...] = ALL_BUT_TRACE
RETRY_SECONDS = 2.0
#: Mappings asked for in the full status a link starts with.
FULL_LIST = 1 << 20

Sink = Callable[[str, str, Any], None]


class DaemonLink(threading.Thread):
    def __init__(self, role: str, path: str, sink: Sink, trace: bool = False) -> None:
        super().__init__(daemon=True, name=f"link-{role}")
        self.role = role
        self.path = path
        self.sink = sink
        self.trace = trace
        self._stop = threading.Event()
        self._again = threading.Event()  # reconnect now, without a pause or a 'down'
        self._client: ControlClient | None = None
        self.subscribed: tuple[Event, ...] = ()  # what the open subscription delivers

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                client = ControlClient(self.path, timeout=10)
                self._client = client
                args = {"max_mappings": FULL_LIST} if self.role == "frontend" else {}
                self.sink(self.role, "status", client.execute("query-status", **args))
                names = (*EVENTS, TRACE) if self.trace else EVENTS
                client.subscribe(names)
                self.subscribed = names
                for event in client.events():
                    self.sink(self.role, "event", event)
            except Exception as exc:  # whatever it was, the link reports it and tries again
                if self._stop.is_set():
                    break
                if self._again.is_set():
                    self._again.clear()
                    continue
                self.sink(self.role, "down", (str(exc), time.time() + RETRY_SECONDS))
            finally:
                self.subscribed = ()
                if self._client is not None:
                    self._client.close()
                    self._client = None
            self._stop.wait(RETRY_SECONDS)

    def resubscribe(self, trace: bool) -> None:
        """Change what the link listens to: it reconnects with a fresh status."""
        self.trace = trace
        client = self._client
        if client is not None:
            self._again.set()
            client.interrupt()  # the loop reconnects at once, with the new subscription

    def stop(self) -> None:
        self._stop.set()
        client = self._client
        if client is not None:
            client.interrupt()


def call(path: str, command: str, **arguments: Any) -> Any:
    """One request on a connection of its own (workers use this for actions and polls)."""
    with ControlClient(path, timeout=15) as client:
        return client.execute(command, **arguments)
