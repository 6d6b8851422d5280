"""A conformance run's findings: per check, a verdict, what was expected, what arrived
(decoded), and the passage of docs/protocol.md it comes from.

Every check a run plans gets exactly one verdict: pass, fail, n/a (the peer declined
the feature the check is about) or not run (the suite could not get that far: the
peer hung up, stopped answering, or broke the channel the check needed; the reason is
in the note). A run is good only with no failure and nothing left unrun."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from ..wire import Message
from ..wire.messages import summarize

PASS, FAIL, NA, NOT_RUN = "pass", "fail", "n/a", "not run"
VERDICTS = (PASS, FAIL, NA, NOT_RUN)
_MARKS = {PASS: "pass", FAIL: "FAIL", NA: "n/a ", NOT_RUN: "----"}

#: The first and the last check of either suite.
CONNECTS = "connects"
STAYS_CONNECTED = "stays-connected"


#: where every check's passage (`§5 step 10`) is to be read
PASSAGES = "docs/protocol.md"


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
    #: every check this run means to give a verdict, in order, with its passage
    plan: dict[str, str] = field(default_factory=dict, repr=False)
    results: list[Result] = field(default_factory=list)

    def add(self, check: str, ok: bool, expected: str, arrived: Any = None,
            note: str = "") -> bool:  # fmt: skip
        self._record(Result(check, PASS if ok else FAIL, self.plan[check], expected, arrived, note))
        return ok

    def na(self, checks: str | Iterable[str], why: str) -> None:
        """The peer declined what these checks are about."""
        for check in [checks] if isinstance(checks, str) else checks:
            self._record(Result(check, NA, self.plan[check], note=why))

    def not_run(self, checks: str | Iterable[str], why: str) -> None:
        for check in [checks] if isinstance(checks, str) else checks:
            self._record(Result(check, NOT_RUN, self.plan[check], note=why))

    def give_up(self, why: str, among: Iterable[str] | None = None) -> None:
        """Every planned check (or every one `among` these) still without a verdict
        could not run; stays-connected aside: `finish` decides that one."""
        done = self.verdicts
        left = [c for c in (self.plan if among is None else among) if c not in done]
        self.not_run([c for c in left if c != STAYS_CONNECTED], why)

    def finish(self, gone: str | None) -> Report:
        """The last verdict: did the peer stay until the end (`gone` says how it went)."""
        if self.verdicts.get(CONNECTS) == FAIL:
            self.give_up(f"could not run: no {self.role} to check")
            self.not_run(STAYS_CONNECTED, f"could not run: no {self.role} to check")
            return self
        expected = "both channels open until the suite closes them"
        if gone is not None:
            self.add(STAYS_CONNECTED, False, expected, f"the {self.role} {gone}")
            self.give_up(f"could not run: the {self.role} {gone}")
        else:
            self.add(STAYS_CONNECTED, True, expected, "they were")
        self.give_up("could not run: the suite stopped early")  # never meant to be reached
        return self

    def _record(self, result: Result) -> None:
        if result.check in self.verdicts:
            raise ValueError(f"{result.check} has a verdict already")
        self.results.append(result)
        self.results.sort(key=lambda r: self._order[r.check])

    @property
    def _order(self) -> dict[str, int]:
        return {check: i for i, check in enumerate(self.plan)}

    @property
    def verdicts(self) -> dict[str, str]:
        return {r.check: r.verdict for r in self.results}

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if r.verdict == FAIL]

    @property
    def ok(self) -> bool:
        """Nothing failed and nothing was left unrun."""
        return all(r.verdict in (PASS, NA) for r in self.results)

    def counts(self) -> dict[str, int]:
        return {v: sum(r.verdict == v for r in self.results) for v in VERDICTS}

    def to_json(self) -> str:
        return json.dumps(
            {"target": self.target, "role": self.role, "passages": PASSAGES,
             "summary": self.counts(),
             "results": [asdict(r) for r in self.results]},
            default=str,
        )  # fmt: skip

    def to_text(self) -> str:
        width = max((len(r.check) for r in self.results), default=10)
        lines = [f"conformance of the {self.role} at {self.target}",
                 f"passages (§N) refer to {PASSAGES}", ""]
        for group in self._groups():
            r = group[0]
            mark = _MARKS[r.verdict]
            if len(group) > 1:  # checks skipped for one reason: their names, one note
                names = ", ".join(g.check for g in group) + f" ({len(group)} checks)"
                lines += textwrap.wrap(names, 100, break_on_hyphens=False,
                                       initial_indent=f"  {mark}  ", subsequent_indent=" " * 8)
            else:
                lines.append(f"  {mark}  {r.check:<{width}}  {r.passage}")
            if r.verdict == FAIL:
                lines.append(f"        expected: {r.expected}")
                arrived = r.arrived if isinstance(r.arrived, str) else json.dumps(r.arrived)
                lines.append(f"        arrived:  {arrived}")
            if r.note and r.verdict != PASS:
                lines.append(f"        note:     {r.note}")
        c = self.counts()
        summary = f"{c[PASS]} passed, {c[FAIL]} failed, {c[NA]} not applicable"
        lines += ["", summary + (f", {c[NOT_RUN]} not run" if c[NOT_RUN] else "")]
        return "\n".join(lines)

    def _groups(self) -> Iterator[list[Result]]:
        """Consecutive results, n/a or not run for the same reason, taken together."""
        group: list[Result] = []
        for r in self.results:
            if group and (r.verdict not in (NA, NOT_RUN) or (r.verdict, r.note) != (
                    group[0].verdict, group[0].note)):  # fmt: skip
                yield group
                group = []
            group.append(r)
        if group:
            yield group


@dataclass
class Collected:
    """What a request drew: the messages, or what broke the stream."""

    messages: list[Message]
    error: str | None = None
    unanswered: bool = False  # the error: nothing came in time

    def describe(self) -> Any:
        if self.error:
            return {"error": self.error, "before": [summarize(m) for m in self.messages]}
        if not self.messages:
            return "nothing"
        return [summarize(m) for m in self.messages]


def one_u64_reply(got: Collected, request: int) -> tuple[bool, str]:
    """Exactly one reply, flags 0x5, to `request`, with a u64: (ok, what is wrong)."""
    if got.error:
        return False, "no reply in time" if got.unanswered else "a reply the codec refuses"
    if len(got.messages) != 1:
        return False, f"{len(got.messages)} replies"
    m = got.messages[0]
    if m.flags != 0x5 or m.request != request or not isinstance(m.payload, int):
        return False, "a reply of the wrong shape"
    return True, ""
