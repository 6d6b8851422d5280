"""Events an endpoint publishes: the registry (`Event`, `PAYLOADS`) and the hub.

Every event either daemon publishes is a member of `Event`, defined here once: its
name (the `event` of a control-socket event line), when it is published and by
which daemon, and the record its `data` carries from each publisher. Emitters
name events by member, consumers compare against members, and the control
servers refuse to subscribe to a name that is not here.

Publishing costs nothing while nobody listens: the hot path asks `wants(event)`
before it builds an event. The protocol trace (`message` events, one per
message on either channel) is opt-in: a listener gets it only by naming it.
It has one source, the channel that sent or received the message
(`Channel.trace`, through `trace_message`); `emit` refuses it, so no other
layer can add a second record of the same message.
"""

# No `from __future__ import annotations` here: Python 3.11's TypedDict takes a NotRequired
# key for a required one when its annotation is a string.
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from enum import StrEnum
from typing import Any, Literal, NotRequired, TypedDict

from .shmem.mapping import MappingJSON, RangeJSON

#: An event as listeners get it and as the control socket sends it, in QMP's form:
#: {"event": "MAPPED", "data": {...}, "timestamp": {"seconds": 1764400000, "microseconds": 5}}
EventRecord = dict[str, Any]
Listener = Callable[[EventRecord], None]
Role = Literal["frontend", "backend", "tap"]


class Event(StrEnum):
    """What a daemon publishes. The value is the name on the wire (a member is a str,
    so it compares, hashes and serialises as that name). Who publishes each, and the
    record its data carries, is `PAYLOADS` below; `event.payloads` reads it."""

    #: both: a SHMEM_MAP took effect (front-end: it mapped; device: sent and not refused)
    MAPPED = "MAPPED"
    #: both: a SHMEM_UNMAP took effect (front-end: it unmapped; device: sent and not refused)
    UNMAPPED = "UNMAPPED"
    #: both: a SHMEM_MAP or SHMEM_UNMAP was refused (front-end: it refused; device: it was told)
    REFUSED = "REFUSED"
    #: both: a device reset dropped every mapping (front-end: `reset` command; back-end: asked)
    RESET = "RESET"
    #: both: a handshake finished (front-end), a front-end connected (back-end)
    CONNECTED = "CONNECTED"
    #: both: the connection to the peer ended; the front-end has dropped every mapping
    DISCONNECTED = "DISCONNECTED"
    #: front-end: it has a back-end's socket and begins the handshake
    HANDSHAKE = "HANDSHAKE"
    #: front-end: its connect failed and it tries again after `retry_in` seconds (--reconnect);
    #: tap: a side it connects to is not there, and it tries again every `retry_in` seconds
    #: (once per wait, not per attempt)
    RECONNECTING = "RECONNECTING"
    #: both, to whoever names it: one message sent or received, by its channel (the trace)
    MESSAGE = "MESSAGE"
    #: tap: a side of the pair it relays connected to it (again, after a reconnect)
    ATTACHED = "ATTACHED"
    #: tap: a side went away, or was sent away because the other side did
    DETACHED = "DETACHED"
    #: tap: a message showed one side breaking a rule (session.common.Rule)
    VIOLATION = "VIOLATION"
    #: tap: bytes it relayed that the codec cannot take as they are (bad header, unknown
    #: id, wrong size); with `decoding` false, the framing of that direction is lost
    UNDECODABLE = "UNDECODABLE"

    @property
    def payloads(self) -> Mapping[Role, type]:
        """The daemons that publish this event, each with the record its data carries."""
        return PAYLOADS[self]


TRACE = Event.MESSAGE
#: Every event's name, as a client writes it.
NAMES: frozenset[str] = frozenset(e.value for e in Event)
#: What a subscription without names delivers: every event but the trace.
ALL_BUT_TRACE: tuple[Event, ...] = tuple(e for e in Event if e is not TRACE)
#: The events that name the front-end's new state (its status's `state`).
STATES: frozenset[Event] = frozenset(
    {Event.HANDSHAKE, Event.CONNECTED, Event.DISCONNECTED, Event.RECONNECTING}
)


def state_named(event: Event | str) -> str:
    """The front-end's state (its status's `state`) that one of `STATES` announces: the
    event's name in lower case."""
    return lookup(event).value.lower()


#: The events after which the front-end holds no mapping at all.
DROPS_ALL: frozenset[Event] = frozenset({Event.RESET, Event.DISCONNECTED})
#: The outcomes of one SHMEM request: both daemons report each, about the same range.
OUTCOMES: frozenset[Event] = frozenset({Event.MAPPED, Event.UNMAPPED, Event.REFUSED})


# ---------------------------------------------------------------- the payloads


class NoData(TypedDict):
    """`handshake`, and `connected` from either daemon: nothing but the news."""


class DeviceMapped(MappingJSON):
    """`mapped` from backend_sim: the mapping it now believes in (the front-end's own
    `mapped` carries the plain `MappingJSON`)."""

    #: False when the request was sent without NEED_REPLY (a batch's earlier maps)
    acked: bool


class DeviceUnmapped(RangeJSON):
    """`unmapped` from backend_sim: the range the front-end unmapped."""

    acked: bool


class FrontendRefusal(TypedDict):
    """`refused` from the front-end: what it refused, and why."""

    request: str  # the message: SHMEM_MAP or SHMEM_UNMAP
    shmid: int
    shm_offset: int
    len: int
    reason: str  # a shmemctl.shmem.Refusal name
    errno: str  # the errno name it answered with
    detail: str


class DeviceRefusal(TypedDict):
    """`refused` from backend_sim: the answer it got, and the device's own reading."""

    request: str  # "map" or "unmap"
    shmid: int
    shm_offset: int
    len: int
    errno: str  # the reply, described (EEXIST, ...)
    reply: int  # the reply value itself
    explanation: str  # what the device sees wrong with it, or ""
    fd_offset: NotRequired[int]  # a map only
    writable: NotRequired[bool]  # a map only
    buffer: NotRequired[int]  # a map only


class FrontendReset(TypedDict):
    """`reset` from the front-end."""

    dropped: int  # mappings dropped
    via: str  # the message that told the back-end: RESET_DEVICE, SET_STATUS or RESET_OWNER


class DeviceReset(TypedDict):
    """`reset` from the back-end."""

    why: str  # the message that reset it


class FrontendHandshake(TypedDict):
    """`handshake` from the front-end: a connection begins."""

    profile: str  # whose behaviour it has (frontend --profile)


class FrontendDisconnect(TypedDict):
    """`disconnected` from the front-end."""

    reason: str
    dropped: int  # mappings dropped with the connection


class DeviceDisconnect(TypedDict):
    """`disconnected` from backend_sim."""

    reason: str


class Reconnect(TypedDict):
    """`reconnecting` from the front-end."""

    retry_in: float  # seconds until the next connect


class TraceRecord(TypedDict):
    """`message`: one message, decoded (shmemctl.wire.summarize) and placed."""

    channel: str  # "main" or "backend"
    request: str
    id: int
    flags: int
    reply: bool
    need_reply: bool
    payload: Any  # decoded fields, a number, or raw hex
    fds: int
    role: str  # the daemon whose channel carried it
    direction: str  # "in" or "out"
    #: why the codec refused the payload (then `payload` is its raw hex)
    undecodable: NotRequired[str]


class TapSide(TypedDict):
    """`attached` and `detached` from the tap: which side, where, which connection."""

    side: str  # "front-end" or "back-end"
    socket: str
    mode: str  # "listen" or "connect": what the tap does on that socket
    connection: int  # 1 for the first pair of connections, then one more per reconnect
    reason: NotRequired[str]  # detached only: why


class TapReconnect(TypedDict):
    """`reconnecting` from the tap: a side it connects to is not there yet."""

    side: str  # "front-end" or "back-end"
    socket: str
    mode: str  # "connect"
    retry_in: float  # seconds between attempts (--retry)
    reason: str  # why the connect failed


class TapViolation(TypedDict):
    """`violation` from the tap: a rule one side broke, as the observer judged it."""

    by: str  # "front-end" or "back-end"
    rule: str  # the Rule's label, as the conformance suite names it
    passage: str  # where docs/protocol.md states it
    text: str  # the rule
    detail: str  # what this message did
    channel: str  # "main" or "backend"
    request: str  # the message that showed it


class TapUndecodable(TypedDict):
    """`undecodable` from the tap: relayed exactly, but not as the codec would take it."""

    side: str  # who sent it: "front-end" or "back-end"
    channel: str
    request: int | None  # the id its header names, if a header could be read
    bytes: int
    fds: int
    reason: str
    #: false: the framing of this direction is lost and it is relayed raw from now on
    decoding: bool


#: Who publishes each event, and the record its `data` carries from each.
PAYLOADS: dict[Event, dict[Role, type]] = {
    Event.MAPPED: {"frontend": MappingJSON, "backend": DeviceMapped},
    Event.UNMAPPED: {"frontend": MappingJSON, "backend": DeviceUnmapped},
    Event.REFUSED: {"frontend": FrontendRefusal, "backend": DeviceRefusal},
    Event.RESET: {"frontend": FrontendReset, "backend": DeviceReset},
    Event.CONNECTED: {"frontend": NoData, "backend": NoData},
    Event.DISCONNECTED: {"frontend": FrontendDisconnect, "backend": DeviceDisconnect},
    Event.HANDSHAKE: {"frontend": FrontendHandshake},
    Event.RECONNECTING: {"frontend": Reconnect, "tap": TapReconnect},
    Event.MESSAGE: {"frontend": TraceRecord, "backend": TraceRecord, "tap": TraceRecord},
    Event.ATTACHED: {"tap": TapSide},
    Event.DETACHED: {"tap": TapSide},
    Event.VIOLATION: {"tap": TapViolation},
    Event.UNDECODABLE: {"tap": TapUndecodable},
}


def payload_keys(record: type) -> tuple[frozenset[str], frozenset[str]]:
    """A payload record's (required, optional) keys."""
    return record.__required_keys__, record.__optional_keys__  # type: ignore[attr-defined]


def known_names() -> str:
    """Every event's name, for an error that lists them."""
    return ", ".join(Event)


class UnknownEvent(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no event {name!r}; the events are: {known_names()}")
        self.name = name


def lookup(name: Event | str) -> Event:
    """The registered event of this name; UnknownEvent if there is none."""
    if isinstance(name, Event):
        return name
    try:
        return Event(name)
    except ValueError:
        raise UnknownEvent(name) from None


def qmp_timestamp(when: float) -> dict[str, int]:
    """A time as QMP's events carry it: whole seconds and microseconds since the epoch."""
    seconds, fraction = divmod(when, 1.0)
    return {"seconds": int(seconds), "microseconds": min(int(fraction * 1_000_000), 999_999)}


def event_time(record: EventRecord) -> float:
    """When an event happened, in seconds since the epoch (its QMP timestamp read back)."""
    stamp = record["timestamp"]
    return float(stamp["seconds"]) + stamp["microseconds"] / 1_000_000


# ---------------------------------------------------------------- the hub


class EventHub:
    def __init__(self) -> None:
        self._listeners: tuple[tuple[Listener, frozenset[Event] | None], ...] = ()
        self._lock = threading.Lock()
        self._everything = False  # some listener takes every event but the trace
        self._named: frozenset[Event] = frozenset()

    @property
    def active(self) -> bool:
        return bool(self._listeners)

    def wants(self, event: Event) -> bool:
        return (self._everything and event is not TRACE) or event in self._named

    def subscribe(self, listener: Listener, names: Iterable[Event | str] | None = None) -> None:
        """`names`: the events to receive; None for all of them except the trace.
        UnknownEvent (a ValueError) for a name that is not an `Event`."""
        chosen = None if names is None else frozenset(lookup(n) for n in names)
        with self._lock:
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

    def emit(self, event: Event | str, data: Mapping[str, Any]) -> None:
        """Publish `event` with its data (the record `PAYLOADS` names for this daemon).
        A plain name is looked up in the registry (UnknownEvent if it is not there):
        emitters name members; backend_sim/device.py still passes names it computes."""
        event = lookup(event)
        if event is TRACE:
            raise ValueError(
                f"{TRACE.value!r} events come only from the channel that carried the message "
                "(Channel.trace): a second source would trace it twice"
            )
        self._publish(event, data)

    def trace_message(self, data: Mapping[str, Any]) -> None:
        """The trace record of one message (a TraceRecord); `Channel` calls this once per
        message."""
        self._publish(TRACE, data)

    def _publish(self, event: Event, data: Mapping[str, Any]) -> None:
        listeners = self._listeners
        if not listeners:
            return
        # the name as a plain str: what a listener and the control socket see is the name
        record = {"event": event.value, "data": data, "timestamp": qmp_timestamp(time.time())}
        for listener, names in listeners:
            if (names is None and event is not TRACE) or (names is not None and event in names):
                listener(record)
