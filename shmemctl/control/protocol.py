"""The control protocol, in the manner of QEMU's QMP: one JSON object per line.

server -> {"greeting": {"role", "version", "pid", "commands": [...]}}
client -> {"id": 1, "execute": "map", "arguments": {"shmid": 0, ...}}
server -> {"id": 1, "return": {...}}  or  {"id": 1, "error": {"class", "desc"}}
server -> {"event": "mapped", "data": {...}, "timestamp": 1.5, "seq": 7}  (after subscribe)

The events, who publishes each and what its data holds: shmemctl.events.Event; a
subscribe naming anything else is refused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: A request line longer than this is refused and the client dropped.
MAX_LINE = 64 * 1024
#: Answers can be long (a status listing 65,536 mappings); clients still bound them.
MAX_ANSWER = 256 * 1024 * 1024
#: Events queued for one subscriber before it counts as too slow and is dropped.
MAX_QUEUED = 4096
#: How deeply a request may nest arrays and objects. No command needs more than 4
#: (a batch: request, arguments, maps, one map); Python's own parser would give up
#: with a RecursionError somewhere near 1,000.
MAX_DEPTH = 16
#: The largest value a u64 field of the wire can carry.
U64_MAX = (1 << 64) - 1


class ErrorClass:
    """The `class` of an error answer; clients branch on these."""

    BAD_REQUEST = "BadRequest"  # not JSON, not an object, line too long
    NOT_FOUND = "CommandNotFound"
    BAD_ARGUMENT = "InvalidArgument"
    REFUSED = "Refused"  # the peer refused (a map's errno), or the state forbids it
    FAILED = "CommandFailed"  # it could not be done (no peer, timeout, I/O)
    DENIED = "PermissionDenied"


class ControlError(Exception):
    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


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
            raise ControlError(ErrorClass.BAD_ARGUMENT, "'arguments' must be a JSON object")
        unknown = sorted(set(arguments) - set(self.args))
        if unknown:
            known = ", ".join(sorted(self.args)) or "none"
            raise ControlError(
                ErrorClass.BAD_ARGUMENT,
                f"{self.name} takes no argument {', '.join(unknown)} (it takes: {known})",
            )
        for name, arg in self.args.items():
            if name not in arguments:
                if arg.required:
                    raise ControlError(
                        ErrorClass.BAD_ARGUMENT, f"{self.name} needs the argument '{name}'"
                    )
                continue
            value = arguments[name]
            kinds = arg.kind if isinstance(arg.kind, tuple) else (arg.kind,)
            # JSON has no separate bool: refuse true where a number is expected
            if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
                wanted = " or ".join(k.__name__ for k in kinds)
                raise ControlError(
                    ErrorClass.BAD_ARGUMENT,
                    f"{self.name}: '{name}' must be {wanted}, not {_shown(value)}",
                )
            wrong = arg.range_error(value)
            if wrong:
                raise ControlError(
                    ErrorClass.BAD_ARGUMENT,
                    f"{self.name}: '{name}' must be {wrong}, not {_shown(value)}",
                )
        return arguments


def _shown(value: object) -> str:
    """A client's value as it would read it back, cut short if it is long."""
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def decode_request(line: bytes) -> object:
    """One request line as JSON, or a ControlError that says what is wrong with it.
    Nesting is bounded before parsing, so no line can exhaust the parser's stack."""
    depth = _nesting(line)
    if depth > MAX_DEPTH:
        raise ControlError(
            ErrorClass.BAD_REQUEST,
            f"JSON nested {depth} levels deep; a request needs at most {MAX_DEPTH}",
        )
    try:
        return json.loads(line, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, huge ints
        raise ControlError(ErrorClass.BAD_REQUEST, f"not JSON: {exc}") from None


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


def _nesting(line: bytes) -> int:
    """The deepest bracket nesting outside strings (an upper bound on JSON's nesting)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in line:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def encode_line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"
