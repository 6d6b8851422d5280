"""What the tap keeps of a pair, fed the units that pass it: the observer's picture
and verdicts, plus what only a watcher of real traffic adds (the files SHMEM_MAPs
carried, the channels whose framing was lost, when a request owed a reply was asked).

It does no I/O and reads no clock: the caller says when each unit passed. The live tap
feeds it under its lock as it relays; `shmemctl conformance --recording` feeds it a
recording's units with the times they were recorded. One judge, for both.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

from ..session.common import Rule
from ..session.observer import BACKEND, FRONTEND, Observer, Violation
from ..shmem.mapping import FileFacts
from ..wire.constants import SHMEM_BIT, BackendReq, ChannelKind
from ..wire.messages import Message, ShmemConfig, ShmemMap
from .framer import Unit


def direction(kind: ChannelKind, sender: str) -> str:
    """One direction of one channel, for people: 'main from front-end'."""
    return f"{kind.value} from {sender}"


class Finding(NamedTuple):
    """A rule broken, with the message that showed it."""

    channel: ChannelKind
    message: Message
    violation: Violation


class Judged(NamedTuple):
    """What a unit showed: rules it broke, and whether it is news that it could not be
    decoded (once per direction after the framing is lost)."""

    findings: list[Finding]
    undecodable: bool


def carries_map_file(unit: Unit) -> bool:
    """Whether `unit` is a SHMEM_MAP request the codec read, with its one fd: the file a
    mapping would be made of (a request the codec could not read makes no mapping)."""
    message = unit.message
    return (
        message is not None
        and message.channel is ChannelKind.BACKEND
        and not message.is_reply
        and message.request == BackendReq.SHMEM_MAP
        and isinstance(message.payload, ShmemMap)
        and len(unit.fds) == 1
    )


#: Files a watch remembers besides those of its picture's mappings (see `Watch.files`).
KEPT_FILES = 65_536


class Watch:
    """Feed `attached`, `unit` for each unit in the order the tap relayed them,
    `overdue` now and then, `detached`; read the picture from `observer` and the rest
    from the attributes."""

    def __init__(self, *, shmem_bit: int = SHMEM_BIT, reply_deadline: float | None = None) -> None:
        self.observer = Observer(shmem_bit=shmem_bit)
        #: seconds a request owed a reply may wait for it (ANSWERED_IN_TIME); None: no limit
        self.reply_deadline = reply_deadline
        #: violations so far, by rule label
        self.violations: Counter[str] = Counter()
        #: the files SHMEM_MAPs carried on this connection, by (st_dev, st_ino), latest
        #: last, whatever became of the request: a front-end that still maps one the
        #: picture does not hold is a finding. Those of the picture's mappings are all
        #: kept; of the others, the latest KEPT_FILES at least (a device that makes a
        #: file for every blob is watched for days), and a mapping of one forgotten is
        #: one of a file the tap never learnt (the verdict is then unknown, never agree)
        self.files: dict[tuple[int, int], FileFacts] = {}
        self._forget_past = KEPT_FILES
        #: directions of this connection relayed raw, their framing lost
        self.raw: set[str] = set()
        #: connections seen, the current one's number
        self.connections = 0
        #: the last layout a GET_SHMEM_CONFIG reply carried, and on which connection
        self.last_config: tuple[ShmemConfig, int] | None = None
        #: requests owed a reply, by id, with when they passed (the message is kept, so
        #: its id is not reused while it waits)
        self._asked: dict[int, tuple[Message, float]] = {}

    def attached(self) -> int:
        """A new pair of connections; its number."""
        self.connections += 1
        self.raw.clear()
        return self.connections

    def detached(self) -> None:
        """The connection ended: every mapping went with it."""
        self.observer.disconnected()
        self.files.clear()
        self._forget_past = KEPT_FILES
        self._asked.clear()

    def unit(
        self,
        kind: ChannelKind,
        sender: str,
        unit: Unit,
        *,
        decoding: bool,
        now: float,
        facts: FileFacts | None = None,
        answers_in_flight: bool = False,
    ) -> Judged:
        """One unit from `sender` on a channel of `kind`, at `now`. `decoding`: whether
        that direction's framing still holds after it; `facts`: what its fd is, given
        only for a SHMEM_MAP that `carries_map_file`; `answers_in_flight`: see
        `Observer.message`."""
        findings: list[Finding] = []
        message = unit.message
        if message is not None:
            findings = self._message(message, facts, now, answers_in_flight)
        news = bool(unit.problem)
        if unit.problem and not decoding:
            where = direction(kind, sender)
            news = where not in self.raw  # said once, when the framing was lost
            self.raw.add(where)
            self.observer.lost(kind)
        return Judged(findings, news)

    def overdue(self, now: float) -> list[Finding]:
        """Each request owed a reply that has waited past the deadline at `now`: a
        violation of the side that owes it, once."""
        deadline = self.reply_deadline
        if deadline is None:
            return []
        late: list[Finding] = []
        for key, (message, asked) in list(self._asked.items()):
            if not self.observer.owes(message):
                del self._asked[key]  # answered, or nothing on its channel is followed
            elif now - asked > deadline:
                del self._asked[key]
                owing = BACKEND if message.channel is ChannelKind.MAIN else FRONTEND
                detail = f"{message.name} not answered within {deadline:g}s"
                violation = Violation(Rule.ANSWERED_IN_TIME, owing, detail)
                late.append(Finding(message.channel, message, violation))
                self.violations[Rule.ANSWERED_IN_TIME.label] += 1
        return late

    def _forget_old_files(self) -> None:
        """Forget the oldest files no mapping of the picture is of, down to half of
        KEPT_FILES; then wait for as many more before looking again (one pass over the
        picture per KEPT_FILES // 2 maps at most, however many mappings it holds)."""
        held = {(m.dev, m.ino) for m in self.observer.mappings()}
        excess = len(self.files) - KEPT_FILES // 2
        for key in [key for key in self.files if key not in held][:excess]:
            del self.files[key]
        self._forget_past = len(self.files) + KEPT_FILES // 2

    def _message(
        self, message: Message, facts: FileFacts | None, now: float, answers_in_flight: bool
    ) -> list[Finding]:
        observer = self.observer
        if facts is not None and message.channel not in observer.blind:
            key = (facts.dev, facts.ino)
            self.files.pop(key, None)  # the latest last
            self.files[key] = facts
            if len(self.files) > self._forget_past:
                self._forget_old_files()
        violations = observer.message(message, facts, answers_in_flight=answers_in_flight)
        if self.reply_deadline is not None and observer.owes(message):
            self._asked[id(message)] = (message, now)
        if violations:  # most messages break nothing; Counter.update costs microseconds
            self.violations.update(v.rule.label for v in violations)
        config = observer.state.config
        if config is not None and (self.last_config is None or self.last_config[0] is not config):
            self.last_config = (config, self.connections)
        return [Finding(message.channel, message, v) for v in violations]
