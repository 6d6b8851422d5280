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

from shmemctl.api import HANDLES, EventStream
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
        self._stream: EventStream | None = None
        self.subscribed: tuple[Event, ...] = ()  # what the open subscription delivers

    def run(self) -> None:
        while not self._stop.is_set():
            why = ""
            try:
                self._listen()
            except Exception as exc:  # whatever it was, the link reports it and tries again
                why = str(exc)
            finally:
                self._stream = None
                self.subscribed = ()
            if self._stop.is_set():
                break
            if self._again.is_set():  # interrupted to listen to something else: at once
                self._again.clear()
                continue
            if why:
                self.sink(self.role, "down", (why, time.time() + RETRY_SECONDS))
            self._stop.wait(RETRY_SECONDS)

    def _listen(self) -> None:
        """A full status, then the subscription's events until it ends."""
        with HANDLES[self.role].attach(control=self.path, timeout=10) as daemon:
            args = {"max_mappings": FULL_LIST} if self.role == "frontend" else {}
            self.sink(self.role, "status", daemon.execute("query-status", **args))
            names = (*EVENTS, TRACE) if self.trace else EVENTS
            with daemon.events(names) as stream:
                self._stream = stream
                self.subscribed = names
                if self._stop.is_set() or self._again.is_set():
                    stream.interrupt()  # asked before the stream could be told
                for event in stream:
                    self.sink(self.role, "event", event.record)

    def resubscribe(self, trace: bool) -> None:
        """Change what the link listens to: it reconnects with a fresh status."""
        self.trace = trace
        self._again.set()
        stream = self._stream
        if stream is not None:
            stream.interrupt()  # the loop reconnects at once, with the new subscription

    def stop(self) -> None:
        self._stop.set()
        stream = self._stream
        if stream is not None:
            stream.interrupt()


def call(path: str, role: str, command: str, **arguments: Any) -> Any:
    """One request on a connection of its own (workers use this for actions and polls)."""
    with HANDLES[role].attach(control=path, timeout=15) as daemon:
        return daemon.execute(command, **arguments)
