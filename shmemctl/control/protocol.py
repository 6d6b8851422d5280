"""The control protocol: QEMU's QMP (docs/control.md). A client's requests are a stream
of JSON objects (RequestStream cuts it); each answer and event is one line.

server -> {"QMP": {"version": {"qemu": {"major", "minor", "micro"}, "package"},
                   "capabilities": []}}
client -> {"execute": "qmp_capabilities"}          (nothing else is served before it)
server -> {"return": {}}
client -> {"execute": "map", "arguments": {"shmid": 0, ...}, "id": 1}
server -> {"return": {...}, "id": 1}  or  {"error": {"class", "desc"}, "id": 1}
client -> {"execute": "subscribe", "arguments": {"events": ["MAPPED"]}}
server -> {"event": "MAPPED", "data": {...},
           "timestamp": {"seconds": 1764400000, "microseconds": 5}}

Events reach only a connection that subscribed to them: a client that asks one
question does not pay for a stream of every map, or the message trace. The
events, who publishes each and what its data holds: shmemctl.events.Event; a
subscribe naming anything else is refused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: A request longer than this is refused and the client dropped.
MAX_REQUEST = 64 * 1024
#: Answers can be long (a status listing 65,536 mappings); clients still bound them.
MAX_ANSWER = 256 * 1024 * 1024
#: Events queued for one subscriber before it counts as too slow and is dropped.
MAX_QUEUED = 4096
#: How deeply a request may nest arrays and objects. No command needs more than 4
#: (a batch: request, arguments, maps, one map); Python's own parser would give up
#: with a RecursionError somewhere near 1,000.
MAX_DEPTH = 16
#: The most mappings a status lists (`max_mappings`): more than a front-end may hold.
MAX_LISTED = 1 << 31
#: The largest value a u64 field of the wire can carry.
U64_MAX = (1 << 64) - 1


class ErrorClass:
    """The `class` of an error answer: QMP's. As in QEMU, nearly every error is a
    GenericError whose `desc` says what was wrong and what would be right."""

    GENERIC = "GenericError"
    #: no such command, or none but qmp_capabilities before the negotiation
    NOT_FOUND = "CommandNotFound"


class ControlError(Exception):
    def __init__(self, desc: str, error_class: str = ErrorClass.GENERIC) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc

    def answer(self) -> dict[str, Any]:
        """The error as QMP answers it (the server adds the request's `id`)."""
        return {"error": {"class": self.error_class, "desc": self.desc}}


@dataclass(frozen=True)
class Arg:
    """One argument of a command: its JSON type, whether it may be left out, and for
    numbers the closed range a value must lie in (so nothing out of range reaches
    the code that packs it into a message or allocates for it)."""

    kind: type | tuple[type, ...]
    required: bool = True
    help: str = ""
    low: float | None = None
    high: float | None = None

    def range_error(self, value: object) -> str | None:
        """What is wrong with a value of the right type, or None."""
        if not isinstance(value, int | float) or isinstance(value, bool):
            return None
        if value != value:  # NaN compares false with every bound
            return "a number, not NaN"
        low, high = self.low, self.high
        if (low is None or value >= low) and (high is None or value <= high):
            return None
        if low is None:
            return f"at most {_number(high)}"
        if high is None:
            return f"at least {_number(low)}"
        return f"from {_number(low)} to {_number(high)}"


def _number(value: float | None) -> str:
    """Bounds as people write them: small ones in decimal, offsets in hex."""
    if isinstance(value, int) and value > 0xFFFF:
        return f"{value:#x}"
    return f"{value:g}"


def u64(help: str = "", *, required: bool = True) -> Arg:
    """An offset or a length as the wire carries it: 0 to 2**64-1."""
    return Arg(int, required, help, 0, U64_MAX)


def shmid_arg(help: str = "shared memory region id") -> Arg:
    return Arg(int, True, help, 0, 255)


@dataclass
class Command:
    """A control command: its arguments are checked before `run` sees them."""

    name: str
    #: None for commands the server serves itself (subscribe acts on the connection)
    run: Callable[..., Any] | None
    args: dict[str, Arg] = field(default_factory=dict)
    mutating: bool = False
    help: str = ""

    def check(self, arguments: object) -> dict[str, Any]:
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise ControlError("'arguments' must be a JSON object")
        unknown = sorted(set(arguments) - set(self.args))
        if unknown:
            known = ", ".join(sorted(self.args)) or "none"
            raise ControlError(
                f"{self.name} takes no argument {', '.join(unknown)} (it takes: {known})",
            )
        for name, arg in self.args.items():
            if name not in arguments:
                if arg.required:
                    raise ControlError(f"{self.name} needs the argument '{name}'")
                continue
            value = arguments[name]
            kinds = arg.kind if isinstance(arg.kind, tuple) else (arg.kind,)
            # JSON has no separate bool: refuse true where a number is expected
            if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
                wanted = " or ".join(k.__name__ for k in kinds)
                raise ControlError(
                    f"{self.name}: '{name}' must be {wanted}, not {_shown(value)}",
                )
            wrong = arg.range_error(value)
            if wrong:
                raise ControlError(
                    f"{self.name}: '{name}' must be {wrong}, not {_shown(value)}",
                )
        return arguments


def _shown(value: object) -> str:
    """A client's value as it would read it back, cut short if it is long."""
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


class DaemonUnreachable(Exception):
    """Nothing answers on the control socket (no daemon, or a dead one)."""


class RequestTooLong(ControlError):
    """A request past MAX_REQUEST: answered, and the client is dropped."""


_WHITESPACE = frozenset(b" \t\r\n")
_OPENERS = frozenset(b"{[")
_CLOSERS = frozenset(b"}]")
_QUOTE, _BACKSLASH, _NEWLINE, _RESET = 0x22, 0x5C, 0x0A, 0xFF


class RequestStream:
    """QMP input is a stream of JSON values, with or without whitespace between them
    (QEMU's own client sends none, people at a terminal end each with a newline).
    This splits the stream into one request each, without parsing it: only brackets
    outside strings are counted. Anything at the top level that is not an object or
    an array is taken up to the next newline and answered as one bad request, so a
    client that typed garbage is back in step at its next line. A value that opens
    more than MAX_DEPTH levels is answered as soon as it does, as QEMU's parser does,
    and the rest of its line is skipped. A 0xff byte, which no JSON text holds, resets
    the stream wherever it comes and is answered with an error: QMP's way for a client
    to bring the parser back into a known state (anything unfinished is dropped).

    `feed` returns, in order, each complete request (bytes) or the ControlError that
    answers it. A request that outgrows MAX_REQUEST ends the list as a RequestTooLong,
    after every request framed before it: the server answers it and drops the client
    (there is no telling where such a request ends), and the stream takes no more."""

    def __init__(self) -> None:
        self._held = bytearray()  # the start of a value (or of junk) that is not over yet
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._junk = False  # garbage at the top level: answered at its newline
        self._skipping = False  # the rest of a line that nested too deep: dropped
        self._over = False

    def feed(self, data: bytes) -> list[bytes | ControlError]:
        out: list[bytes | ControlError] = []
        if self._over:
            return out
        begun = 0 if (self._depth or self._junk) else -1  # where the held piece goes on
        for index, byte in enumerate(data):
            if byte == _RESET:
                out.append(ControlError(
                    "JSON parse error: byte 0xff resets the parser; anything unfinished "
                    "before it was dropped"
                ))  # fmt: skip
                self._depth, self._held, begun = 0, bytearray(), -1
                self._in_string = self._escaped = self._junk = self._skipping = False
                continue
            ends_junk = self._junk and byte == _NEWLINE  # the newline is not part of it
            if begun >= 0 and not ends_junk and len(self._held) + index - begun >= MAX_REQUEST:
                out.append(self._too_long())  # this byte makes it longer than the bound
                return out
            if self._skipping:
                self._skipping = byte != _NEWLINE
                continue
            if self._junk:
                if byte == _NEWLINE:
                    out.append(self._bad(bytes(self._held + data[begun:index])))
                    self._junk, begun = False, -1
                continue
            if self._depth == 0:
                if byte in _WHITESPACE:
                    continue
                self._held.clear()
                begun = index
                if byte in _OPENERS:
                    self._depth = 1
                else:
                    self._junk = True
                continue
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif byte == _BACKSLASH:
                    self._escaped = True
                elif byte == _QUOTE:
                    self._in_string = False
            elif byte == _QUOTE:
                self._in_string = True
            elif byte in _OPENERS:
                self._depth += 1
                if self._depth > MAX_DEPTH:
                    out.append(ControlError(
                        f"JSON nested more than {MAX_DEPTH} levels deep; a request needs at "
                        "most that (the rest of its line is skipped)"
                    ))  # fmt: skip
                    self._depth, self._skipping, begun = 0, True, -1
            elif byte in _CLOSERS:
                self._depth -= 1
                if self._depth == 0:
                    out.append(bytes(self._held + data[begun : index + 1]))
                    begun = -1
        if begun >= 0:
            self._held += data[begun:]
        return out

    def _too_long(self) -> RequestTooLong:
        self._over = True
        return RequestTooLong(f"request longer than {MAX_REQUEST} bytes; closing")

    @staticmethod
    def _bad(text: bytes) -> ControlError:
        try:
            value = decode_request(text)
        except ControlError as exc:
            return exc
        return ControlError(f"QMP input must be a JSON object, not {_shown(value)}")


def decode_request(text: bytes) -> object:
    """One request (a value RequestStream framed) as JSON, or a ControlError that says
    what is wrong with it."""
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, huge ints
        raise ControlError(f"not JSON: {exc}") from None


def _finite(text: str) -> float:
    """A JSON number too large for a float (1e999) would come back as Infinity."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} is too large for a number here")
    return value


def _no_constant(name: str) -> None:
    """Python's parser takes NaN and Infinity, which JSON has not: an answer echoing one
    (an `id`) would not be JSON either."""
    raise ValueError(f"{name} is not a JSON value")


def encode_line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"
