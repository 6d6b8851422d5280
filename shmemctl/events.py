"""Events an endpoint publishes (`mapped`, `unmapped`, `reset`, `connected`, ...).

Publishing costs nothing while nobody listens: the hot path asks `wants(name)`
before it builds an event. The protocol trace (`message` events, one per
message on either channel) is opt-in: a listener gets it only by naming it.
It has one source, the channel that sent or received the message
(`Channel.trace`, through `trace_message`); `emit` refuses its name, so no
other layer can add a second record of the same message.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

Event = dict[str, Any]
Listener = Callable[[Event], None]
TRACE = "message"


class EventHub:
    def __init__(self) -> None:
        self._listeners: tuple[tuple[Listener, frozenset[str] | None], ...] = ()
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._everything = False  # some listener takes every event but the trace
        self._named: frozenset[str] = frozenset()

    @property
    def active(self) -> bool:
        return bool(self._listeners)

    def wants(self, name: str) -> bool:
        return (self._everything and name != TRACE) or name in self._named

    def subscribe(self, listener: Listener, names: Iterable[str] | None = None) -> None:
        """`names`: the events to receive; None for all of them except the trace."""
        with self._lock:
            chosen = None if names is None else frozenset(names)
            self._listeners = (*self._listeners, (listener, chosen))
            self._recompute()

    def unsubscribe(self, listener: Listener) -> None:
        with self._lock:
            # == not `is`: a bound method is a new object at each attribute access
            self._listeners = tuple(x for x in self._listeners if x[0] != listener)
            self._recompute()

    def _recompute(self) -> None:
        self._everything = any(names is None for _, names in self._listeners)
        self._named = frozenset().union(*(n for _, n in self._listeners if n is not None))

    def emit(self, name: str, data: dict[str, Any]) -> None:
        if name == TRACE:
            raise ValueError(
                f"{TRACE!r} events come only from the channel that carried the message "
                "(Channel.trace): a second source would trace it twice"
            )
        self._publish(name, data)

    def trace_message(self, data: dict[str, Any]) -> None:
        """The trace record of one message; `Channel` calls this once per message."""
        self._publish(TRACE, data)

    def _publish(self, name: str, data: dict[str, Any]) -> None:
        listeners = self._listeners
        if not listeners:
            return
        event = {"event": name, "data": data, "timestamp": time.time(), "seq": next(self._seq)}
        for listener, names in listeners:
            if (names is None and name != TRACE) or (names is not None and name in names):
                listener(event)
