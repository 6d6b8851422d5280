"""A tap's recording (`--record`): written as the tap relays, read back decoded again
from its bytes (`trace --replay`), and judged again by the same watch and rules
(`conformance --recording`). In memory: the recorder writes units a framer made of
real encoded messages with real fds, as the tap's links do."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from shmemctl.cli import main
from shmemctl.conformance.recording import DECODES, check_recording
from shmemctl.conformance.report import FAIL, NA, PASS
from shmemctl.events import Event
from shmemctl.session.common import Rule
from shmemctl.session.observer import BACKEND, FRONTEND
from shmemctl.shmem.mapping import dev_text
from shmemctl.tap import Framer
from shmemctl.tap.framer import replies_from
from shmemctl.tap.recording import (
    MAX_LINE,
    Recorder,
    RecordingError,
    replay,
    replay_events,
)
from shmemctl.wire import BackendReq, ChannelKind, FrontendReq, ShmemMap, encode
from shmemctl.wire.constants import ProtocolFeature
from shmemctl.wire.messages import ShmemConfig, encode_shmem_request, encode_u64_reply

from .conftest import MiB, memfd
from .test_tap import feed_all

MAIN, BACKEND_CH = ChannelKind.MAIN, ChannelKind.BACKEND
REGIONS = {0: 8 * MiB, 2: 64 << 10}
SHMEM = 1 << 22
OFFERED = ProtocolFeature.REPLY_ACK | ProtocolFeature.BACKEND_REQ | ProtocolFeature.BACKEND_SEND_FD
MAP = ShmemMap(shmid=0, fd_offset=0, shm_offset=0, len=MiB, flags=1)


class Recording:
    """Writes a recording as a tap would: each message framed by the tap's own framer
    for its direction, recorded with its fds still open."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.recorder = Recorder(str(path), shmem_bit=22, front="listen:/f", back="connect:/b")
        self.framers: dict[tuple[ChannelKind, str], Framer] = {}
        self.connection = 0
        self.opened: list[int] = []

    def attach(self) -> None:
        self.connection += 1
        self.recorder.attached(self.connection)

    def send(self, kind: ChannelKind, sender: str, data: bytes, fds: tuple[int, ...] = ()) -> None:
        key = (kind, sender)
        framer = self.framers.setdefault(key, Framer(kind, replies=replies_from(kind, sender)))
        for unit in feed_all(framer, data, {0: list(fds)} if fds else None):
            self.recorder.unit(self.connection, 0 if kind is MAIN else 1, kind, sender, unit)

    def ask(self, req: FrontendReq, payload: object = None, *, need_reply: bool = False) -> None:
        self.send(MAIN, FRONTEND, encode(MAIN, req, payload, need_reply=need_reply))  # type: ignore[arg-type]

    def answer(self, req: FrontendReq, payload: object) -> None:
        self.send(MAIN, BACKEND, encode(MAIN, req, payload, reply=True))  # type: ignore[arg-type]

    def handshake(self, acked: int = OFFERED | SHMEM) -> None:
        self.attach()
        self.ask(FrontendReq.GET_PROTOCOL_FEATURES)
        self.answer(FrontendReq.GET_PROTOCOL_FEATURES, int(OFFERED | SHMEM))
        self.ask(FrontendReq.SET_PROTOCOL_FEATURES, int(acked))
        self.ask(FrontendReq.GET_SHMEM_CONFIG)
        self.answer(FrontendReq.GET_SHMEM_CONFIG, ShmemConfig.from_regions(REGIONS))
        pair = os.pipe()  # what the fd is does not matter to the record of the handshake
        self.opened += pair
        self.send(MAIN, FRONTEND, encode(MAIN, FrontendReq.SET_BACKEND_REQ_FD), (pair[0],))

    def map(self, m: ShmemMap = MAP, answer: int | None = 0) -> int:
        fd = memfd(2 * MiB)
        self.opened.append(fd)
        self.send(BACKEND_CH, BACKEND, encode_shmem_request(BackendReq.SHMEM_MAP, m,
                                                            need_reply=True), (fd,))  # fmt: skip
        if answer is not None:
            self.send(BACKEND_CH, FRONTEND, encode_u64_reply(BackendReq.SHMEM_MAP, answer))
        return fd

    def close(self) -> None:
        self.recorder.close()
        for fd in self.opened:
            os.close(fd)


@pytest.fixture
def recording(tmp_path: Path) -> Iterator[Recording]:
    rec = Recording(tmp_path / "rec.jsonl")
    yield rec
    rec.close()


def verdicts(path: Path, reply_deadline: float | None = None) -> dict[str, str]:
    return check_recording(path, reply_deadline=reply_deadline).verdicts


# ------------------------------------------------------------------ reading back


def test_replay_gives_back_the_bytes_the_fds_and_the_decoded_messages(recording) -> None:
    recording.handshake()
    fd = recording.map()
    recording.recorder.detached(1, "the front-end closed the main channel")
    recorded = list(replay(recording.path))
    assert [r.type for r in recorded[:2]] == ["start", "attached"]
    assert recorded[-1].type == "detached"
    assert recorded[-1].reason == "the front-end closed the main channel"
    messages = [r for r in recorded if r.type == "message"]
    names = [(r.sender, r.units[0].message.name) for r in messages]  # type: ignore[union-attr]
    assert names == [
        (FRONTEND, "GET_PROTOCOL_FEATURES"), (BACKEND, "GET_PROTOCOL_FEATURES"),
        (FRONTEND, "SET_PROTOCOL_FEATURES"), (FRONTEND, "GET_SHMEM_CONFIG"),
        (BACKEND, "GET_SHMEM_CONFIG"), (FRONTEND, "SET_BACKEND_REQ_FD"),
        (BACKEND, "SHMEM_MAP"), (FRONTEND, "SHMEM_MAP"),
    ]  # fmt: skip
    shmem_map = messages[-2]
    assert shmem_map.units[0].data == encode_shmem_request(BackendReq.SHMEM_MAP, MAP,
                                                           need_reply=True)  # fmt: skip
    assert shmem_map.units[0].message.payload == MAP  # type: ignore[union-attr]
    st = os.fstat(fd)
    (facts,) = shmem_map.files
    assert (facts["kind"], facts["dev"], facts["ino"], facts["size"]) == (
        "memfd", dev_text(st.st_dev), st.st_ino, 2 * MiB)  # fmt: skip
    assert facts["file"].startswith("/memfd:test-buffer")
    assert shmem_map.file_facts() is not None and shmem_map.file_facts().ino == st.st_ino  # type: ignore[union-attr]
    assert messages[5].files[0]["kind"] == "pipe"


def test_replayed_events_read_like_the_live_trace(recording) -> None:
    recording.handshake()
    recording.map()
    events = list(replay_events(recording.path))
    assert all(e["event"] == Event.MESSAGE and e["data"]["role"] == "tap" for e in events)
    # as a live event comes: QMP's timestamp
    assert all(set(e["timestamp"]) == {"seconds", "microseconds"} for e in events)
    runner = CliRunner()
    done = runner.invoke(main, ["trace", "--replay", str(recording.path)])
    assert done.exit_code == 0, done.output
    lines = done.output.splitlines()
    assert len(lines) == len(events) == 8
    assert "fe->be main    GET_PROTOCOL_FEATURES" in lines[0]
    assert "be->fe main    GET_SHMEM_CONFIG reply" in lines[4]
    assert "be->fe backend SHMEM_MAP need_reply" in lines[6] and "fds=1" in lines[6]
    assert "fe->be backend SHMEM_MAP reply 0" in lines[7]
    done = runner.invoke(main, ["trace", "--replay", str(recording.path), "--count", "2",
                                "--json"])  # fmt: skip
    replayed = [json.loads(line) for line in done.output.splitlines()]
    assert [e["data"]["request"] for e in replayed] == [
        "GET_PROTOCOL_FEATURES", "GET_PROTOCOL_FEATURES"]  # fmt: skip
    assert all(e["event"] == Event.MESSAGE and e["source"] == "tap" for e in replayed)


def test_a_tap_appends_and_each_start_begins_afresh(recording) -> None:
    recording.handshake()
    recording.map()
    recording.recorder.close()
    again = Recorder(str(recording.path), shmem_bit=21, front="listen:/f", back="connect:/b")
    again.close()
    starts = [r for r in replay(recording.path) if r.type == "start"]
    assert [s.shmem_bit for s in starts] == [22, 21]


# ------------------------------------------------------------------ the rules over a recording


def test_a_clean_recording_passes_every_rule(recording) -> None:
    recording.handshake()
    recording.map()
    found = verdicts(recording.path, reply_deadline=5.0)
    assert set(found) == {rule.label for rule in Rule} | {DECODES}
    assert set(found.values()) == {PASS}


def test_the_rules_a_tap_judges_live_are_judged_again(recording) -> None:
    recording.handshake(acked=OFFERED)  # SHMEM not acked
    recording.map()  # a SHMEM_MAP all the same, and the front-end acks it
    recording.answer(FrontendReq.SET_OWNER, 0)  # an answer nobody asked for
    report = check_recording(recording.path, reply_deadline=None)
    found = report.verdicts
    assert found[Rule.SHMEM_NEGOTIATED.label] == FAIL
    assert found[Rule.REPLY_OWED.label] == FAIL
    assert found[Rule.ANSWERED_IN_TIME.label] == NA  # no deadline: not judged
    assert found[Rule.CONFIG_STABLE.label] == PASS
    assert not report.ok
    negotiated = next(r for r in report.results if r.check == Rule.SHMEM_NEGOTIATED.label)
    # where in the file, who, and what: enough to find it again
    assert negotiated.arrived[0].startswith("line 9: the back-end (backend SHMEM_MAP)")


def rewrite_times(path: Path, times: dict[int, float]) -> None:
    """Set the time of the lines numbered in `times` (1-based)."""
    lines = path.read_text().splitlines()
    for number, when in times.items():
        record = json.loads(lines[number - 1])
        record["time"] = when
        lines[number - 1] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")


def test_an_answer_later_than_the_deadline_is_the_owers_violation(recording) -> None:
    recording.handshake()
    recording.map(answer=None)
    recording.send(BACKEND_CH, FRONTEND, encode_u64_reply(BackendReq.SHMEM_MAP, 0))
    recording.recorder.close()
    lines = recording.path.read_text().splitlines()
    start = json.loads(lines[0])["time"]
    # the map (line 9) at +0, its answer (line 10) 7 s later
    rewrite_times(recording.path, {n: start for n in range(1, 10)} | {10: start + 7})
    assert verdicts(recording.path, reply_deadline=5.0)[Rule.ANSWERED_IN_TIME.label] == FAIL
    assert verdicts(recording.path, reply_deadline=10.0)[Rule.ANSWERED_IN_TIME.label] == PASS


def test_bytes_past_a_lost_framing_fail_the_decode_check_and_are_not_judged(recording) -> None:
    recording.handshake()
    recording.send(BACKEND_CH, BACKEND, b"\xff" * 40)  # no header a codec believes
    # a misaligned map, acked: two broken rules, were the channel still judged
    recording.map(MAP._replace(shm_offset=1))
    found = verdicts(recording.path)
    assert found[DECODES] == FAIL
    assert found[Rule.MAP_VALID.label] == found[Rule.REFUSES_INVALID.label] == PASS
    recording.recorder.close()
    (recording.path.parent / "judged.jsonl").write_text(
        "".join(line for line in recording.path.read_text().splitlines(keepends=True)
                if "/////" not in line)
    )
    # without the garbage the same map is judged: the check above could fail
    found = verdicts(recording.path.parent / "judged.jsonl")
    assert found[DECODES] == PASS
    assert found[Rule.MAP_VALID.label] == found[Rule.REFUSES_INVALID.label] == FAIL


# ------------------------------------------------------------------ what is not a recording


def good_start() -> str:
    return json.dumps({"type": "start", "version": 1, "time": 1.0, "shmem_bit": 22,
                       "front": "listen:/f", "back": "connect:/b"})  # fmt: skip


def message_line(**change: object) -> str:
    record = {"type": "message", "time": 2.0, "connection": 1, "link": 0, "channel": "main",
              "from": FRONTEND, "data": base64.b64encode(encode(MAIN, FrontendReq.GET_FEATURES)
              ).decode(), "fds": [], "decoded": None, "problem": "", "framed": True}  # fmt: skip
    record.update(change)
    return json.dumps(record)


@pytest.mark.parametrize(
    ("lines", "words"),
    [
        (["not json"], "line 1: not JSON"),
        (["[1, 2]"], "line 1: not a line a tap writes"),
        ([message_line()], "line 1: a message line before any start line"),
        ([good_start().replace('"version": 1', '"version": 9')], "version 9; this shmemctl"),
        ([good_start(), message_line(channel="side")], "line 2: channel must be main or backend"),
        ([good_start(), message_line(data="@@@")], "line 2: data must be the bytes in base64"),
        ([good_start(), message_line(**{"from": "guest"})], "line 2: from must be front-end"),
        ([good_start(), message_line(fds=[{}] * 4000)], "line 2: 4000 fds on 12 bytes; at most"),
        ([good_start(), message_line(fds=[{"kind": "memfd", "dev": "zz", "ino": 1, "size": 0,
                                           "file": ""}])], "dev 'zz' must read like 00:01"),
        ([good_start(), message_line(time="soon")], "line 2: 'time' must be int or float"),
        ([good_start(), message_line(connection=True)], "line 2: 'connection' must be int"),
        ([good_start(), "x" * (MAX_LINE + 10)], f"line 2: longer than {MAX_LINE}"),
    ],
)
def test_a_file_that_is_not_a_recording_says_where_and_what(tmp_path, lines, words) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordingError, match=words.replace("(", r"\(")):
        list(replay(path))
    for args in (["trace", "--replay", str(path)], ["conformance", "--recording", str(path)]):
        done = CliRunner().invoke(main, args)
        assert done.exit_code == 1
        assert words in done.output and "Traceback" not in done.output


def test_conformance_on_a_recording_exits_by_its_verdict(recording) -> None:
    recording.handshake()
    recording.map()
    runner = CliRunner()
    done = runner.invoke(main, ["conformance", "--recording", str(recording.path)])
    assert done.exit_code == 0, done.output
    assert "conformance of the pair recorded at" in done.output
    recording.answer(FrontendReq.SET_OWNER, 0)
    done = runner.invoke(main, ["conformance", "--recording", str(recording.path), "--json"])
    assert done.exit_code == 1
    report = json.loads(done.output)
    assert report["summary"]["fail"] == 1
    done = runner.invoke(main, ["conformance", "--recording", str(recording.path),
                                "--frontend", "/x.sock"])  # fmt: skip
    assert done.exit_code == 2 and "exactly one of" in done.output
