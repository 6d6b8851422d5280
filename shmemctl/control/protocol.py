"""The control protocol, in the manner of QEMU's QMP: one JSON object per line.

server -> {"greeting": {"role", "version", "pid", "commands": [...]}}
client -> {"id": 1, "execute": "map", "arguments": {"shmid": 0, ...}}
server -> {"id": 1, "return": {...}}  or  {"id": 1, "error": {"class", "desc"}}
server -> {"event": "mapped", "data": {...}, "timestamp": 1.5, "seq": 7}  (after subscribe)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: A request line longer than this is refused and the client dropped.
MAX_LINE = 64 * 1024
#: Answers can be long (a status listing 65,536 mappings); clients still bound them.
MAX_ANSWER = 256 * 1024 * 1024
#: Events queued for one subscriber before it counts as too slow and is dropped.
MAX_QUEUED = 4096


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
    """One argument of a command: its JSON type, and whether it may be left out."""

    kind: type | tuple[type, ...]
    required: bool = True
    help: str = ""


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
                    f"{self.name}: '{name}' must be {wanted}, not {json.dumps(value)}",
                )
        return arguments


def encode_line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"
