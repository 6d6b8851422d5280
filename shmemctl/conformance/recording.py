"""The rules over a recording: what a tap judged live, judged again from the file
(`shmemctl conformance --recording FILE`), by the same watch and the same named rules,
so a recording attached to a bug report can be checked by anyone.

Each rule of `session.common.Rule` is one check: it fails when the recording shows it
broken (every place is listed), passes otherwise. One more check says whether every
message could be framed and decoded: past a lost framing a channel is not judged.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..session.common import Rule
from ..tap.recording import Recorded, replay
from ..tap.watch import Finding, Watch, carries_map_file
from .report import Report

#: the check of what could not be decoded (not a rule of the session layer)
DECODES = "messages-decode"

#: at most this many places are listed per broken rule (the count says how many there were)
SHOWN = 20


def check_recording(path: str | Path, *, reply_deadline: float | None) -> Report:
    """The report of the recording at `path`. RecordingError or OSError when it cannot be
    read."""
    report = Report(str(path), "pair recorded")
    report.plan = {rule.label: rule.passage for rule in Rule}
    report.plan[DECODES] = "§3"
    broken: dict[Rule, list[str]] = defaultdict(list)
    undecodable: list[str] = []
    watch = Watch(reply_deadline=reply_deadline)
    messages = 0

    def found(record: Recorded, findings: list[Finding]) -> None:
        for f in findings:
            v = f.violation
            broken[v.rule].append(f"line {record.line}: the {v.by} ({f.channel.value} "
                                  f"{f.message.name}): {v.detail}")  # fmt: skip

    for record in replay(path):
        found(record, watch.overdue(record.time))
        if record.type == "start":
            watch = Watch(shmem_bit=record.shmem_bit, reply_deadline=reply_deadline)
        elif record.type == "attached":
            watch.attached()
        elif record.type == "detached":
            watch.detached()
        else:
            assert record.channel is not None and record.sender is not None
            for unit in record.units:
                messages += unit.framed
                facts = record.file_facts() if carries_map_file(unit) else None
                judged = watch.unit(record.channel, record.sender, unit, now=record.time,
                                    decoding=record.decoding, facts=facts,
                                    answers_in_flight=record.answers_in_flight)  # fmt: skip
                found(record, judged.findings)
                if unit.problem:
                    undecodable.append(f"line {record.line}: from the {record.sender} on "
                                       f"{record.channel.value}: {unit.problem}")  # fmt: skip
    for rule in Rule:
        if rule is Rule.ANSWERED_IN_TIME and reply_deadline is None:
            report.na(rule.label, "no --reply-deadline: how long an answer took is not judged")
            continue
        places = broken.get(rule, [])
        note = f"{len(places)} times; the first {SHOWN} shown" if len(places) > SHOWN else ""
        report.add(rule.label, not places, rule.text,
                   places[:SHOWN] or f"not broken in {messages} messages", note)  # fmt: skip
    report.add(DECODES, not undecodable, "every message frames and decodes; past a lost framing "
               "nothing on that channel is judged", undecodable[:SHOWN] or f"all {messages} did",
               f"{len(undecodable)} times; the first {SHOWN} shown"
               if len(undecodable) > SHOWN else "")  # fmt: skip
    return report
