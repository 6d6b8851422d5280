"""A conformance run's findings: per check, a verdict, what was expected, what arrived
(decoded), and the passage of the protocol brief it comes from."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ..channel import Channel, ChannelError, close_fds
from ..wire import Message, WireError
from ..wire.messages import summarize

PASS, FAIL, NA = "pass", "fail", "n/a"


@dataclass
class Result:
    check: str
    verdict: str
    passage: str
    expected: str = ""
    arrived: Any = None
    note: str = ""


@dataclass
class Report:
    target: str
    role: str  # the role of the implementation under test
    results: list[Result] = field(default_factory=list)

    def add(self, check: str, passage: str, ok: bool, expected: str, arrived: Any = None,
            note: str = "") -> bool:  # fmt: skip
        self.results.append(Result(check, PASS if ok else FAIL, passage, expected, arrived, note))
        return ok

    def na(self, check: str, passage: str, why: str) -> None:
        self.results.append(Result(check, NA, passage, note=why))

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if r.verdict == FAIL]

    def to_json(self) -> str:
        counts = {v: sum(r.verdict == v for r in self.results) for v in (PASS, FAIL, NA)}
        return json.dumps(
            {"target": self.target, "role": self.role, "summary": counts,
             "results": [asdict(r) for r in self.results]},
            default=str,
        )  # fmt: skip

    def to_text(self) -> str:
        width = max((len(r.check) for r in self.results), default=10)
        lines = [f"conformance of the {self.role} at {self.target}", ""]
        for r in self.results:
            mark = {PASS: "pass", FAIL: "FAIL", NA: "n/a "}[r.verdict]
            lines.append(f"  {mark}  {r.check:<{width}}  {r.passage}")
            if r.verdict == FAIL:
                lines.append(f"        expected: {r.expected}")
                arrived = r.arrived if isinstance(r.arrived, str) else json.dumps(r.arrived)
                lines.append(f"        arrived:  {arrived}")
            if r.note and r.verdict != PASS:
                lines.append(f"        note:     {r.note}")
        counts = {v: sum(r.verdict == v for r in self.results) for v in (PASS, FAIL, NA)}
        lines += ["", f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[NA]} not applicable"]
        return "\n".join(lines)


@dataclass
class Collected:
    """Whatever came back within the window: messages, or what broke the stream."""

    messages: list[Message]
    error: str | None = None

    def describe(self) -> Any:
        if self.error:
            return {"error": self.error, "before": [summarize(m) for m in self.messages]}
        if not self.messages:
            return "nothing"
        return [summarize(m) for m in self.messages]


def collect(channel: Channel, first: float, more: float = 0.3) -> Collected:
    """Read what arrives: wait `first` for a message, then `more` for each further one."""
    messages: list[Message] = []
    try:
        wait = first
        while channel.wait_readable(wait):
            message = channel.recv()
            close_fds(message.fds)
            messages.append(message)
            wait = more
    except (WireError, ChannelError) as exc:
        return Collected(messages, f"{type(exc).__name__}: {exc}")
    return Collected(messages)


def one_u64_reply(got: Collected, request: int) -> tuple[bool, str]:
    """Exactly one reply, flags 0x5, to `request`, with a u64: (ok, what is wrong)."""
    if got.error:
        return False, "a reply the codec refuses"
    if len(got.messages) != 1:
        return False, f"{len(got.messages)} replies"
    m = got.messages[0]
    if m.flags != 0x5 or m.request != request or not isinstance(m.payload, int):
        return False, "a reply of the wrong shape"
    return True, ""
