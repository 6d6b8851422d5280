"""Events an endpoint publishes (`mapped`, `unmapped`, `reset`, `connected`, ...).

Publishing costs nothing while nobody listens: the hot path checks `active`
before it builds an event.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

Event = dict[str, Any]
Listener = Callable[[Event], None]


class EventHub:
    def __init__(self) -> None:
        self._listeners: tuple[Listener, ...] = ()
        self._lock = threading.Lock()
        self._seq = itertools.count(1)

    @property
    def active(self) -> bool:
        return bool(self._listeners)

    def subscribe(self, listener: Listener) -> None:
        with self._lock:
            self._listeners = (*self._listeners, listener)

    def unsubscribe(self, listener: Listener) -> None:
        with self._lock:
            self._listeners = tuple(x for x in self._listeners if x is not listener)

    def emit(self, name: str, data: dict[str, Any]) -> None:
        listeners = self._listeners
        if not listeners:
            return
        event = {"event": name, "data": data, "timestamp": time.time(), "seq": next(self._seq)}
        for listener in listeners:
            listener(event)
