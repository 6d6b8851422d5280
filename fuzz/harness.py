"""Fuzzing harness: hypothesis-driven, seeded, bounded in examples, inputs and seconds.

    python fuzz/harness.py [--target NAME|all] [--examples N] [--inputs N] [--seconds S]
                           [--seed K] [--keep-going] [--no-shrink] [--workdir DIR] [--json]

Targets: the codec (bytes and fds into MessageReader), the engine (map/unmap/reset
sequences against real mmaps), the front-end daemon and backend_sim (each a real
process, fed hostile message sequences over real sockets); `control-frontend` and
`control-backend` (hostile QMP requests on the control socket of a real pair, in
every framing QMP allows, negotiated or not); and
`sim-control` (backend_sim's control commands while the harness, as its front-end,
answers the SHMEM requests they cause badly); and `tap` (a real `shmemctl tap` with
the harness as both of its peers, hostile either way on every channel, held to
relaying exactly what was sent: TapTarget). After every example the invariants
are checked: nothing but the layer's own error (never "internal error"), the daemon
alive, every complete control request answered once, in order and by QMP's rules
(QmpSession), its fds and buffers back to their baseline, and its tables in agreement
with the kernel and with its peer.

An input is one hostile message or one control request (for the tap, one pair of
connections with all its steps); an example carries many (the inputs of examples
that fail are not counted). A failure prints hypothesis's shrunk
example and the offending input with the daemon's answer (for the daemons, what led
there too); the same --seed reproduces the run; --keep-going goes on past a failure
to collect distinct ones, --no-shrink reports them as found, which is much quicker.
"""

from __future__ import annotations

import abc
import argparse
import array
import contextlib
import dataclasses
import errno
import fcntl
import json
import math
import os
import random
import re
import select
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from shmemctl.backend import BackendEndpoint, DeviceModel
from shmemctl.channel import SCM_MAX_FD, Channel, ChannelError, close_fds
from shmemctl.control import ControlClient
from shmemctl.control.protocol import MAX_DEPTH, MAX_REQUEST
from shmemctl.daemon import listen_unix, stop_process
from shmemctl.session.observer import BACKEND, FRONTEND
from shmemctl.shmem import RegionTable, ShmemRefused
from shmemctl.shmem.procmaps import disagreements, read_maps
from shmemctl.sizes import parse_regions
from shmemctl.tap.framer import Framer, Unit, replies_from
from shmemctl.wire import (
    BackendReq,
    ChannelKind,
    FrontendReq,
    MessageReader,
    ProtocolFeature,
    ShmemMap,
    WireError,
    encode,
    encode_u64_reply,
)
from shmemctl.wire.constants import VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1
from shmemctl.wire.messages import (
    DeviceConfig,
    MemoryRegion,
    MemoryTable,
    ShmemConfig,
    SingleMemoryRegion,
    VringAddr,
    VringState,
    encode_shmem_request,
    spec_of,
)

PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20
U64 = (1 << 64) - 1


@dataclass
class Outcome:
    target: str
    examples: int = 0
    inputs: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


CHUNK = 200
#: Distinct failures collected by --keep-going before a target gives up.
MAX_FAILURES = 12


class _OutOfTime(Exception):
    """The run's time is up, in the middle of a chunk (most likely while shrinking)."""


def _chunk(body: Callable[..., int | None], strategy: st.SearchStrategy, size: int,
           seed_value: int, ran: list[int], stop_at: float,
           shrink: bool) -> Callable[[], None]:  # fmt: skip
    # no explain phase: it replays a failing example dozens of times for a note we omit
    phases = [p for p in Phase if p != Phase.explain and (shrink or p != Phase.shrink)]

    @seed(seed_value)
    @settings(max_examples=size, deadline=None, database=None, phases=phases,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(strategy)
    def test(case: object) -> None:
        if time.monotonic() > stop_at:
            raise _OutOfTime  # every example fails at once: hypothesis is done quickly
        ran[0] += 1
        ran[1] += body(case) or 0

    return test


def _failures(exc: BaseException) -> list[str]:
    """Each failure an exception holds (hypothesis groups distinct ones, and a flaky one
    with what it raised), with hypothesis's notes: the shrunk example."""
    found = []
    todo: list[tuple[BaseException, str]] = [(exc, "")]
    while todo:
        e, prefix = todo.pop(0)
        if isinstance(e, _OutOfTime):
            continue
        if isinstance(e, BaseExceptionGroup):
            flaky = prefix or ("flaky: " if "Flaky" in type(e).__name__ else "")
            todo.extend((inner, flaky) for inner in e.exceptions)
            continue
        notes = "\n".join(getattr(e, "__notes__", ()))
        text = f"{prefix}{type(e).__name__}: {e}"[:3000]
        found.append((text + ("\n" + notes[:3000] if notes else "")).rstrip())
    return found


def _signature(failure: str) -> str:
    """What makes two failures the same finding: their first line, numbers aside."""
    first = failure.splitlines()[0] if failure else ""
    return re.sub(r"0x[0-9a-f]+|\d+", "N", first.removeprefix("flaky: "))[:160]


def _run(target: str, body: Callable[..., int | None], strategy: st.SearchStrategy,
         examples: int, seconds: float, seed_value: int, *, inputs: int | None = None,
         keep_going: bool = False, recover: Callable[[], None] | None = None,
         chunk_size: int = CHUNK, shrink: bool = True,
         wanted: str | None = None) -> Outcome:  # fmt: skip
    """Up to `examples` examples (and, if given, until `inputs` inputs), stopping between
    chunks once `seconds` are spent, and within one (shrinking, most likely) a little
    later. Chunk k is seeded with seed_value + k, so the same seed repeats the run. With
    `keep_going`, a failure is recorded, `recover` repairs the target, and the next chunk
    runs (until a failure that says `wanted`, if given); failures alike in their first line
    count once."""
    outcome = Outcome(target)
    started = time.monotonic()
    stop_at = started + seconds + max(10.0, seconds / 2)
    chunk = 0
    seen: set[str] = set()

    def more() -> bool:
        return (outcome.examples < examples and time.monotonic() - started < seconds
                and (inputs is None or outcome.inputs < inputs))  # fmt: skip

    while more():
        size = min(chunk_size, examples - outcome.examples)
        ran = [0, 0]
        try:
            _chunk(body, strategy, size, seed_value + chunk, ran, stop_at, shrink)()
        except Exception as exc:  # shrunk by hypothesis: report it, with how to repeat it
            for text in _failures(exc):
                if _signature(text) not in seen:
                    seen.add(_signature(text))
                    outcome.failures.append(f"{text}\n(chunk {chunk} of seed {seed_value})")
            outcome.examples += ran[0]
            outcome.inputs += ran[1]
            chunk += 1
            if not keep_going or len(outcome.failures) >= MAX_FAILURES:
                break
            if wanted is not None and any(wanted in f for f in outcome.failures):
                break
            if recover is not None:
                recover()
            continue
        outcome.examples += ran[0]
        outcome.inputs += ran[1]
        chunk += 1
    outcome.seconds = round(time.monotonic() - started, 1)
    return outcome


# ------------------------------------------------------------------ the codec

chunks = st.lists(st.tuples(st.binary(max_size=120), st.integers(0, 3)), max_size=12)
headers = st.builds(
    lambda req, flags, size, tail: struct.pack("<III", req, flags, size) + tail,
    st.integers(0, 60), st.sampled_from([0x1, 0x5, 0x9, 0xD, 0x0, 0x3, 0x11, 0xFFFFFFFF]),
    st.one_of(st.integers(0, 64), st.sampled_from([40, 2056, 4096, 4097, 1 << 31])),
    st.binary(max_size=80),
)  # fmt: skip
codec_case = st.tuples(
    st.sampled_from(list(ChannelKind)), st.booleans(),
    st.lists(st.one_of(headers.map(lambda b: (b, 0)),
                       chunks.map(lambda c: c[0] if c else (b"", 0))), max_size=10),
)  # fmt: skip


def codec_body(case: tuple) -> int:
    channel, replies, pieces = case
    reader = MessageReader(channel, replies=replies)
    fake_fd = 1000
    try:
        for data, nfds in pieces:
            reader.feed(data, tuple(range(fake_fd, fake_fd + nfds)))
            fake_fd += nfds
            for message in reader:
                assert len(message.fds) + len(message.surplus_fds) <= 32
        reader.close()
    except WireError:
        pass  # the codec's own error is the right answer to bad bytes
    return len(pieces)


# ------------------------------------------------------------------ the engine

ops = st.lists(
    st.tuples(
        st.sampled_from(["map", "map", "map", "unmap", "unmap", "reset"]),
        st.sampled_from([0, 1, 3, 200]),
        st.one_of(st.integers(0, 40).map(lambda p: p * PAGE), st.integers(0, 1 << 24),
                  st.sampled_from([U64 - PAGE + 1, 1 << 63])),
        st.one_of(st.integers(0, 8).map(lambda p: p * PAGE), st.integers(0, 1 << 16),
                  st.sampled_from([U64, 1 << 40])),
        st.one_of(st.integers(0, 8).map(lambda p: p * PAGE), st.integers(0, 100)),
        st.integers(0, 3),
    ),
    max_size=30,
)  # fmt: skip


def engine_body(sequence: list) -> int:
    fd = os.memfd_create("fuzz-engine", os.MFD_CLOEXEC)
    os.ftruncate(fd, 16 * PAGE)
    table = RegionTable({0: 40 * PAGE, 3: 8 * PAGE})
    try:
        for op, shmid, offset, length, fd_offset, flags in sequence:
            m = ShmemMap(shmid, offset, length, fd_offset, flags)
            try:
                if op == "map":
                    table.map(m, fd)
                elif op == "unmap":
                    table.unmap(m)
                else:
                    table.reset()
            except ShmemRefused:
                pass
            lines = read_maps()
            for sid, region in table.regions.items():
                mine = [x for x in table.mappings() if x.shmid == sid]
                assert not disagreements(lines, sid, region.base, region.size, mine)
    finally:
        table.close()
        os.close(fd)
    return len(sequence)


# ------------------------------------------------------------------ the daemons


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _wait(predicate: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


shmem_fields = st.tuples(
    st.sampled_from([0, 1, 2, 9]),
    st.one_of(st.integers(0, 32).map(lambda p: p * PAGE), st.integers(0, 1 << 24),
              st.just(U64 - PAGE + 1)),
    st.one_of(st.integers(0, 16).map(lambda p: p * PAGE), st.integers(0, 5000), st.just(U64)),
    st.one_of(st.just(0), st.integers(0, 8).map(lambda p: p * PAGE), st.just(1)),
    st.sampled_from([0, 1, 2, 1 << 63]),
)  # fmt: skip
# Mostly well-formed requests in a small window, so that maps collide and unmaps hit
# them; hostile fields, fd counts and raw garbage mixed in.
plausible = st.tuples(
    st.sampled_from([9, 9, 10]), st.sampled_from([0x9, 0x9, 0x1]),
    st.tuples(st.just(0), st.integers(0, 24).map(lambda p: p * PAGE),
              st.integers(1, 4).map(lambda p: p * PAGE), st.integers(0, 4).map(lambda p: p * PAGE),
              st.sampled_from([0, 1])),
    st.just(1), st.just(b""),
)  # fmt: skip
hostile = st.tuples(
    st.sampled_from([9, 10, 2, 77]), st.sampled_from([0x1, 0x9]), shmem_fields,
    st.sampled_from([0, 1, 2, 8]), st.just(b""),
)  # fmt: skip
garbage = st.tuples(st.just(-1), st.just(0), st.just(None), st.integers(0, 2),
                    st.binary(min_size=1, max_size=60))  # fmt: skip
backend_messages = st.lists(
    st.one_of(plausible, plausible, plausible, hostile, garbage), min_size=1, max_size=16
)


def _backend_request_bytes(req: int, flags: int, fields: tuple | None, raw: bytes) -> bytes:
    """The bytes of a `plausible`, `hostile` or `garbage` backend-channel message."""
    if req < 0 or fields is None:
        return raw
    shmid, off, length, fd_off, mflags = fields
    return encode_shmem_request(req, ShmemMap(shmid, off, length, fd_off, mflags),
                                need_reply=flags == 0x9)  # fmt: skip


def _end(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM a daemon of the harness, SIGKILL past 10 s; gone either way."""
    if proc is not None:
        stop_process(proc)


class FrontendTarget:
    """A real front-end process that reconnects to us after every example."""

    def __init__(self, workdir: Path, extra: tuple[str, ...] = ()) -> None:
        self.sock = str(workdir / "fuzz-fe.sock")
        self.ctl = str(workdir / "fuzz-fe.ctl")
        self.listener = listen_unix(self.sock)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shmemctl", "frontend", "--connect", self.sock,
             "--reconnect", "0.02", "--control", self.ctl, "--busy-poll-us", "0", *extra],
            stdout=subprocess.DEVNULL, stderr=open(workdir / "fuzz-fe.log", "w"),  # noqa: SIM115
        )  # fmt: skip
        self.buffer = os.memfd_create("fuzz-buffer", os.MFD_CLOEXEC)
        os.ftruncate(self.buffer, 8 * PAGE)
        self.baseline = -1

    def session(self, messages: list) -> int:
        self.listener.settimeout(20)
        sock, _ = self.listener.accept()
        endpoint = BackendEndpoint(DeviceModel({0: 32 * PAGE, 2: 8 * PAGE}), reply_timeout=2)
        main = Channel(sock, ChannelKind.MAIN, replies=False)
        server = threading.Thread(target=lambda: _quietly(endpoint.serve, main), daemon=True)
        server.start()
        assert endpoint.wait_ready(10), "the front-end never finished its handshake"
        if self.baseline < 0:
            time.sleep(0.1)
            self.baseline = _fd_count(self.proc.pid)
        ch = endpoint.backend_channel.channel  # type: ignore[union-attr]
        a, b = socket.socketpair()
        sent = 0
        try:
            for req, flags, fields, nfds, raw in messages:
                fds = ((self.buffer,) * nfds) if nfds < 8 else (a.fileno(),) * nfds
                data = _backend_request_bytes(req, flags, fields, raw)
                try:
                    ch.send(data, fds)
                    sent += 1
                    _drain(ch)
                except Exception:
                    break  # the front-end hung up: a fine answer to garbage
            self.check_agreement()  # while the mappings live: a disconnect drops them all
        finally:
            a.close()
            b.close()
            main.close()
            server.join(5)
        self.check()
        return sent

    def check_agreement(self) -> None:
        assert self.proc.poll() is None, "the front-end died"
        with ControlClient(self.ctl) as c:
            status = c.execute("query-status")
        assert status["disagreements"] == [], status["disagreements"]

    def check(self) -> None:
        assert self.proc.poll() is None, "the front-end died"
        assert _wait(lambda: _fd_count(self.proc.pid) <= self.baseline, 5), (
            f"front-end fds {_fd_count(self.proc.pid)} > baseline {self.baseline}"
        )
        with ControlClient(self.ctl) as c:
            status = c.execute("query-status")
        assert status["disagreements"] == [], status["disagreements"]
        held = {r["shmid"]: r["count"] for r in status["regions"] if r["count"]}
        # A back-end may map once the backend channel is there, before the front-end's
        # last handshake step (SET_FEATURES) is acked: mappings in "handshake" are fine.
        assert not held or status["state"] in ("connected", "handshake"), (
            f"the front-end holds mappings (shmid: count) {held} while {status['state']}: "
            "a disconnect must drop them all"
        )

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.listener.close()
        os.close(self.buffer)


#: (id, flags, payload, fds, whether the header announces 7 bytes more than sent)
main_message = st.tuples(
    st.integers(0, 50), st.sampled_from([0x1, 0x9, 0x5, 0x0, 0x21, 0xD]),
    st.one_of(st.binary(max_size=64), st.sampled_from([b"\0" * 8, b"\0" * 40, b"\0" * 2056])),
    st.integers(0, 4), st.booleans(),
)  # fmt: skip
main_messages = st.lists(main_message, min_size=1, max_size=10)


def _main_request_bytes(req: int, flags: int, payload: bytes, lie: bool) -> bytes:
    """The bytes of a `main_message`."""
    return struct.pack("<III", req, flags, len(payload) + (7 if lie else 0)) + payload


class BackendTarget:
    """A real backend_sim process; we are a front-end that says anything at all."""

    def __init__(self, workdir: Path, extra: tuple[str, ...] = ()) -> None:
        self.sock = str(workdir / "fuzz-be.sock")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "backend_sim", "--listen", self.sock, "--regions", "0=1M",
             "--control", str(workdir / "fuzz-be.ctl"), "--reply-timeout", "0.5", *extra],
            stdout=subprocess.DEVNULL, stderr=open(workdir / "fuzz-be.log", "w"),  # noqa: SIM115
        )  # fmt: skip
        assert _wait(lambda: os.path.exists(self.sock), 10), "backend_sim did not start"
        time.sleep(0.2)
        self.baseline = _fd_count(self.proc.pid)

    def session(self, messages: list) -> int:
        s = socket.socket(socket.AF_UNIX)
        s.connect(self.sock)
        ch = Channel(s, ChannelKind.MAIN, replies=True)
        extra = [os.eventfd(0) for _ in range(4)]
        sent = 0
        try:
            for req, flags, payload, nfds, lie in messages:
                try:
                    ch.send(_main_request_bytes(req, flags, payload, lie), tuple(extra[:nfds]))
                    sent += 1
                    _drain(ch)
                except Exception:
                    break
        finally:
            close_fds(extra)
            s.close()
        self.check()
        return sent

    def check(self) -> None:
        assert self.proc.poll() is None, "backend_sim died"
        assert _wait(lambda: _fd_count(self.proc.pid) <= self.baseline, 5), (
            f"backend_sim fds {_fd_count(self.proc.pid)} > baseline {self.baseline}"
        )

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _drain(ch: Channel) -> None:
    with contextlib.suppress(Exception):
        while ch.wait_readable(0.005):
            msg = ch.recv()
            close_fds(msg.fds)


def _quietly(fn: Callable[..., None], *args: object) -> None:
    with contextlib.suppress(Exception):
        fn(*args)


# ------------------------------------------------------------------ control lines
#
# A control line is built from a small tuple (what hypothesis draws, shrinks and
# prints) and rendered to bytes here. The same building blocks feed a seeded
# random.Random for the bulk of each example, so an example carries dozens of lines
# at little cost; hypothesis shrinks that bulk away when it is not needed.


class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()

INT_EDGES = (
    0, 1, -1, 255, 256, PAGE - 1, PAGE, PAGE + 1, 2 * PAGE, 2**31 - 1, 2**31, 2**32, 2**53 + 1,
    2**63 - 1, 2**63, U64, 2**64, 2**64 + PAGE, -PAGE, -(2**63), -(2**63) - 1, 10**30,
    10**4299, -(10**4299),  # 4300 digits: the most Python converts between int and text
)  # fmt: skip
FLOAT_EDGES = (0.0, -0.0, 0.5, 4096.0, 1e308, math.inf, -math.inf, math.nan, 5e-324)
TEXT_EDGES = ("", "0", "4096", "4K", "map", "status", "\x00", "é", "\udcff", "x" * 300, "null")
#: Numbers as JSON text: past Python's 4300-digit conversion limit, past a double,
#: and forms JSON does not allow.
NUMBER_TEXTS = (
    "1" * 4300, "1" * 4301, "-" + "9" * 5000, "1e400", "-1e400", "1.5e-400", "NaN", "-Infinity",
    "01", "0x10", "1_000", "1" + "0" * 20000,
)  # fmt: skip
#: A map of fd_offset + len beyond this is rendered as one page. backend_sim makes the
#: buffer (and writes a tag on every page) before the front-end can refuse it; a length
#: like 2**62 would cost the machine all its memory rather than find a bug.
SAFE_BUFFER = 64 * MiB

json_scalars = st.one_of(
    st.sampled_from(INT_EDGES), st.integers(), st.sampled_from(FLOAT_EDGES), st.floats(),
    st.sampled_from(TEXT_EDGES), st.text(max_size=8), st.booleans(), st.none(),
)  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=6,
)  # fmt: skip

_ints = st.one_of(st.sampled_from(INT_EDGES), st.integers(0, 40).map(lambda p: p * PAGE))
_shmids = st.one_of(st.sampled_from([0, 0, 0, 1, 1, 2]), st.sampled_from([255, 256, -1, 2**64]))
_offsets = st.one_of(st.integers(0, 40).map(lambda p: p * PAGE), _ints)
_lengths = st.one_of(
    st.integers(1, 8).map(lambda p: p * PAGE),
    st.sampled_from([*INT_EDGES, 8 * MiB, 8 * MiB + PAGE, 64 * MiB, 64 * 1024]),
)  # fmt: skip
map_args = st.fixed_dictionaries(
    {"shmid": _shmids, "shm_offset": _offsets, "len": _lengths},
    optional={"fd_offset": _offsets, "ro": st.booleans(), "buffer": st.integers(-1, 40)},
)
unmap_args = st.fixed_dictionaries({"shmid": _shmids, "shm_offset": _offsets, "len": _lengths})
#: The events a daemon (or the tap) publishes: their names on the wire, QMP's upper case.
EVENTS = frozenset({
    "MAPPED", "UNMAPPED", "REFUSED", "RESET", "CONNECTED", "DISCONNECTED", "HANDSHAKE",
    "RECONNECTING", "MESSAGE", "ATTACHED", "DETACHED", "VIOLATION", "UNDECODABLE",
})  # fmt: skip
#: The protocol trace: delivered only to a subscriber that names it.
TRACE = "MESSAGE"
#: What a subscribe names: events, and names that are none (the lower case of before
#: QMP, nonsense, nothing), which must be refused.
EVENT_NAMES = ("MAPPED", "UNMAPPED", "REFUSED", "RESET", "MESSAGE", "CONNECTED", "DISCONNECTED",
               "mapped", "Reset", "nonsense", "")  # fmt: skip
event_lists = st.one_of(
    st.none(), st.just([]), st.lists(st.sampled_from(EVENT_NAMES), max_size=3), json_values
)
RATES = (1, 200, 2000, 10000, 10001, 0, -1, 0.001, math.nan, math.inf, "10", True)
#: QMP's negotiation: the one command served before it, and refused after it.
NEGOTIATE = "qmp_capabilities"
#: The commands every control server serves itself.
BUILTINS: dict[str, st.SearchStrategy] = {
    NEGOTIATE: st.fixed_dictionaries({}, optional={"enable": st.one_of(
        st.just([]), st.lists(st.sampled_from(["oob", "OOB", ""]), min_size=1, max_size=2),
        json_values)}),
    "query-commands": st.just({}),
    "query-version": st.just({}),
    "subscribe": st.fixed_dictionaries({}, optional={"events": event_lists}),
}  # fmt: skip
PLAUSIBLE: dict[str, dict[str, st.SearchStrategy]] = {
    "backend": {
        "map": map_args,
        "unmap": unmap_args,
        "batch": st.fixed_dictionaries(
            {"maps": st.lists(st.one_of(map_args, map_args, map_args, json_values), max_size=6)}
        ),
        "query-status": st.just({}),
        "scenario-start": st.fixed_dictionaries(
            {"name": st.sampled_from(["blobs", "dax", "blobs", "nope", ""])},
            optional={
                "rate": st.sampled_from(RATES),
                "shmid": st.sampled_from([0, 1, 2, 256, -1, 2**64]),
                "seed": _ints,
            },
        ),
        "scenario-stop": st.just({}),
        **BUILTINS,
    },
    "frontend": {
        "query-status": st.fixed_dictionaries(
            {}, optional={"max_mappings": st.sampled_from([0, 1, 1000, 10**6, -1, 2**64, 1.5])}
        ),
        "get-shmem-config": st.just({}),
        "reset": st.just({}),
        "read": st.fixed_dictionaries(
            {"shmid": _shmids, "offset": _offsets},
            optional={"length": st.sampled_from([1, 64, 4096, 4097, 0, -1, 2**64, 2**63])},
        ),
        **BUILTINS,
    },
}
#: Names no daemon of a pair serves: the commands' names before QMP among them.
UNKNOWN_COMMANDS = (
    "", "MAP", "map ", "status", "query-status\x00", "__class__", "shutdown", "quit",
    "shmem-config", "query-shmem-config", "QMP_CAPABILITIES", "qmp-capabilities",
)  # fmt: skip
ODD_KEYS = ("arguments", "execute", "id", "Execute", "x", "", "arguments ", "exec-oob",
            "control")  # fmt: skip


_KEYS = {
    "backend": {"shmid", "shm_offset", "len", "fd_offset", "ro", "buffer", "maps", "name",
                "rate", "seed", "events", "enable"},
    "frontend": {"max_mappings", "shmid", "offset", "length", "events", "enable"},
}  # fmt: skip


def _request_specs(role: str) -> st.SearchStrategy:
    ids = st.one_of(st.just(ABSENT), st.integers(), json_values)
    extras = st.one_of(
        st.just({}),
        st.just({}),
        st.dictionaries(st.sampled_from(ODD_KEYS), json_values, max_size=2),
    )
    anything = st.one_of(
        st.dictionaries(st.sampled_from([*sorted(_KEYS[role]), "bogus"]), json_values, max_size=4),
        json_values,
        st.just(ABSENT),
    )

    def for_command(name: st.SearchStrategy, known: st.SearchStrategy | None) -> st.SearchStrategy:
        args = anything if known is None else st.one_of(known, known, known, known, anything)
        return st.tuples(st.just("req"), name, args, ids, extras)

    # one strategy per command, built once (a flatmap would build them for every draw)
    return st.one_of(
        *(for_command(st.just(name), known) for name, known in sorted(PLAUSIBLE[role].items())),
        for_command(st.sampled_from(UNKNOWN_COMMANDS), None),
        st.tuples(st.just("req"), json_values, st.just(ABSENT), st.just(ABSENT), st.just({})),
    )


def line_specs(role: str) -> st.SearchStrategy:
    request = _request_specs(role)
    return st.one_of(
        request, request, request, request,
        st.tuples(st.just("json"), json_values),
        st.tuples(st.just("raw"), st.binary(max_size=40)),
        st.tuples(st.just("nest"), st.sampled_from(["list", "dict", "args", "id"]),
                  st.sampled_from([2, 15, 16, 17, 32, 100, 999, 1000, 1001, 5000, 20000]),
                  st.booleans()),
        st.tuples(st.just("long"), st.sampled_from(["x", "id"]),
                  st.sampled_from([MAX_REQUEST - 1, MAX_REQUEST, MAX_REQUEST + 1, 4096, 200_000])),
        st.tuples(st.just("many"), st.integers(2, 40),
                  st.sampled_from(["", " ", "\r", "\t", ";", ",", "\x00"])),
        st.tuples(st.just("number"), st.sampled_from(["bare", "id", "len", "shmid"]),
                  st.sampled_from(NUMBER_TEXTS)),
        st.tuples(st.just("blank"), st.sampled_from(["", " ", "\t", "\r", "\x0b\x0c", " \r\t"])),
    )  # fmt: skip


# The same kinds of line from a seeded random.Random: the bulk of every example.


def _rand_scalar(rng: random.Random) -> Any:
    pick = rng.randrange(9)
    if pick < 3:
        return rng.choice(INT_EDGES)
    if pick == 3:
        return rng.randrange(-(2**70), 2**70)
    if pick == 4:
        return rng.choice(FLOAT_EDGES)
    if pick == 5:
        return rng.choice(TEXT_EDGES)
    if pick == 6:
        return rng.choice([True, False, None])
    if pick == 7:
        return [rng.choice(INT_EDGES) for _ in range(rng.randrange(3))]
    return {"k": rng.choice(INT_EDGES)}


def _rand_int(rng: random.Random, common: Callable[[random.Random], int]) -> Any:
    roll = rng.random()
    if roll < 0.75:
        return common(rng)
    if roll < 0.95:
        return rng.choice(INT_EDGES)
    return _rand_scalar(rng)


def _rand_map(rng: random.Random) -> dict[str, Any]:
    args = {
        "shmid": _rand_int(rng, lambda r: r.choice([0, 0, 0, 1, 1, 2])),
        "shm_offset": _rand_int(rng, lambda r: r.randrange(40) * PAGE),
        "len": _rand_int(rng, lambda r: r.randrange(1, 9) * PAGE),
    }
    if rng.random() < 0.3:
        args["fd_offset"] = _rand_int(rng, lambda r: r.randrange(8) * PAGE)
    if rng.random() < 0.3:
        args["ro"] = rng.random() < 0.8 or _rand_scalar(rng)
    if rng.random() < 0.1:
        args["buffer"] = rng.randrange(-1, 40)
    return args


def _rand_args(rng: random.Random, role: str, name: str) -> Any:
    roll = rng.random()
    if roll < 0.05:
        return ABSENT
    if roll < 0.1:
        return _rand_scalar(rng)
    if roll < 0.2:
        return {rng.choice([*sorted(_KEYS[role]), "bogus"]): _rand_scalar(rng)
                for _ in range(rng.randrange(4))}  # fmt: skip
    if name in ("map", "read") or (name == "unmap" and role == "backend"):
        args = _rand_map(rng)
        if name == "unmap":
            args = {k: args[k] for k in ("shmid", "shm_offset", "len")}
        if name == "read":
            args = {"shmid": args["shmid"], "offset": args["shm_offset"]}
            if rng.random() < 0.5:
                args["length"] = _rand_int(rng, lambda r: r.choice([1, 64, 4096, 4097]))
        return args
    if name == "batch":
        return {"maps": [_rand_map(rng) if rng.random() < 0.9 else _rand_scalar(rng)
                         for _ in range(rng.randrange(7))]}  # fmt: skip
    if name == "scenario-start":
        args = {"name": rng.choice(["blobs", "dax", "blobs", "nope"])}
        if rng.random() < 0.7:
            args["rate"] = rng.choice([200, 2000, 10000, 10001, 0, -1, 0.5, math.nan, "10"])
        if rng.random() < 0.3:
            args["shmid"] = rng.choice([0, 1, 2, 256])
        if rng.random() < 0.5:
            args["seed"] = rng.randrange(1000)
        return args
    if name == "subscribe":
        return rng.choice(
            [
                {},
                {"events": ["MAPPED", "REFUSED"]},
                {"events": ["MESSAGE"]},
                {"events": ["UNMAPPED", "RESET", "DISCONNECTED"]},
                {"events": []},
                {"events": ["mapped"]},  # the name before QMP: no event now
                {"events": ["nonsense"]},
                {"events": [1]},
                {"events": "MAPPED"},
            ]
        )
    if name == NEGOTIATE:
        return rng.choice([{}, {"enable": []}, {"enable": ["oob"]}, {"enable": "oob"},
                           {"enable": None}])  # fmt: skip
    if name == "query-status" and role == "frontend" and rng.random() < 0.3:
        return {"max_mappings": rng.choice([0, 1, 1000, -1, 2**64])}
    return {}


def random_spec(rng: random.Random, role: str) -> tuple:
    roll = rng.random()
    names = sorted(PLAUSIBLE[role])
    if roll < 0.80:
        name = rng.choice(names) if rng.random() < 0.93 else rng.choice(UNKNOWN_COMMANDS)
        if name in BUILTINS and name != "subscribe" and rng.random() < 0.7:
            name = rng.choice(names)  # they answer the same every time: fewer of them
        rid = rng.choice([ABSENT, rng.randrange(1 << 20), "r" + str(rng.randrange(99)), None,
                          rng.choice(INT_EDGES), _rand_scalar(rng)])  # fmt: skip
        extra = {} if rng.random() < 0.95 else {rng.choice(ODD_KEYS): _rand_scalar(rng)}
        return ("req", name, _rand_args(rng, role, name), rid, extra)
    if roll < 0.84:
        return ("json", _rand_scalar(rng))
    if roll < 0.89:
        return ("raw", rng.randbytes(rng.randrange(40)))
    if roll < 0.92:
        return ("nest", rng.choice(["list", "dict", "args", "id"]),
                rng.choice([16, 17, 100, 1000, 5000]), rng.random() < 0.5)  # fmt: skip
    if roll < 0.93:
        return ("long", rng.choice(["x", "id"]), rng.choice([MAX_REQUEST, MAX_REQUEST + 1, 4096]))
    if roll < 0.95:
        return ("many", rng.randrange(2, 20), rng.choice(["", " ", ";"]))
    if roll < 0.98:
        return ("number", rng.choice(["bare", "id", "len", "shmid"]), rng.choice(NUMBER_TEXTS))
    return ("blank", rng.choice(["", " ", "\t", "\r"]))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _safe_map(args: object) -> object:
    """A map backend_sim can make a buffer for quickly, or that fails at once."""
    if not isinstance(args, dict):
        return args
    length, fd_offset = args.get("len"), args.get("fd_offset", 0)
    if _is_int(length) and _is_int(fd_offset) and SAFE_BUFFER < length + fd_offset < 2**63:
        args = {**args, "len": PAGE}
        if "fd_offset" in args and SAFE_BUFFER < PAGE + fd_offset < 2**63:
            args["fd_offset"] = 0
    return args


def _safe_request(obj: dict[str, Any]) -> dict[str, Any]:
    args = obj.get("arguments")
    if obj.get("execute") == "map":
        obj["arguments"] = _safe_map(args)
    elif obj.get("execute") == "batch" and isinstance(args, dict):
        maps = args.get("maps")
        if isinstance(maps, list):
            obj["arguments"] = {**args, "maps": [_safe_map(m) for m in maps]}
    return obj


_NESTS = {
    "list": ("[", "]", ""),
    "dict": ('{"a":', "}", "1"),
    "args": ('{"a":', "}", "1"),
    "id": ("[", "]", ""),
}


def render(spec: tuple) -> tuple[bytes, Any]:
    """The bytes of a line (no separator) and the id it carries (ABSENT: none, or not
    known in advance). Which id its answer must echo is QmpSession's to say, from the
    stream as QMP frames it: a line may be several requests, or part of one."""
    kind = spec[0]
    if kind == "req":
        _, execute, args, rid, extra = spec
        obj: dict[str, Any] = {}
        if execute is not ABSENT:
            obj["execute"] = execute
        if args is not ABSENT:
            obj["arguments"] = args
        if rid is not ABSENT:
            obj["id"] = rid
        obj.update(extra)
        obj = _safe_request(obj)
        rid = obj.get("id", ABSENT)
        return json.dumps(obj).encode(), rid  # null is an id too: QMP echoes it
    if kind == "json":
        return json.dumps(spec[1]).encode(), ABSENT
    if kind == "raw":
        return spec[1], ABSENT
    if kind == "nest":
        _, style, depth, closed = spec
        opener, closer, leaf = _NESTS[style]
        inner = opener * depth + ((leaf + closer * depth) if closed else "")
        if style == "args":
            inner = '{"execute":"query-status","arguments":' + inner + ("}" if closed else "")
        elif style == "id":
            inner = '{"execute":"query-status","id":' + inner + ("}" if closed else "")
        return inner.encode(), ABSENT
    if kind == "long":
        _, style, n = spec
        if style == "x":
            return b"x" * n, ABSENT
        head, tail = b'{"execute":"query-status","id":"', b'"}'
        return head + b"i" * max(0, n - len(head) - len(tail)) + tail, ABSENT
    if kind == "many":
        _, k, sep = spec
        return sep.join(['{"execute":"query-status"}'] * k).encode(), ABSENT
    if kind == "number":
        _, where, text = spec
        if where == "bare":
            return text.encode(), ABSENT
        if where == "id":
            return ('{"execute":"query-status","id":' + text + "}").encode(), ABSENT
        return (
            '{"execute":"map","arguments":{"shmid":'
            + (text if where == "shmid" else "0")
            + ',"shm_offset":0,"len":'
            + (text if where == "len" else "4096")
            + "}}"
        ).encode(), ABSENT
    if kind == "blank":
        return spec[1].encode(), ABSENT
    raise ValueError(f"no line kind {kind!r}")


def _shown(line: bytes, limit: int = 160) -> str:
    text = repr(line[:limit])
    return text + (f"... ({len(line)} bytes)" if len(line) > limit else "")


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _parse_answer(raw: bytes, context: str) -> dict[str, Any]:
    """One answer line: strict JSON (no NaN or Infinity), an object."""
    try:
        answer = json.loads(raw, parse_constant=_reject_constant)
    except ValueError as exc:
        where = next((m.start() for m in re.finditer(rb"NaN|-?Infinity", raw)), 0)
        raise AssertionError(f"an answer that is not strict JSON\n  {exc}: ..."
                             f"{_shown(raw[max(0, where - 120) :], 240)}"
                             f"\n  {context}") from None  # fmt: skip
    if not isinstance(answer, dict):
        raise AssertionError(f"an answer that is not a JSON object: {_shown(raw)}\n  {context}")
    return answer


#: QMP's error classes that shmemctl answers with (shmemctl.control.ErrorClass).
GENERIC, NOT_FOUND = "GenericError", "CommandNotFound"


def _check_answer(answer: dict[str, Any], line: bytes, role: str) -> None:
    """An answer as QMP has it: `return` or `error` (class and desc), and perhaps `id`;
    never an internal error."""
    error = answer.get("error")
    extra = sorted(set(answer) - {"return", "error", "id"})
    if extra or ("return" in answer) == (error is not None):
        raise AssertionError(f"{role}: an answer that is not QMP's (one of return or error, "
                             f"and id): {_shown(json.dumps(answer).encode(), 300)}"
                             f"\n  request {_shown(line)}")  # fmt: skip
    if error is None:
        return
    desc = error.get("desc") if isinstance(error, dict) else None
    if not isinstance(desc, str) or set(error) != {"class", "desc"}:
        raise AssertionError(f"{role}: an error without class and desc: {error}"
                             f"\n  request {_shown(line)}")  # fmt: skip
    if "internal error" in desc.lower():
        raise AssertionError(f"{role}: {desc[:200]}\n  request {_shown(line, 400)}")
    if error["class"] not in (GENERIC, NOT_FOUND):
        raise AssertionError(f"{role}: error class {error['class']!r}, not one of QMP's "
                             f"{GENERIC} and {NOT_FOUND}: {desc[:200]}"
                             f"\n  request {_shown(line)}")  # fmt: skip


def _check_greeting(greeting: object, where: str) -> dict[str, Any]:
    """QMP's greeting: the server's version, and no capabilities (none is offered)."""
    qmp = greeting.get("QMP") if isinstance(greeting, dict) else None
    version = qmp.get("version") if isinstance(qmp, dict) else None
    qemu = version.get("qemu") if isinstance(version, dict) else None
    if (
        not isinstance(greeting, dict) or set(greeting) != {"QMP"}
        or not isinstance(qmp, dict) or set(qmp) != {"version", "capabilities"}
        or qmp["capabilities"] != []
        or not isinstance(version, dict) or set(version) != {"qemu", "package"}
        or not isinstance(version["package"], str)
        or not isinstance(qemu, dict) or set(qemu) != {"major", "minor", "micro"}
        or not all(_is_int(v) and v >= 0 for v in qemu.values())
    ):  # fmt: skip
        raise AssertionError(f"{where}: not QMP's greeting: {greeting!r:.300}")
    return version


def _check_event(event: dict[str, Any], where: str) -> str:
    """An event as QMP sends one: a known name, its data, a timestamp in seconds and
    microseconds. Its name."""
    stamp = event.get("timestamp")
    if (
        set(event) != {"event", "data", "timestamp"}
        or not isinstance(event["event"], str)
        or event["event"] not in EVENTS
        or not isinstance(event["data"], dict)
        or not isinstance(stamp, dict) or set(stamp) != {"seconds", "microseconds"}
        or not _is_int(stamp["seconds"]) or abs(stamp["seconds"] - time.time()) > 3600
        or not _is_int(stamp["microseconds"]) or not 0 <= stamp["microseconds"] < 1_000_000
    ):  # fmt: skip
        raise AssertionError(f"{where}: not a QMP event of ours: "
                             f"{_shown(json.dumps(event).encode(), 300)}")  # fmt: skip
    name: str = event["event"]
    return name


# ------------------------------------------------------------------ QMP's framing
#
# QMP input is a stream of JSON values, with or without whitespace between them: one
# ends where its brackets balance (outside strings). Top-level text that is no object
# or array is taken up to the next newline as one bad request. This is the harness's
# own reading of that, to know what the daemon must answer: each complete request once,
# in order; a request longer than MAX_REQUEST (complete or not) an error, then EOF.

_STRUCTURE = re.compile(rb'[\[\]{}"]')
_IN_STRING = re.compile(rb'["\\]')
_BLANK = b" \t\r\n"


@dataclass
class Framed:
    """One request of a stream, as QMP frames it."""

    start: int
    data: bytes
    #: top-level text that is no object or array (taken up to its newline)
    junk: bool
    #: its brackets balanced (a value), its newline came (junk), or it nested too deep (then
    #: it is answered at once, and the rest of its line is dropped)
    complete: bool
    #: how deeply it nests arrays and objects
    deepest: int = 0


def frame_requests(stream: bytes) -> list[Framed]:
    """The requests of a stream, in order; the last one may be incomplete. A 0xff byte
    resets the daemon's framing wherever it comes (answered as an error): what was
    unfinished before it is dropped."""
    out: list[Framed] = []
    at = 0
    *before, last = stream.split(b"\xff")
    for piece in before:
        # what 0xff cut short is dropped, unless it was too long already (that ends it)
        out += [_moved(f, at) for f in _frame_piece(piece)
                if f.complete or len(f.data) > MAX_REQUEST]  # fmt: skip
        at += len(piece)
        out.append(Framed(at, b"\xff", True, True))
        at += 1
    return out + [_moved(f, at) for f in _frame_piece(last)]


def _moved(framed: Framed, by: int) -> Framed:
    return dataclasses.replace(framed, start=framed.start + by)


def _frame_piece(stream: bytes) -> list[Framed]:
    out: list[Framed] = []
    at, size = 0, len(stream)
    while at < size:
        if stream[at] in _BLANK:
            at += 1
            continue
        start = at
        if stream[at] not in b"[{":
            end = stream.find(b"\n", at)
            complete = end >= 0
            end = end if complete else size
            out.append(Framed(start, stream[start:end], True, complete))
            at = end + 1
            continue
        depth = deepest = 0
        complete = False
        while not complete:
            found = _STRUCTURE.search(stream, at)
            if found is None:
                at = size
                break
            at = found.end()
            char = found.group()
            if char == b'"':
                while True:
                    quote = _IN_STRING.search(stream, at)
                    if quote is None:
                        at = size + 1
                        break
                    at = quote.end() + (1 if quote.group() == b"\\" else 0)
                    if quote.group() == b'"':
                        break
                if at > size:
                    at = size
                    break
            elif char in b"[{":
                depth += 1
                deepest = max(deepest, depth)
                if depth > MAX_DEPTH:  # answered at once; the rest of its line is dropped
                    complete = True
                    break
            else:
                depth -= 1
                complete = depth == 0
        out.append(Framed(start, stream[start:at], False, complete, deepest))
        if deepest > MAX_DEPTH:
            newline = stream.find(b"\n", at)
            at = size if newline < 0 else newline + 1
    return out


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} is no finite number")
    return value


def _request(framed: Framed) -> tuple[bool, Any]:
    """Whether a complete request is JSON the daemon can read, and its value."""
    if framed.junk or framed.deepest > MAX_DEPTH:
        return False, None
    try:
        return True, json.loads(framed.data, parse_constant=_reject_constant,
                                parse_float=_finite)  # fmt: skip
    except (ValueError, RecursionError):
        return False, None


def _same(a: object, b: object) -> bool:
    """The same JSON value (ABSENT only as itself)."""
    if a is ABSENT or b is ABSENT:
        return a is b
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


class QmpSession:
    """QMP's rules for one connection, request by request: the id echoed (none for a
    request that is no readable object), nothing but qmp_capabilities served before the
    negotiation and it only once, CommandNotFound for a command the daemon has not and
    never for one it has; and the events it may receive, by its subscriptions."""

    def __init__(self, role: str, commands: set[str], version: object = None,
                 negotiated: bool = False) -> None:  # fmt: skip
        self.role = role
        self.commands = commands
        self.version = version
        self.negotiated = negotiated
        #: events any subscription of this connection asked for
        self.wanted: set[str] = set()

    def check(self, framed: Framed, answer: dict[str, Any]) -> None:
        line = framed.data
        _check_answer(answer, line, self.role)
        readable, request = _request(framed)
        is_object = readable and isinstance(request, dict)
        # QMP echoes an id whatever JSON value it is, null too
        rid = request.get("id", ABSENT) if is_object else ABSENT
        got = answer.get("id", ABSENT)
        if not _same(got, rid):
            raise AssertionError(f"{self.role}: an answer with id {got!r:.200} to a request "
                                 f"with {'no id' if rid is ABSENT else f'id {rid!r:.200}'}"
                                 f"\n  request {_shown(line)}")  # fmt: skip
        error = answer.get("error") or {}
        cls = error.get("class")

        def want(expected: str | None, why: str, words: str = "") -> None:
            found = "a return" if cls is None else f"{cls} ({error.get('desc', '')[:200]})"
            if cls != expected or words not in error.get("desc", words):
                raise AssertionError(f"{self.role}: {why}: "
                                     f"{'a return' if expected is None else expected} "
                                     f"expected, {found}\n  request {_shown(line)}")  # fmt: skip

        if not is_object:
            want(GENERIC, "a request that is no readable JSON object")
            return
        name = request.get("execute")
        if "exec-oob" in request:
            want(GENERIC, "exec-oob (out-of-band execution is not offered)", "out-of-band")
            return
        if not isinstance(name, str) or set(request) - {"execute", "arguments", "id"}:
            want(GENERIC, "a request without execute, or with other members")
            return
        if not self.negotiated:
            if name != NEGOTIATE:
                want(NOT_FOUND, f"{name!r} before the negotiation", NEGOTIATE)
                return
            args = request.get("arguments")
            if args is None or (isinstance(args, dict) and set(args) <= {"enable"}
                                and args.get("enable", []) == []):  # fmt: skip
                want(None, "a negotiation that asks for no capability")
                if answer["return"] != {}:
                    raise AssertionError(f"{self.role}: qmp_capabilities returned "
                                         f"{answer['return']!r:.200}, not {{}}")  # fmt: skip
                self.negotiated = True
            else:
                want(GENERIC, "a negotiation that asks for a capability, or is malformed")
            return
        if name == NEGOTIATE:
            want(NOT_FOUND, "a second negotiation")
            return
        if name not in self.commands:
            want(NOT_FOUND, f"no command {name!r}")
            return
        if cls == NOT_FOUND:
            want(GENERIC, f"the {self.role}'s own command {name!r}")
        if cls is not None:
            return
        self._returned(name, request.get("arguments"), answer["return"])

    def _returned(self, name: str, args: Any, result: Any) -> None:
        if name == "subscribe":
            names = args.get("events") if isinstance(args, dict) else None
            if names is None:
                self.wanted |= EVENTS - {TRACE}
            elif isinstance(names, list) and all(isinstance(n, str) and n in EVENTS
                                                 for n in names):  # fmt: skip
                self.wanted |= set(names)
            else:
                raise AssertionError(f"{self.role}: a subscription to {names!r:.200} accepted:"
                                     " none of these is an event")  # fmt: skip
        elif (
            name == "query-version" and self.version is not None and not _same(result, self.version)
        ):
            raise AssertionError(f"{self.role}: query-version says {result!r:.200}, the greeting "
                                 f"{self.version!r:.200}")  # fmt: skip
        elif name == "query-commands":
            served = {str(c.get("name")) for c in result if isinstance(c, dict)} if isinstance(
                result, list) else set()  # fmt: skip
            if not self.commands <= served:
                raise AssertionError(f"{self.role}: query-commands lists {sorted(served)}, "
                                     f"without {sorted(self.commands - served)}")  # fmt: skip

    def check_events(self, events: list[str]) -> None:
        unasked = sorted(set(events) - self.wanted)
        if unasked:
            raise AssertionError(f"{self.role}: events {unasked} on a connection that "
                                 f"subscribed to {sorted(self.wanted) or 'none'}")  # fmt: skip


# ------------------------------------------------------------------ control sockets

SENTINEL = "fuzz-sentinel"
#: How long a daemon has to answer, or to settle after an example.
PATIENCE = 30.0


def _connect_unix(path: str, seconds: float = 15) -> socket.socket:
    """Connect to a daemon that may be between its bind() and its listen()."""
    deadline = time.monotonic() + seconds
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
            return sock
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class RawControl:
    """A control-socket client that hands back whole answers, errors included. QMP's
    greeting is checked, and the negotiation done unless `negotiate` is False."""

    def __init__(self, path: str, timeout: float = PATIENCE, *, negotiate: bool = True) -> None:
        self.path = path
        self.sock = _connect_unix(path)
        self.sock.settimeout(timeout)
        self.sent = 0
        try:
            self.file = self.sock.makefile("rb")
            first = self.file.readline()
            self.version = _check_greeting(_parse_answer(first, "the greeting") if first else {},
                                           f"{path}: the greeting")  # fmt: skip
            if negotiate:
                answer = self.ask(NEGOTIATE)
                if answer != {"return": {}, "id": f"h{self.sent}"}:
                    raise AssertionError(f"{path}: qmp_capabilities answered {answer}")
        except BaseException:
            self.sock.close()
            raise

    def ask(self, execute: str, arguments: Any = ABSENT) -> dict[str, Any]:
        """Send one request; its answer (events skipped, and late answers to this client's
        earlier requests). Any other answer is no answer to this request: QMP echoes the
        id, and this client has no other request waiting."""
        self.sent += 1
        rid = f"h{self.sent}"
        self._asked = {f"h{k}" for k in range(1, self.sent)}
        obj: dict[str, Any] = {"id": rid, "execute": execute}
        if arguments is not ABSENT:
            obj["arguments"] = arguments
        line = json.dumps(obj).encode()
        try:
            self.sock.sendall(line + b"\n")
            while True:
                raw = self.file.readline()
                if not raw:
                    raise AssertionError(f"{self.path}: the daemon closed the connection "
                                         f"instead of answering {_shown(line)}")  # fmt: skip
                answer = _parse_answer(raw, f"answering {_shown(line)}")
                got = answer.get("id", ABSENT)
                if got == rid:
                    return answer
                if "event" in answer or (got in self._asked):
                    continue
                raise AssertionError(f"{self.path}: {_shown(raw, 300)} answers {_shown(line)},"
                                     " whose id it does not carry")  # fmt: skip
        except TimeoutError:
            raise AssertionError(f"{self.path}: no answer to {_shown(line)} within "
                                 f"{PATIENCE:g}s") from None  # fmt: skip

    def result(self, execute: str, arguments: Any = ABSENT) -> Any:
        answer = self.ask(execute, arguments)
        if "error" in answer:
            raise AssertionError(f"{self.path}: {execute} failed: {answer['error']}")
        return answer["return"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


def negotiation_check(path: str, role: str, commands: set[str]) -> None:
    """QMP's negotiation on a daemon's control socket: before it, a command is not found
    (the greeting's words say why) and a capability asked for is refused; it is served
    once; after it, query-version says what the greeting said and query-commands lists
    the daemon's commands."""
    ctl = RawControl(path, negotiate=False)
    try:
        session = QmpSession(role, commands, ctl.version)
        for execute, arguments in (
            ("query-status", ABSENT), ("query-commands", ABSENT), ("subscribe", {}),
            (NEGOTIATE, {"enable": ["oob"]}), (NEGOTIATE, {"enable": "oob"}),
            (NEGOTIATE, ABSENT), (NEGOTIATE, {}), ("query-version", ABSENT),
            ("query-commands", ABSENT), ("fuzz-unknown", ABSENT),
        ):  # fmt: skip
            answer = ctl.ask(execute, arguments)
            obj: dict[str, Any] = {"execute": execute, "id": f"h{ctl.sent}"}
            if arguments is not ABSENT:
                obj["arguments"] = arguments
            session.check(frame_requests(json.dumps(obj).encode())[0], answer)
        if not session.negotiated:
            raise AssertionError(f"{role}: qmp_capabilities never negotiated")
    finally:
        ctl.close()


def _connect_control(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.connect(path)
    return sock


Answers = list[tuple[bytes, dict[str, Any]]]


@dataclass
class Pumped:
    """What a connection brought back: its answers in order, the names of the events
    among them, the greeting's version (None if nothing came), whether it ended."""

    answers: Answers
    events: list[str]
    version: dict[str, Any] | None
    eof: bool


def _pump(sock: socket.socket, data: bytes, *, until: str | None, halfclose: bool = False,
          piece: int | None = None, cuts: list[int] | None = None,
          read: bool = True) -> Pumped:  # fmt: skip
    """Send `data` while reading answers, until the answer whose id is `until` (or EOF;
    with read=False, until everything is sent): the first 4096 bytes `piece` bytes at a
    time, if given, and with a pause at each of `cuts`, so that the daemon reads what
    came so far on its own. QMP's greeting, first, and every event are checked."""
    sock.setblocking(False)
    poller = select.poll()
    sent, buf, eof, done = 0, b"", False, False
    answers: Answers = []
    events: list[str] = []
    version: dict[str, Any] | None = None
    stops = sorted({c for c in cuts or () if 0 < c < len(data)})
    deadline = time.monotonic() + PATIENCE
    if not data and halfclose:
        sock.shutdown(socket.SHUT_WR)
    while not done and not eof:
        if not read and sent >= len(data):
            break
        want = select.POLLIN | (select.POLLOUT if sent < len(data) else 0)
        poller.register(sock, want)
        left = deadline - time.monotonic()
        ready = poller.poll(max(0, int(left * 1000))) if left > 0 else []
        if not ready:
            raise AssertionError(
                f"no answer within {PATIENCE:g}s ({len(answers)} answers so far, "
                f"{sent} of {len(data)} bytes sent)"
            )
        mask = ready[0][1]
        if mask & select.POLLOUT and sent < len(data):
            step = piece if piece and sent < 4096 else 1 << 16
            while stops and stops[0] <= sent:
                stops.pop(0)
            if stops:
                step = min(step, stops[0] - sent)
            try:
                sent += sock.send(data[sent : sent + step])
            except BlockingIOError:
                pass
            except OSError:
                sent = len(data)  # the daemon dropped us: read what it said
            if stops and sent == stops[0]:
                time.sleep(0.002)
            if sent >= len(data) and halfclose:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
        if mask & (select.POLLIN | select.POLLHUP | select.POLLERR):
            try:
                chunk = sock.recv(1 << 20)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                eof = True
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                answer = _parse_answer(raw, "")
                if version is None:
                    version = _check_greeting(answer, "the first line of a connection")
                elif "event" in answer:
                    events.append(_check_event(answer, "an event"))
                elif "QMP" in answer:
                    raise AssertionError(f"a second greeting: {_shown(raw)}")
                else:
                    answers.append((raw, answer))
                    if until is not None and answer.get("id") == until:
                        done = True
    return Pumped(answers, events, version, eof)


def _fd_kinds(pid: int) -> tuple[int, int]:
    """(fds, sockets) of a process."""
    fds = socks = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        fds += 1
        with contextlib.suppress(OSError):
            socks += os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:")
    return fds, socks


def _tasks(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _settle(predicate: Callable[[], bool], what: Callable[[], str], seconds: float = 10) -> None:
    """Wait for a condition the daemon reaches on its own (threads finishing, fds closing)."""
    if not _wait(predicate, seconds):
        raise AssertionError(what())


def _log_tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join("    " + x for x in path.read_text().splitlines()[-lines:])
    except OSError:
        return "    (no log)"


ENDINGS = ("answers", "answers", "answers", "answers", "halfclose", "hangup")
PARTIALS = (
    b"", b'{"execute":"query-sta', b'{"execute":"map","arguments":{"shmid":0', b"\xff\xfe",
    b"[" * 100, b'{"execute":"query-status","id":"\\',
)  # fmt: skip
#: What goes between the requests of a connection: QMP needs nothing (QEMU's own client
#: sends nothing), people end each with a newline. "mixed": each of MIXED in turn.
SEPARATORS = ("\n", "\n", "\n", "", " ", "\r\n", "\t", "mixed")
MIXED = ("\n", "", " ", "\r\n", "\n\n", "", "\t", "\n")
#: How a connection's bytes are sent: all at once (None); the first 4096 bytes so many
#: at a time; or ("cuts", n, seed): split at n points, with a pause at each.
SENDS = st.one_of(
    st.sampled_from([None, None, None, 1, 3, 4096]),
    st.tuples(st.just("cuts"), st.integers(1, 6), st.integers(0, 2**32 - 1)),
)


def _join(lines: list[bytes], separator: str) -> bytes:
    """Requests one after another, each followed by the separator."""
    if separator != "mixed":
        return b"".join(line + separator.encode() for line in lines)
    return b"".join(line + MIXED[k % len(MIXED)].encode() for k, line in enumerate(lines))


def _cuts(stream: bytes, sending: Any) -> tuple[int | None, list[int]]:
    """`sending` as _pump takes it: a piece size, and where to pause. Half the cuts fall
    within the first 64 bytes of a request (into its strings, escapes, brackets)."""
    if not isinstance(sending, tuple):
        return sending, []
    _, count, cut_seed = sending
    rng = random.Random(cut_seed)
    framed = frame_requests(stream)
    cuts = []
    for _ in range(count if len(stream) > 1 else 0):
        if framed and rng.random() < 0.5:
            f = rng.choice(framed)
            cuts.append(f.start + rng.randrange(min(len(f.data), 64) + 1))
        else:
            cuts.append(rng.randrange(1, len(stream)))
    return None, cuts


def control_case(role: str) -> st.SearchStrategy:
    conn = st.tuples(
        st.lists(line_specs(role), max_size=8), st.sampled_from(ENDINGS), SENDS,
        st.sampled_from([True, True, True, True, True, True, False]),  # it negotiates
        st.sampled_from(SEPARATORS),
    )  # fmt: skip
    return st.tuples(
        st.lists(conn, min_size=1, max_size=3),
        st.sampled_from([0, 0, 0, 0, 1, 3, 12]),  # connections that subscribe and never read
        st.tuples(st.integers(0, 2**32 - 1), st.sampled_from([0, 20, 40, 40, 40, 40])),
    )  # fmt: skip


class PairTarget:
    """A real backend_sim with a real front-end connected to it, as `shmemctl up` runs
    them; hostile requests go to the control socket of one of them (`role`), in QMP's
    framing: one after another with a newline, with other whitespace, with nothing
    between them; sent at once, in small pieces or cut anywhere; mostly after the
    negotiation, sometimes without it.

    After each example: both alive, every complete request answered exactly once, in
    order, as QmpSession says (its id echoed, CommandNotFound before the negotiation,
    never an error class but QMP's), an overlong one with an error and the connection
    closed, no "internal error", every event on a connection one it subscribed to, every
    hostile connection's socket closed by the daemon, the front-end's table equal to
    /proc and believed by backend_sim, backend_sim holding no buffer that no believed
    mapping uses; then a reset, after which backend_sim holds no buffer and both
    daemons are back to their baseline fds."""

    REGIONS = "0=8M,1=64K"

    def __init__(self, workdir: Path, role: str, fe_args: tuple[str, ...] = (),
                 be_args: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.workdir = workdir
        self.role = role
        self.fe_args = fe_args
        self.be_args = be_args
        self.vhost = str(workdir / "pair.sock")
        self.ctl = {"frontend": str(workdir / "fe.ctl"), "backend": str(workdir / "be.ctl")}
        self.logs = {"frontend": workdir / "fe.log", "backend": workdir / "be.log"}
        self.procs: dict[str, subprocess.Popen] = {}
        self.clients: dict[str, RawControl] = {}
        self.base: dict[str, tuple[int, int]] = {}
        self.threads: dict[str, int] = {}
        self.clean = False

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        for path in (self.vhost, *self.ctl.values()):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.procs["backend"] = self._spawn(
            ["-m", "backend_sim", "--listen", self.vhost, "--regions", self.REGIONS,
             "--reply-timeout", "5", *self.be_args], "backend")  # fmt: skip
        if not _wait(lambda: os.path.exists(self.vhost), 15):
            raise RuntimeError(f"backend_sim did not start:\n{_log_tail(self.logs['backend'])}")
        self.procs["frontend"] = self._spawn(
            ["-m", "shmemctl", "frontend", "--connect", self.vhost, "--reconnect", "0.05",
             *self.fe_args], "frontend")  # fmt: skip
        if not _wait(lambda: all(os.path.exists(p) for p in self.ctl.values()), 15):
            raise RuntimeError(f"the pair did not start:\n{_log_tail(self.logs['frontend'])}")
        self.clients = {role: RawControl(path) for role, path in self.ctl.items()}
        if not _wait(self._connected, 15):
            raise RuntimeError(f"the pair did not connect:\n{_log_tail(self.logs['frontend'])}")
        self.base, self.threads = {}, {}
        for role in self.procs:  # a baseline is a count that stays put
            pid = self.procs[role].pid
            _wait(lambda pid=pid: _fd_kinds(pid) == _fd_kinds(pid), 2)
            self.base[role] = _fd_kinds(pid)
            self.threads[role] = _tasks(pid)
        self.clean = True

    def _spawn(self, argv: list[str], role: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, *argv, "--control", self.ctl[role], "--busy-poll-us", "0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.logs[role], "a"),
        )  # fmt: skip

    def _connected(self) -> bool:
        fe = self.clients["frontend"].ask("query-status")
        be = self.clients["backend"].ask("query-status")
        return (fe.get("return", {}).get("state") == "connected"
                and bool(be.get("return", {}).get("ready")))  # fmt: skip

    def stop(self) -> None:
        for client in self.clients.values():
            client.close()
        self.clients = {}
        for role in ("frontend", "backend"):
            _end(self.procs.pop(role, None))

    def recover(self) -> None:
        self.stop()
        self.start()

    def _ready(self) -> None:
        """A clean pair for the next example: tidied up, or started afresh."""
        if self.clean:
            return
        if self.procs:
            try:
                self._alive()
                self._end_check(strict=False)
                self.clean = True
                return
            except (AssertionError, OSError):
                pass
        self.recover()

    def _alive(self) -> None:
        for role, proc in self.procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"{role} died (exit {proc.returncode}):\n"
                                     f"{_log_tail(self.logs[role])}")  # fmt: skip

    # -------------------------------------------------------------- one example

    def session(self, case: tuple) -> int:
        conns, storm, (bg_seed, bg_count) = case
        self._ready()
        self.clean = False
        for role, path in self.ctl.items():
            negotiation_check(path, role, set(PLAUSIBLE[role]))
        if self.role == "frontend":  # something for read and status to show
            self.clients["backend"].result("batch", {"maps": [
                {"shmid": 0, "shm_offset": 0, "len": 4 * PAGE},
                {"shmid": 0, "shm_offset": 16 * PAGE, "len": PAGE, "ro": True},
                {"shmid": 1, "shm_offset": 0, "len": PAGE}]})  # fmt: skip
        plan = list(conns)
        if bg_count:
            rng = random.Random(bg_seed)
            specs = [random_spec(rng, self.role) for _ in range(bg_count)]
            sending = rng.choice([None, None, ("cuts", rng.randrange(1, 7), rng.randrange(2**32))])
            plan.append((specs, rng.choice(ENDINGS), sending, rng.random() < 0.95,
                         rng.choice(SEPARATORS)))  # fmt: skip
        path = self.ctl[self.role]
        inputs = 0
        socks: list[socket.socket] = []
        try:
            for k in range(storm):
                s = _connect_control(path)
                socks.append(s)
                events = b'{"events":["MESSAGE"]}' if k % 3 == 2 else b"{}"
                # back to back, as QEMU's own client sends them
                s.sendall(b'{"execute":"qmp_capabilities"}{"execute":"subscribe","arguments":%s}%s'
                          % (events, b"\n" if k % 2 else b""))  # fmt: skip
                inputs += 1
            talkers = [_connect_control(path) for _ in plan]
            socks += talkers
            for n, (sock, conn) in enumerate(zip(talkers, plan, strict=True)):
                inputs += self._talk(sock, conn, n)
                self._alive()
        finally:
            for s in socks:
                s.close()
        try:
            self._end_check()
        except AssertionError as exc:  # the requests that led there
            sent = [f"    {ending}: {_shown(render(spec)[0], 200)}"
                    for specs, ending, *_ in plan for spec in specs]  # fmt: skip
            raise AssertionError(
                f"{exc}\n  after {storm} subscribers and these requests, last "
                "first:\n" + "\n".join(reversed(sent[-40:]))
            ) from None
        self.clean = True
        return inputs

    def _talk(self, sock: socket.socket, conn: tuple, n: int) -> int:
        specs, ending, sending, negotiate, separator = conn
        role = self.role
        lines = [render(spec)[0] for spec in specs]
        if negotiate:  # with an id and without, in turn
            lines.insert(0, json.dumps({"execute": NEGOTIATE, **({"id": f"neg-{n}"}
                                        if n % 2 == 0 else {})}).encode())  # fmt: skip
        stream = _join(lines, separator)
        until: str | None = f"{SENTINEL}-{n}"
        sentinel = json.dumps({"execute": SENTINEL, "id": until}).encode()
        if ending == "answers":
            stream += b"\n" + sentinel + b"\n"  # the newline ends any junk before it
        if ending == "hangup":
            stream += PARTIALS[n % len(PARTIALS)]
        piece, cuts = _cuts(stream, sending)
        if ending == "hangup":
            _pump(sock, stream, until=None, piece=piece, cuts=cuts, read=False)
            return len(specs) + 1
        answered: list[Framed] = []
        overlong = None
        for framed in frame_requests(stream):
            if len(framed.data) > MAX_REQUEST:
                overlong = framed
                break
            if framed.complete:
                answered.append(framed)
        halfclose = ending == "halfclose"
        how = ending
        sentinel_at = len(stream) - len(sentinel) - 1
        if ending == "answers" and (
            overlong is not None or not answered or answered[-1].start != sentinel_at
        ):
            # the sentinel is no request of its own (one left open takes it in), or comes
            # after the daemon hangs up: what there is to read is there by the end
            until, halfclose = None, overlong is None
            how = "answers, the sentinel taken in: half-closed" if halfclose else ending
        pumped = _pump(sock, stream, until=until, halfclose=halfclose, piece=piece, cuts=cuts)
        answers, eof = pumped.answers, pumped.eof
        context = (
            f"{role} control socket, {len(answered)} complete requests"
            f"{', then one of ' + str(len(overlong.data)) + ' bytes' if overlong else ''}"
            f" ({how}, {'negotiated' if negotiate else 'not negotiated'}, separator "
            f"{separator!r}, sent {sending!r}):\n    "
            + "\n    ".join(_shown(f.data, 100) for f in answered[-6:])
        )
        want = len(answered) + (1 if overlong is not None else 0)
        if len(answers) < want:
            what = (
                "no error for the overlong request"
                if len(answers) >= len(answered)
                else f"the first unanswered request {_shown(answered[len(answers)].data)}"
            )
            raise AssertionError(
                f"{role}: requests left unanswered, the connection "
                f"{'closed' if eof else 'still open'}\n  {len(answers)} answers to "
                f"{want} complete requests; {what}\n  {context}"
            )
        if len(answers) > want:
            raise AssertionError(f"{role}: more answers than requests\n  {len(answers)} answers "
                                 f"to {want} complete requests: {answers[want][0][:200]!r}"
                                 f"\n  {context}")  # fmt: skip
        session = QmpSession(role, set(PLAUSIBLE[role]), pumped.version)
        for framed, (_raw, answer) in zip(answered, answers, strict=False):
            try:
                session.check(framed, answer)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n  {context}") from None
        session.check_events(pumped.events)
        if overlong is not None:
            raw, answer = answers[-1]
            error = answer.get("error") or {}
            words = f"longer than {MAX_REQUEST} bytes"
            if (
                error.get("class") != GENERIC
                or "id" in answer
                or words not in error.get("desc", "")
            ):
                raise AssertionError(f"{role}: an overlong request answered {raw[:200]!r}")
            if not eof:
                raise AssertionError(f"{role}: a client sent an overlong request and stays "
                                     "connected")  # fmt: skip
        elif halfclose and not eof:
            raise AssertionError(f"{role}: did not close a half-closed connection")
        return len(specs)

    # -------------------------------------------------------------- after it

    def _end_check(self, strict: bool = True) -> None:
        fe_c, be_c = self.clients["frontend"], self.clients["backend"]
        pids = {role: proc.pid for role, proc in self.procs.items()}
        self._alive()
        _settle(
            lambda: all(_fd_kinds(pids[r])[1] <= self.base[r][1] for r in pids),
            lambda: (
                "control connections never closed: sockets "
                + ", ".join(f"{r} {_fd_kinds(pids[r])[1]} > {self.base[r][1]}" for r in pids)
            ),
        )
        # A client that hung up may still have lines being handled (its socket is closed
        # once an answer cannot be sent): idle is when its threads are gone, and with
        # them, any scenario its lines started.
        _settle(
            lambda: (
                be_c.ask("scenario-stop") is not None
                and all(_tasks(pids[r]) <= self.threads[r] for r in pids)
            ),
            lambda: (
                "threads above baseline: "
                + ", ".join(f"{r} {_tasks(pids[r])} > {self.threads[r]}" for r in pids)
            ),
        )
        _settle(self._connected, lambda: "the pair did not reconnect")
        fe = fe_c.result("query-status", {"max_mappings": 1_000_000})
        be = be_c.result("query-status")
        if strict:
            assert fe["disagreements"] == [], f"front-end table vs /proc: {fe['disagreements']}"
            held = {(r["shmid"], m["shm_offset"], m["len"]) for r in fe["regions"]
                    for m in r["mappings"]}  # fmt: skip
            believed = {(m["shmid"], m["shm_offset"], m["len"]) for m in be["mapped"]}
            # (the other way round is allowed: a batch's earlier maps count as done, and a
            # front-end refuses them silently)
            assert held <= believed, (
                f"the front-end holds {sorted(held - believed)} that backend_sim does not "
                "believe: it can never unmap them")  # fmt: skip
            in_use = {m["buffer"] for m in be["mapped"]}
            idle = [b for b in be["buffers"] if b["id"] not in in_use]
            assert not idle, f"backend_sim keeps buffers no mapping uses: {idle}"
        answer = fe_c.ask("reset")
        assert "error" not in answer, f"the front-end's reset failed: {answer}"
        _settle(lambda: not (st := be_c.result("query-status"))["mapped"] and not st["buffers"],
                lambda: f"after a reset backend_sim still holds buffers "
                f"{be_c.result('query-status')['buffers']}")  # fmt: skip
        _settle(
            lambda: all(_fd_kinds(pids[r])[0] <= self.base[r][0] for r in pids),
            lambda: (
                "fds above baseline after a reset: "
                + ", ".join(f"{r} {_fd_kinds(pids[r])[0]} > {self.base[r][0]}" for r in pids)
            ),
        )


# ------------------------------------------------------------------ sim-control
#
# backend_sim's control commands, while the harness is its front-end and answers the
# SHMEM requests they cause as it likes. The hostile front-end keeps what an honest
# one would hold after its own answers (`held`); what backend_sim could not know
# (a malformed answer, none, a hang-up) is `unsure` and left out of the comparison.

SHMEM_MASK = 1 << 22
WANTED = (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.BACKEND_REQ
          | ProtocolFeature.BACKEND_SEND_FD | ProtocolFeature.RESET_DEVICE
          | ProtocolFeature.STATUS | SHMEM_MASK)  # fmt: skip
MAP, UNMAP = int(BackendReq.SHMEM_MAP), int(BackendReq.SHMEM_UNMAP)
ERRNOS = (errno.EEXIST, errno.EINVAL, errno.ENODEV, errno.ENOENT, errno.ENOSPC, errno.ENXIO,
          errno.EBADF, errno.EOVERFLOW, errno.EOPNOTSUPP, errno.EPERM, 4095)  # fmt: skip
ODD_VALUES = (1, 2, 2**63, U64, 0xDEADBEEF, 2**32, (1 << 64) - 4096, (1 << 64) - 4097)
RESETS = ("RESET_DEVICE", "SET_STATUS", "RESET_OWNER")
#: How a request that asked for a reply is answered: a number 0-999 picks the first
#: entry whose bound it is below (0, what hypothesis shrinks towards, is a plain ok).
ANSWERS = (
    (600, "ok"), (700, "refuse-errno"), (730, "refuse-value"), (750, "size-40"),
    (760, "size-0"), (770, "size-4"), (790, "flags-0x4"), (810, "flags-0x15"),
    (820, "flags-0xd"), (840, "request-instead"), (850, "wrong-id"), (880, "twice"),
    (900, "with-fd"), (930, "reset-meanwhile"), (945, "new-channel-meanwhile"),
    (965, "hangup-backend"), (980, "hangup"), (995, "ok"), (1000, "no-reply"),
)  # fmt: skip
#: And one that asked for none (a batch's earlier maps).
SILENT_ANSWERS = ((960, "silent"), (975, "hangup-backend"), (985, "hangup"), (1000, "unasked"))


def _pending(sock: socket.socket) -> int:
    """Bytes waiting to be read on a socket."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def _readable(sock: socket.socket, timeout: float) -> bool:
    """A poll of its own: a Channel's poll object is not for two threads at once."""
    return bool(select.select([sock], [], [], timeout)[0])


def _invalid_map(regions: dict[int, int], m: ShmemMap) -> str:
    """Why a front-end must refuse this map whatever it holds (docs/protocol.md §5), or ""."""
    size = regions.get(m.shmid, 0)
    if not size:
        return f"no region {m.shmid}"
    if m.len == 0 or (m.shm_offset | m.len | m.fd_offset) % PAGE:
        return "a zero or unaligned length or offset"
    if m.shm_offset + m.len > size:
        return f"it ends past the region's {size:#x} bytes"
    return ""


def _diff(a: dict, b: dict) -> dict:
    return {k: v for k, v in sorted(a.items()) if b.get(k) != v}


def _fields(m: ShmemMap) -> str:
    ro = "" if m.writable else " ro"
    return f"{m.shmid}:{m.shm_offset:#x}+{m.len:#x}@{m.fd_offset:#x}{ro}"


def _pick(table: tuple[tuple[int, str], ...], n: int) -> str:
    return next(name for bound, name in table if n < bound)


class HostileFrontend:
    """The harness as backend_sim's front-end over a real socket: a correct handshake,
    then SHMEM answers chosen by the example (`plan`, then `rng`, else plain acks)."""

    def __init__(self, path: str, regions: dict[int, int]) -> None:
        self.path = path
        self.regions = regions  # what backend_sim advertises
        self.lock = threading.RLock()  # the channels; held while one message is handled
        self.main: Channel | None = None
        self.backend: Channel | None = None
        self.sent = 0  # hostile messages: the inputs
        self.handled = 0
        # What this connection has seen. Examples share a connection (one ends with a
        # reset, not a hang-up), and backend_sim may still settle, in the next example,
        # a map an earlier one asked for (docs/protocol.md §6.13): so these outlive an
        # example and only a new connection clears them.
        #: ranges (shmid, offset, len) a reset certainly dropped (settled then), and not
        #: mapped again since
        self.dropped: set[tuple[int, int, int]] = set()
        #: the ranges backend_sim asked this connection to map: nothing else may it unmap
        self.mapped_here: set[tuple[int, int, int]] = set()
        self.before_reset = 0  # bytes on the backend channel sent before the last reset's ack
        self.begin([], None)
        self._stopping = False
        self.connect()
        self.thread = threading.Thread(target=self._serve, daemon=True, name="hostile-frontend")
        self.thread.start()

    def begin(self, plan: list[int], rng: random.Random | None) -> None:
        """A fresh example: its answers; nothing in the log; no violation yet. The
        connection's history (`mapped_here`, `dropped`) goes on: it is the connection's."""
        self.plan = list(reversed(plan))
        self.rng = rng
        self.held: dict[tuple[int, int], tuple[int, int, bool]] = {}
        #: held, and confirmed by an answer to a request that asked for one: backend_sim
        #: knows these exist (a batch's earlier maps are only `pending` until then)
        self.settled: set[tuple[int, int]] = set()
        self.pending: set[tuple[int, int]] = set()
        self.unsure: set[tuple[int, int]] = set()
        #: the range the harness's control command unmaps in this step (a scenario may
        #: unmap it too, at the same time: any UNMAP of it in the step is the harness's)
        self.commanded: set[tuple[int, int, int]] = set()
        self.kept_allowance = 0  # maps whose outcome backend_sim could not know
        self.no_replies = 0
        self.desynced = False  # an unasked reply: who answered what is unknowable
        self.log: list[tuple[int, ShmemMap, bool]] = []
        self.violations: list[str] = []
        self.trace: list[str] = []
        if self.mapped_here:  # what it judges an UNMAP by began before this example
            self.trace.append(f"  front-end: the connection goes on; backend_sim has asked it "
                              f"to map {len(self.mapped_here)} ranges so far")  # fmt: skip
        self.sent = 0

    # -------------------------------------------------------------- the connection

    def _call(self, req: FrontendReq, payload: object = None, fds: tuple[int, ...] = (),
              need: bool = False) -> object:  # fmt: skip
        assert self.main is not None
        self.main.send(encode(ChannelKind.MAIN, req, payload, need_reply=need), fds)  # type: ignore[arg-type]
        if need or spec_of(ChannelKind.MAIN, req).own_reply:
            msg = self.main.recv()
            close_fds(msg.fds)
            return msg.payload
        return None

    def connect(self) -> None:
        """A new connection with a correct handshake; backend_sim forgets the old one's."""
        with self.lock:
            self._close()
            sock = _connect_unix(self.path)
            self.main = Channel(sock, ChannelKind.MAIN, replies=True)
            self.main.set_recv_timeout(PATIENCE)
            features = int(self._call(FrontendReq.GET_FEATURES) or 0)  # type: ignore[call-overload]
            offered = int(self._call(FrontendReq.GET_PROTOCOL_FEATURES) or 0)  # type: ignore[call-overload]
            self._call(FrontendReq.SET_PROTOCOL_FEATURES, offered & int(WANTED), need=True)
            self._call(
                FrontendReq.SET_FEATURES,
                features & (VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES),
                need=True,
            )
            self._call(FrontendReq.GET_SHMEM_CONFIG)
            self._new_backend_channel()
            self._forget()
            self.dropped.clear()  # a new connection: the rule is mapped_here
            self.mapped_here.clear()
            self.before_reset = 0
            self.trace.append("  front-end: new connection")

    def _new_backend_channel(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._call(FrontendReq.SET_BACKEND_REQ_FD, None, (theirs.fileno(),), need=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        old, self.backend = self.backend, Channel(ours, ChannelKind.BACKEND, replies=False)
        if old is not None:
            self._drop_channel(old)

    def _drop_channel(self, ch: Channel) -> None:
        """Close a backend channel unread, as a front-end that hangs up does. What
        backend_sim sent on it was still sent on this connection: its maps are noted."""
        data = b""
        with contextlib.suppress(OSError):
            while _readable(ch.sock, 0):
                chunk = ch.sock.recv(1 << 16, socket.MSG_DONTWAIT)  # any fds: dropped
                if not chunk:
                    break
                data += chunk
        size = len(encode_shmem_request(MAP, ShmemMap(0, 0, 0), need_reply=False))
        for at in range(0, len(data) - size + 1, size):
            req, _flags, _size, shmid, fd_offset, offset, length, _ = struct.unpack_from(
                "<IIIQQQQQ", data, at
            )
            if req == MAP:
                self.mapped_here.add((shmid, offset, length))
                m = ShmemMap(shmid, offset, length, fd_offset)
                self.trace.append(f"  backend_sim sent SHMEM_MAP {_fields(m)}: never read")
        ch.close()

    def reset(self, kind: str) -> None:
        """A device reset on the main channel: every mapping dropped, on both sides."""
        with self.lock:
            if kind == "SET_STATUS":
                self._call(FrontendReq.SET_STATUS, 0, need=True)
            else:
                self._call(FrontendReq[kind], need=True)
            self._forget()
            # What backend_sim sent before it acked the reset is in our buffer by now (a
            # Unix socket copies at send); it may predate the reset, so is not held to it.
            self.before_reset = _pending(self.backend.sock) if self.backend else 0
            self.trace.append(f"  front-end: {kind}")

    def heal(self) -> None:
        """After a hang-up (ours or backend_sim's): channels again, as a front-end would."""
        with self.lock:
            if self.main is None or self._main_lost():
                self.connect()
            elif self.backend is None:
                try:
                    self._new_backend_channel()
                except (ChannelError, OSError, WireError):
                    self.connect()

    def _main_lost(self) -> bool:
        assert self.main is not None
        try:
            data = self.main.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
        if data:
            self.violations.append("backend_sim sent an unasked message on the main channel")
            return True
        return True  # EOF: backend_sim dropped the connection

    def _forget(self) -> None:
        """Everything dropped. What backend_sim knew to exist may never be unmapped; a
        batch's unconfirmed maps it cannot know about (it may settle them with UNMAP)."""
        self.dropped |= {(*key, self.held[key][0]) for key in self.settled & set(self.held)}
        self.held.clear()
        self.settled.clear()
        self.pending.clear()
        self.unsure.clear()
        self.kept_allowance = 0

    def _close(self) -> None:
        for ch in (self.backend, self.main):
            if ch is not None:
                ch.close()
        self.main = self.backend = None

    def close(self) -> None:
        self._stopping = True
        self.thread.join(5)
        with self.lock:
            self._close()

    def idle(self) -> bool:
        """Nothing waiting on the backend channel and nothing being answered."""
        with self.lock:
            return self.backend is None or not _readable(self.backend.sock, 0)

    # -------------------------------------------------------------- answering

    def _serve(self) -> None:
        while not self._stopping:
            ch = self.backend
            try:
                readable = ch is not None and _readable(ch.sock, 0.05)
            except (OSError, ValueError):
                readable = False
            if not readable:
                if ch is None:
                    time.sleep(0.005)
                continue
            with self.lock:
                if ch is self.backend:
                    self._one(ch)

    def _next(self) -> int:
        if self.plan:
            return self.plan.pop()
        return self.rng.randrange(1000) if self.rng is not None else 0

    def _send(self, ch: Channel, data: bytes, fds: tuple[int, ...] = ()) -> None:
        self.sent += 1
        with contextlib.suppress(OSError):
            if fds:
                ch.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                          struct.pack(f"{len(fds)}i", *fds))])  # fmt: skip
            else:
                ch.sock.sendall(data)

    def _one(self, ch: Channel) -> None:
        try:
            msg = ch.recv()
        except WireError as exc:
            self.violations.append(f"backend_sim sent bytes that are no request: {exc}")
            return
        except (ChannelError, OSError):
            ch.close()  # backend_sim closed the backend channel; heal() opens another
            self.backend = None
            return
        self.handled += 1
        try:
            self._answer(ch, msg)
        finally:
            close_fds(msg.fds)

    def _answer(self, ch: Channel, msg: Any) -> None:
        req, m, need = msg.request, msg.payload, msg.need_reply
        if req not in (MAP, UNMAP) or not isinstance(m, ShmemMap):
            self.violations.append(f"backend_sim sent {msg.name}, not SHMEM_MAP or SHMEM_UNMAP")
            if need:
                self._send(ch, encode_u64_reply(req, -errno.EOPNOTSUPP & U64))
            return
        fds = len(msg.fds) + len(msg.surplus_fds)
        if fds != (1 if req == MAP else 0):
            self.violations.append(f"backend_sim sent {msg.name} {m} with {fds} fds")
        key = (m.shmid, m.shm_offset)
        self.log.append((req, m, need))
        sent_before_reset = self.before_reset > 0
        self.before_reset = max(
            0, self.before_reset - len(encode_shmem_request(req, m, need_reply=need))
        )
        commanded = req == UNMAP and (*key, m.len) in self.commanded
        if req == UNMAP and not commanded:
            if (*key, m.len) in self.dropped and not sent_before_reset:
                self.violations.append(
                    f"backend_sim sent SHMEM_UNMAP {_fields(m)} for a mapping that a reset "
                    "dropped after its map was acked")  # fmt: skip
            elif (*key, m.len) not in self.mapped_here:
                self.violations.append(
                    f"backend_sim sent SHMEM_UNMAP {_fields(m)} on a connection it never "
                    "asked to map it (mapped on an earlier connection, or never)")  # fmt: skip
        if req == MAP:
            self.dropped.discard((*key, m.len))
            self.mapped_here.add((*key, m.len))
            wrong = _invalid_map(self.regions, m)
            if wrong:  # and for it, a buffer was made: fd_offset + len bytes, every page written
                self.violations.append(
                    f"backend_sim sent SHMEM_MAP {_fields(m)}, which its own layout forbids: "
                    f"{wrong}")  # fmt: skip
        n = self._next()
        how = _pick(ANSWERS if need else SILENT_ANSWERS, n)
        self.trace.append(f"  backend_sim sent {msg.name} {_fields(m)}"
                          f"{'' if need else ' (no reply asked)'}: {how} ({n})")  # fmt: skip
        if not need:
            if how == "silent":
                self._apply(req, m)
                self.settled.discard(key)
                self.pending.add(key)
            elif how == "unasked":
                self.desynced = True
                self._apply(req, m)
                self._send(ch, encode_u64_reply(req, 0))
            else:
                self._unsure(req, key)
                self._hang_up(ch, b"", whole=how == "hangup")
            return
        if how in ("ok", "refuse-errno", "refuse-value", "twice", "with-fd"):
            # a well-formed answer: it confirms the batch sent before it
            self.settled |= self.pending & set(self.held)
            self.pending.clear()
        self._reply(ch, req, m, key, how, n)
        if req == UNMAP and key in self.held and not commanded:
            # refused: the device cannot tell "still mapped" from "a reset dropped it"
            # when it settles a map that crossed a reset this way
            self.unsure.add(key)

    def _reply(self, ch: Channel, req: int, m: ShmemMap, key: tuple[int, int], how: str,
               n: int) -> None:  # fmt: skip
        ok = encode_u64_reply(req, 0)
        if how == "ok":
            self._apply(req, m)
            self._send(ch, ok)
        elif how == "refuse-errno":
            self._send(ch, encode_u64_reply(req, -ERRNOS[n % len(ERRNOS)] & U64))
        elif how == "refuse-value":
            self._send(ch, encode_u64_reply(req, ODD_VALUES[n % len(ODD_VALUES)]))
        elif how == "twice":
            first_ok = n % 2 == 0
            if first_ok:
                self._apply(req, m)
            refusal = encode_u64_reply(req, -errno.EINVAL & U64)
            self._send(ch, (ok if first_ok else refusal) + (refusal if n % 3 else ok))
            self.sent += 1
            # The second reply is an unasked one: it may be taken for a later request's
            # answer, or as a sign that one had come when a reset was read.
            self.desynced = True
        elif how == "with-fd":
            self._apply(req, m)
            extra = os.eventfd(0, os.EFD_CLOEXEC)
            try:
                self._send(ch, ok, (extra,))
            finally:
                os.close(extra)
        elif how == "reset-meanwhile":
            try:
                self.sent += 1
                self.reset(RESETS[n % 3])
            except (ChannelError, OSError, WireError) as exc:
                self.violations.append(f"backend_sim did not ack a {RESETS[n % 3]}: {exc}")
                return
            if n % 2 == 0:
                self._apply(req, m)
                self._send(ch, ok)
            else:
                self._send(ch, encode_u64_reply(req, -errno.EEXIST & U64))
        elif how == "new-channel-meanwhile":
            self._unsure(req, key)
            self.sent += 1
            try:
                self._new_backend_channel()
            except (ChannelError, OSError, WireError) as exc:
                self.violations.append(f"backend_sim did not ack a new backend channel: {exc}")
        elif how == "no-reply":
            self._unsure(req, key)
            self.no_replies += 1
        elif how in ("hangup", "hangup-backend"):
            self._unsure(req, key)
            self._hang_up(ch, ok[: 1 + n % (len(ok) - 1)], whole=how == "hangup")
        else:
            self._unsure(req, key)
            self._send(ch, self._malformed(req, m, how, n))

    @staticmethod
    def _malformed(req: int, m: ShmemMap, how: str, n: int) -> bytes:
        if how == "size-40":  # the request's own payload back (the seeds' stale-reply bug)
            return (
                struct.pack("<III", req, 0x5, 40)
                + encode_shmem_request(req, m, need_reply=False)[12:]
            )
        if how == "size-0":
            return struct.pack("<III", req, 0x5, 0)
        if how == "size-4":
            return struct.pack("<IIII", req, 0x5, 4, 0)
        if how.startswith("flags-"):
            return struct.pack("<IIIQ", req, int(how[6:], 16), 8, 0)
        if how == "request-instead":
            return encode_shmem_request(req, m, need_reply=n % 2 == 0)
        other = (UNMAP if req == MAP else MAP, 77, 0)[n % 3]  # wrong-id
        return encode_u64_reply(other, 0)

    def _hang_up(self, ch: Channel, partial: bytes, *, whole: bool) -> None:
        if partial:
            self._send(ch, partial)
        else:
            self.sent += 1
        if whole:
            self._close()
            self._forget()
            with contextlib.suppress(ChannelError, OSError, WireError):
                self.connect()  # else heal() tries again before the next step
        else:
            self._drop_channel(ch)
            self.backend = None
            with contextlib.suppress(ChannelError, OSError, WireError):
                self._new_backend_channel()

    def _apply(self, req: int, m: ShmemMap) -> None:
        key = (m.shmid, m.shm_offset)
        if req == MAP:
            self.held[key] = (m.len, m.fd_offset, m.writable)
            self.settled.add(key)
            self.dropped.discard((*key, m.len))  # mapped again since the reset
        else:
            self.held.pop(key, None)
            self.settled.discard(key)
        self.pending.discard(key)
        self.unsure.discard(key)

    def _unsure(self, req: int, key: tuple[int, int]) -> None:
        self.unsure.add(key)
        if req == MAP:
            self.kept_allowance += 1


_sim_shmids = st.one_of(st.sampled_from([0, 0, 0, 0, 1, 1, 2]), st.sampled_from([255, 256, -1]))
_sim_edges = st.sampled_from([0, PAGE + 1, -PAGE, 2**63, 2**64, 8 * MiB, 8 * MiB - PAGE,
                              64 * MiB, U64 - PAGE + 1])  # fmt: skip
_sim_offsets = st.one_of(*[st.integers(0, 15).map(lambda p: p * PAGE)] * 3, _sim_edges)
sim_map_args = st.fixed_dictionaries(
    {"shmid": _sim_shmids, "shm_offset": _sim_offsets,
     "len": st.one_of(*[st.integers(1, 4).map(lambda p: p * PAGE)] * 3, _sim_edges)},
    optional={"fd_offset": st.one_of(st.integers(0, 4).map(lambda p: p * PAGE), _sim_edges),
              "ro": st.booleans(), "buffer": st.integers(1, 20)},
)  # fmt: skip
_map_step = st.tuples(st.just("map"), sim_map_args)
_unmap_step = st.tuples(st.just("unmap"), st.one_of(st.integers(0, 50), st.integers(0, 50),
                                                    sim_map_args))  # fmt: skip
sim_steps = st.lists(
    st.one_of(
        _map_step, _map_step, _map_step, _map_step, _unmap_step, _unmap_step, _unmap_step,
        st.tuples(st.just("batch"), st.lists(sim_map_args, min_size=1, max_size=6)),
        st.tuples(st.just("batch"), st.lists(sim_map_args, min_size=1, max_size=6)),
        st.tuples(st.just("query-status")),
        st.tuples(st.just("scenario-start"), st.sampled_from(["blobs", "dax"]),
                  st.sampled_from([500, 2000, 10000]), st.integers(0, 1000)),
        st.tuples(st.just("scenario-stop")),
        st.tuples(st.just("wait"), st.integers(1, 30)),
        st.tuples(st.just("reset"), st.sampled_from(RESETS)),
        st.tuples(st.just("reconnect")),
    ),
    max_size=12,
)  # fmt: skip
sim_case = st.tuples(
    sim_steps, st.lists(st.integers(0, 999), max_size=20),
    st.tuples(st.integers(0, 2**32 - 1), st.sampled_from([0, 15, 30, 30, 30, 30])),
)  # fmt: skip


def _rand_sim_map(rng: random.Random) -> dict[str, Any]:
    edges = (0, PAGE + 1, -PAGE, 2**63, 2**64, 8 * MiB, 8 * MiB - PAGE, 64 * MiB)
    args = {
        "shmid": rng.choice([0, 0, 0, 0, 1, 1, 2] if rng.random() < 0.97 else [255, 256, -1]),
        "shm_offset": rng.randrange(16) * PAGE if rng.random() < 0.95 else rng.choice(edges),
        "len": rng.randrange(1, 5) * PAGE if rng.random() < 0.95 else rng.choice(edges),
    }
    if rng.random() < 0.2:
        args["fd_offset"] = rng.randrange(5) * PAGE if rng.random() < 0.9 else rng.choice(edges)
    if rng.random() < 0.3:
        args["ro"] = True
    if rng.random() < 0.05:
        args["buffer"] = rng.randrange(1, 20)
    return args


def random_sim_step(rng: random.Random) -> tuple:
    roll = rng.random()
    if roll < 0.40:
        return ("map", _rand_sim_map(rng))
    if roll < 0.68:
        return ("unmap", rng.randrange(50))
    if roll < 0.80:
        return ("batch", [_rand_sim_map(rng) for _ in range(rng.randrange(1, 7))])
    if roll < 0.85:
        return ("query-status",)
    if roll < 0.87:
        return ("scenario-start", rng.choice(["blobs", "dax"]), rng.choice([500, 2000, 10000]),
                rng.randrange(1000))  # fmt: skip
    if roll < 0.89:
        return ("scenario-stop",)
    if roll < 0.94:
        return ("wait", rng.randrange(1, 30))
    if roll < 0.98:
        return ("reset", rng.choice(RESETS))
    return ("reconnect",)


def _expected_requests(kind: str, args: dict[str, Any]) -> list[tuple[int, tuple, bool]]:
    """What backend_sim must send for a control command: (request, fields, need_reply)."""

    def fields(a: dict[str, Any], req: int) -> tuple:
        if req == UNMAP:
            return (a["shmid"], a["shm_offset"], a["len"])
        return (a["shmid"], a["shm_offset"], a["len"], a.get("fd_offset", 0), not a.get("ro"))

    if kind == "map":
        return [(MAP, fields(args, MAP), True)]
    if kind == "unmap":
        return [(UNMAP, fields(args, UNMAP), True)]
    maps = args["maps"]
    return [(MAP, fields(a, MAP), i == len(maps) - 1) for i, a in enumerate(maps)]


def _out_of_range(kind: str, args: dict[str, Any]) -> bool:
    """Whether a map, unmap or batch names a number outside what the command takes
    (shmid 0-255, offsets and lengths 0 to 2**64-1, a buffer from 1), or a batch no map:
    refused before anything is sent."""
    maps = args.get("maps") if kind == "batch" else [args]
    if not maps:
        return True
    for m in maps:
        if not (_is_int(m.get("shmid")) and 0 <= m["shmid"] <= 255):
            return True
        for key in ("shm_offset", "len", "fd_offset"):
            if key in m and not (_is_int(m[key]) and 0 <= m[key] <= U64):
                return True
        if "buffer" in m and not (_is_int(m["buffer"]) and m["buffer"] >= 1):
            return True
    return False


#: backend_sim's words for a command it refused before it sent anything (QMP's
#: GenericError says no more): arguments the command does not take, a map its device
#: will not send, a batch it will not start, no front-end to send to. A batch that
#: stopped part way says what it sent before it ("sent before it").
_NOT_SENT = re.compile(
    r"(?:map|unmap|batch)(?:: '\w+' must be | needs the argument | takes no argument )"
    r"|'arguments' must be|(?:map|unmap) not sent: |cannot send |no buffer \d"
    r"|batch needs |batch item \d+(?: is not |: | overlaps | not sent: )"
    r"|the batch's buffers need "
)


def _observed(req: int, m: ShmemMap, need: bool) -> tuple[int, tuple, bool]:
    if req == UNMAP:
        return (req, (m.shmid, m.shm_offset, m.len), need)
    return (req, (m.shmid, m.shm_offset, m.len, m.fd_offset, m.writable), need)


class _DaemonTarget(abc.ABC):
    """A target that runs one daemon of ours (`proc`) and talks to its control socket
    (`ctl`); `start` makes both, `stop` ends them, `recover` is the two."""

    proc: subprocess.Popen[bytes] | None
    ctl: RawControl | None

    @abc.abstractmethod
    def start(self) -> None:
        """Start the daemon and connect to its control socket."""

    @abc.abstractmethod
    def session(self, case: tuple) -> int:
        """Play one case against the daemon; the messages it took."""

    def stop(self) -> None:
        if self.ctl is not None:
            self.ctl.close()
            self.ctl = None
        _end(self.proc)
        self.proc = None

    def recover(self) -> None:
        self.stop()
        self.start()


class SimControlTarget(_DaemonTarget):
    """A real backend_sim whose front-end is the harness (HostileFrontend), driven on its
    control socket.

    After each step: backend_sim alive, no "internal error", no request it should not
    have sent (a command it refused sends nothing; one it accepted sends what it says,
    with one fd per map; no unmap of what a reset dropped). After each example, with
    the pair idle: its believed table equal to what the front-end acknowledged (resets
    and hang-ups taken into account), every believed mapping's buffer still held, no
    other buffer but those of maps whose outcome it could not know; then a reset, after
    which it holds no buffer and its fds are back to the baseline."""

    REGIONS = "0=8M,1=64K"
    REPLY_TIMEOUT = 0.5

    def __init__(self, workdir: Path, extra: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.extra = extra
        self.vhost = str(workdir / "sim.sock")
        self.ctl_path = str(workdir / "sim.ctl")
        self.log = workdir / "sim.log"
        self.proc: subprocess.Popen | None = None
        self.ctl: RawControl | None = None
        self.fe: HostileFrontend | None = None
        self.base = 0
        self.clean = False
        self.scenario = False
        self.timeouts = 0

    def start(self) -> None:
        for path in (self.vhost, self.ctl_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "backend_sim", "--listen", self.vhost, "--regions",
             self.REGIONS, "--control", self.ctl_path, "--reply-timeout", str(self.REPLY_TIMEOUT),
             "--busy-poll-us", "0", *self.extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.log, "a"),  # noqa: SIM115
        )  # fmt: skip
        if not _wait(lambda: os.path.exists(self.vhost) and os.path.exists(self.ctl_path), 15):
            raise RuntimeError(f"backend_sim did not start:\n{_log_tail(self.log)}")
        self.ctl = RawControl(self.ctl_path)
        self.fe = HostileFrontend(self.vhost, parse_regions(self.REGIONS, PAGE))
        if not _wait(lambda: self._status().get("ready"), 15):
            raise RuntimeError(f"backend_sim never became ready:\n{_log_tail(self.log)}")
        pid = self.proc.pid
        _wait(lambda: _fd_count(pid) == _fd_count(pid), 2)
        self.base = _fd_count(pid)
        self.clean = True

    def stop(self) -> None:
        if self.fe is not None:
            self.fe.close()
            self.fe = None
        super().stop()

    def _status(self) -> dict[str, Any]:
        assert self.ctl is not None
        return self.ctl.result("query-status")

    def _alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"backend_sim died (exit {self.proc.returncode}):\n"
                                 f"{_log_tail(self.log)}")  # fmt: skip

    def _ready(self) -> None:
        if self.clean:
            return
        if self.proc is not None:
            try:
                self._alive()
                self._end_check(strict=False)
                self.clean = True
                return
            except (AssertionError, OSError, ChannelError, WireError):
                pass
        self.recover()

    def _violations(self) -> None:
        assert self.fe is not None
        if self.fe.violations:
            raise AssertionError(self.fe.violations[0])

    # -------------------------------------------------------------- one example

    def session(self, case: tuple) -> int:
        steps, plan, (bg_seed, bg_count) = case
        self._ready()
        self.clean = False
        negotiation_check(self.ctl_path, "backend_sim", set(PLAUSIBLE["backend"]))
        fe = self.fe
        assert fe is not None
        with fe.lock:
            fe.begin(plan, random.Random(bg_seed) if bg_count else None)
        self.scenario = False
        self.timeouts = 0
        rng = random.Random(bg_seed ^ 0x5EED)
        lines = 0
        try:
            for step in [*steps, *(random_sim_step(rng) for _ in range(bg_count))]:
                lines += self._step(step)
                self._alive()
                self._violations()
            fe.trace.append("end of the example")
            self._end_check()
        except AssertionError as exc:  # what led there: the steps, and how each was answered
            raise AssertionError(f"{exc}\n  what happened, last first:\n"
                                 + "\n".join(reversed(fe.trace[-40:]))) from None  # fmt: skip
        self.clean = True
        return lines + fe.sent

    def _step(self, step: tuple) -> int:
        fe, ctl = self.fe, self.ctl
        assert fe is not None and ctl is not None
        kind = step[0]
        if kind in ("reset", "reconnect"):
            fe.trace.append(f"{kind}")
            with fe.lock:
                fe.heal()
                if kind == "reset":
                    fe.sent += 1
                    fe.reset(step[1])
                else:
                    fe.connect()
            return 0
        if kind == "wait":
            if self.scenario:
                target = fe.handled + step[1]
                _wait(lambda: fe.handled >= target, 0.3)
            return 0
        fe.heal()
        args: Any = ABSENT
        if kind == "map":
            args = _safe_map(step[1])
        elif kind == "unmap":
            if isinstance(step[1], int):
                keys = sorted(fe.held)
                if keys:
                    shmid, offset = keys[step[1] % len(keys)]
                    args = {"shmid": shmid, "shm_offset": offset, "len": fe.held[shmid, offset][0]}
                else:
                    args = {"shmid": 0, "shm_offset": step[1] % 16 * PAGE, "len": PAGE}
            else:
                args = {k: step[1][k] for k in ("shmid", "shm_offset", "len")}
            fe.commanded = {(args["shmid"], args["shm_offset"], args["len"])}
        elif kind == "batch":
            args = {"maps": [_safe_map(a) for a in step[1]]}
        elif kind == "scenario-start":
            args = {"name": step[1], "rate": step[2], "seed": step[3]}
        before = len(fe.log)
        started = time.monotonic()
        answer = ctl.ask(kind, args)
        took = time.monotonic() - started
        fe.commanded = set()
        line = json.dumps({"execute": kind, **({} if args is ABSENT else {"arguments": args})})
        fe.trace.append(f"{line}\n    -> {json.dumps(answer)[:300]}")
        _check_answer(answer, line.encode(), "backend_sim")
        desc = (answer.get("error") or {}).get("desc", "")
        if "did not answer" in desc or took >= 0.9 * self.REPLY_TIMEOUT:
            self.timeouts += 1
        if kind == "scenario-start" and "return" in answer:
            self.scenario = True
        if kind == "scenario-stop":
            self.scenario = False  # what it sent while it stopped is the scenario's
        elif not self.scenario:
            _wait(fe.idle, 2)
            self._check_sent(kind, args, answer, fe.log[before:], line)
        return 1

    def _check_sent(self, kind: str, args: Any, answer: dict[str, Any],
                    sent: list[tuple[int, ShmemMap, bool]], line: str) -> None:  # fmt: skip
        observed = [_observed(*s) for s in sent]
        error = answer.get("error") or {}
        desc = error.get("desc", "")
        sends = kind in ("map", "unmap", "batch")
        out_of_range = sends and _out_of_range(kind, args)
        if out_of_range and "return" in answer:
            raise AssertionError(f"backend_sim accepted {line}, whose arguments are out of "
                                 f"range: {answer}")  # fmt: skip
        if (
            not sends
            or out_of_range
            or error.get("class") == NOT_FOUND
            or (_NOT_SENT.match(desc) and "sent before it" not in desc)
        ):
            assert not observed, f"backend_sim answered {answer} yet sent {observed}\n  line {line}"
            return
        expected = _expected_requests(kind, args)
        # what it sent, then perhaps UNMAPs settling maps a reset crossed (the rules of
        # what it may unmap are the hostile front-end's to check)
        told = 0
        while told < min(len(observed), len(expected)) and observed[told] == expected[told]:
            told += 1
        extra = [o for o in observed[told:] if o[0] != UNMAP]
        if "return" in answer:
            assert told == len(expected) and not extra, (
                f"backend_sim was told {line}, answered ok and sent {observed}")  # fmt: skip
        else:
            assert not extra, f"backend_sim was told {line}, sent {observed}; answered {error}"

    # -------------------------------------------------------------- after it

    def _end_check(self, strict: bool = True) -> None:
        fe, ctl = self.fe, self.ctl
        assert fe is not None and ctl is not None and self.proc is not None
        pid = self.proc.pid
        self._alive()
        ctl.ask("scenario-stop")
        self.scenario = False
        _settle(fe.idle, lambda: "backend_sim kept sending after its scenario stopped")
        fe.heal()
        status = self._status()
        if strict:
            self._violations()
            mapped = status["mapped"]
            in_use = {m["buffer"] for m in mapped}
            held_ids = {b["id"] for b in status["buffers"]}
            assert in_use <= held_ids, (
                f"backend_sim believes mappings of buffers {sorted(in_use - held_ids)} "
                f"it no longer holds: {[m for m in mapped if m['buffer'] not in held_ids]}"
            )
            synced = not fe.desynced and self.timeouts <= fe.no_replies
            if synced:
                # what either side cannot know is left out: the front-end's unsure ranges,
                # and what backend_sim itself lists as unconfirmed
                unsure = fe.unsure | {(m["shmid"], m["shm_offset"]) for m in mapped
                                      if not m.get("confirmed", True)}  # fmt: skip
                believed = {
                    key: (m["len"], m["fd_offset"], m["writable"])
                    for m in mapped
                    if (key := (m["shmid"], m["shm_offset"])) not in unsure
                }
                acked = {k: v for k, v in fe.held.items() if k not in unsure}
                assert believed == acked, (
                    f"backend_sim believes {_diff(believed, acked)} that the front-end did not "
                    f"acknowledge; the front-end acknowledged {_diff(acked, believed)} that it "
                    "does not believe")  # fmt: skip
                idle = sorted(held_ids - in_use)
                allowed = fe.kept_allowance + self.timeouts
                assert len(idle) <= allowed, (
                    f"backend_sim keeps {len(idle)} buffers no mapping uses ({idle}); "
                    f"{allowed} map(s) had an outcome it could not know"
                )
        fe.reset("RESET_DEVICE")
        _settle(lambda: not (st := self._status())["mapped"] and not st["buffers"],
                lambda: f"after a reset backend_sim still holds buffers "
                f"{self._status()['buffers']}")  # fmt: skip
        _settle(
            lambda: _fd_count(pid) <= self.base,
            lambda: f"backend_sim fds {_fd_count(pid)} > baseline {self.base} after a reset",
        )
        if fe.desynced:
            fe.connect()


# ------------------------------------------------------------------ the tap
#
# One real `shmemctl tap` listening on both sides, and the harness as both of its peers
# over real Unix sockets. An input is one pair of connections: steps from either side
# on the main channel and on the backend channels the front-end hands over, then an
# ending (one side hangs up, or every channel is shut in turn). What each side sent is
# held to what the other received: the same bytes in order, each fd the same file
# where the tap must attach it. Where that is, the tap's own framer says, fed here the
# bytes that were sent: a unit's fds ride on its first byte; once the framing is lost,
# on the first byte of whatever the tap read, which is never after they were sent.

TAP_NAME = "fuzz-tap"
#: What the tap's control socket serves.
TAP_COMMANDS = {"query-status", "query-shmem-config", *BUILTINS}
FD_KINDS = ("memfd", "pipe", "eventfd", "socket")
#: 253 is SCM_MAX_FD, the most fds one sendmsg carries
FD_COUNTS = (0, 1, 1, 2, 3, 8, 32, 253)
HANGUPS = ("close", "shut-wr", "shut-rdwr")
TAP_RULES = {
    1: "the tap alive and answering, no internal error",
    2: "forwarded exactly",
    3: "no fd kept",
    4: "status sane",
}
_NO_FD = ("memfd", 0)
#: what the model framer is fed for the fds sent: marks, never real fd numbers
_MARK = 1 << 40
_READ = 1 << 16
_ANCILLARY = socket.CMSG_SPACE(SCM_MAX_FD * array.array("i").itemsize)


def _vring(v: int) -> VringState:
    return VringState(v % 4, 1 << (v % 15))


def _region(v: int, i: int = 0) -> MemoryRegion:
    return MemoryRegion(i << 32, PAGE * (1 + v % 8), 0x7F00_0000_0000 + (i << 32), 0)


def _device_config(v: int) -> DeviceConfig:
    return DeviceConfig(0, v % 64, 0, bytes(v % 64))


#: what a front-end asks on the main channel: the id, and from a number its payload and
#: the fds it carries by nature (kind, count)
_FRONT_REQUESTS: tuple[tuple[FrontendReq, Callable[[int], tuple[Any, tuple[str, int]]]], ...] = (
    (FrontendReq.GET_FEATURES, lambda v: (None, _NO_FD)),
    (FrontendReq.SET_FEATURES, lambda v: (v, _NO_FD)),
    (FrontendReq.SET_OWNER, lambda v: (None, _NO_FD)),
    (FrontendReq.GET_PROTOCOL_FEATURES, lambda v: (None, _NO_FD)),
    (FrontendReq.SET_PROTOCOL_FEATURES, lambda v: (v, _NO_FD)),
    (FrontendReq.SET_VRING_NUM, lambda v: (_vring(v), _NO_FD)),
    (FrontendReq.SET_VRING_ADDR,
     lambda v: (VringAddr(v % 4, 0, v, v ^ PAGE, v ^ 2 * PAGE, 0), _NO_FD)),
    (FrontendReq.SET_VRING_KICK, lambda v: (v % 4, ("eventfd", 1))),
    (FrontendReq.SET_VRING_CALL, lambda v: (v % 4, ("eventfd", 1))),
    (FrontendReq.SET_MEM_TABLE,
     lambda v: (MemoryTable(tuple(_region(v, i) for i in range(1 + v % 4))), ("memfd", 1 + v % 4))),
    (FrontendReq.ADD_MEM_REG, lambda v: (SingleMemoryRegion(_region(v)), ("memfd", 1))),
    (FrontendReq.GET_SHMEM_CONFIG, lambda v: (None, _NO_FD)),
    (FrontendReq.RESET_DEVICE, lambda v: (None, _NO_FD)),
    (FrontendReq.SET_STATUS, lambda v: (v & 0xFF, _NO_FD)),
    (FrontendReq.GET_STATUS, lambda v: (None, _NO_FD)),
    (FrontendReq.GET_CONFIG, lambda v: (_device_config(v), _NO_FD)),
    (FrontendReq.GET_VRING_BASE, lambda v: (_vring(v), _NO_FD)),
)  # fmt: skip
#: what a back-end answers on it (an int: a u64 reply)
_BACK_REPLIES: tuple[tuple[FrontendReq, Callable[[int], Any]], ...] = (
    (FrontendReq.GET_FEATURES, lambda v: v),
    (FrontendReq.GET_PROTOCOL_FEATURES, lambda v: v),
    (FrontendReq.SET_FEATURES, lambda v: 0),
    (FrontendReq.GET_STATUS, lambda v: v & 0xFF),
    (FrontendReq.GET_MAX_MEM_SLOTS, lambda v: 1 + v % 509),
    (FrontendReq.GET_SHMEM_CONFIG, lambda v: ShmemConfig.from_regions({v % 256: PAGE << v % 12})),
    (FrontendReq.GET_VRING_BASE, _vring),
    (FrontendReq.GET_CONFIG, _device_config),
)
_BACKEND_IDS = (BackendReq.SHMEM_MAP, BackendReq.SHMEM_UNMAP, BackendReq.CONFIG_CHANGE_MSG)


def _valid_message(kind: ChannelKind, sender: str, index: int, v: int,
                   need: bool) -> tuple[str, bytes, tuple[str, int]]:  # fmt: skip
    """A well-formed message `sender` may send on a channel of `kind`: its name, its
    bytes and the fds it carries by nature."""
    v &= U64
    if kind is ChannelKind.MAIN and sender == FRONTEND:
        req, build = _FRONT_REQUESTS[index % len(_FRONT_REQUESTS)]
        payload, fds = build(v)
        return req.name, encode(kind, req, payload, need_reply=need), fds
    if kind is ChannelKind.MAIN:
        req, answer = _BACK_REPLIES[index % len(_BACK_REPLIES)]
        value = answer(v)
        data = (encode_u64_reply(req, value) if isinstance(value, int)
                else encode(kind, req, value, reply=True))  # fmt: skip
        return f"{req.name} reply", data, _NO_FD
    breq = _BACKEND_IDS[index % len(_BACKEND_IDS)]
    if sender == FRONTEND:
        return f"{breq.name} reply", encode_u64_reply(breq, v), _NO_FD
    if breq is BackendReq.CONFIG_CHANGE_MSG:
        return breq.name, encode(kind, breq, None, need_reply=need), _NO_FD
    m = ShmemMap(v % 3, (v >> 2) % 16 * PAGE, (1 + (v >> 6) % 4) * PAGE, 0, (v >> 8) & 1)
    fds = ("memfd", 1) if breq is BackendReq.SHMEM_MAP else _NO_FD
    return breq.name, encode_shmem_request(breq, m, need_reply=need), fds


@dataclass
class _SentFd:
    fd: int
    ident: tuple[int, int]  # st_dev, st_ino
    #: for one end of a socket pair: the other end, which the harness keeps
    partner: socket.socket | None = None
    #: the socket of a SET_BACKEND_REQ_FD step: the channel the steps play on
    handover: bool = False
    pos: int = -1


def _make_fds(kind: str, count: int, fds: list[int],
              socks: list[socket.socket]) -> list[_SentFd]:  # fmt: skip
    """`count` new fds of `kind` ("mixed": each kind in turn) to send; each fd made, and
    the other end of each pipe and socket pair, goes to `fds` or `socks` to be closed
    once the input is over (an inode is not reused while its file is open)."""
    made = []
    for i in range(count):
        what = FD_KINDS[i % len(FD_KINDS)] if kind == "mixed" else kind
        partner = None
        if what == "memfd":
            fd = os.memfd_create("fuzz-tap", os.MFD_CLOEXEC)
            fds.append(fd)
        elif what == "pipe":
            ends = os.pipe2(os.O_CLOEXEC)
            fds.extend(ends)
            fd = ends[i % 2]
        elif what == "eventfd":
            fd = os.eventfd(0, os.EFD_CLOEXEC)
            fds.append(fd)
        else:
            sent, partner = socket.socketpair()
            partner.setblocking(False)
            socks += [sent, partner]
            fd = sent.fileno()
        st_ = os.fstat(fd)
        made.append(_SentFd(fd, (st_.st_dev, st_.st_ino), partner))
    return made


class _Flow:
    """One direction of one channel: what the harness sent, what arrived at the other
    end, and where the tap's framer, fed the same bytes here (`model`), cuts units.

    The model says what the tap must have passed on by now (`forwarded`: every complete
    unit) and where each fd must arrive (`window`): on the first byte of its unit, or,
    past a lost framing, anywhere from the end of the unit that lost it to the byte it
    was sent with. A flow the tap does not relay (a backend channel handed over as it
    is, its framing lost) is the kernel's: everything at once, each fd where it was sent."""

    def __init__(self, name: str, kind: ChannelKind, side: str, sender: socket.socket,
                 receiver: socket.socket, relayed: bool, findings: list[str]) -> None:  # fmt: skip
        self.name = name
        self.kind = kind
        self.side = side
        self.sender = sender
        self.receiver = receiver
        self.relayed = relayed
        self.findings = findings
        # as the tap's link reads them
        self.model = Framer(kind, replies=replies_from(kind, side)) if relayed else None
        self.sent = bytearray()
        self.fds: list[_SentFd] = []
        self.forwarded = 0
        self.expect: dict[int, tuple[int, int]] = {}
        #: fds the tap must replace by a socket of its own (a SET_BACKEND_REQ_FD's)
        self.replaced: set[int] = set()
        #: where the model lost the framing (the end of the unit that lost it)
        self.raw_from: int | None = None
        #: the model's units (end, framed, with a problem); and the message it held when
        #: the stream ended in a way the tap may not pass on (a close it reads as a reset,
        #: not an end; a channel the tap drops with the connection)
        self.units: list[tuple[int, bool, bool]] = []
        self.maybe: list[tuple[int, bool, bool]] = []
        self.clean = True  # only well-formed messages, each sent whole, so far
        self.got = bytearray()
        self.got_fds = 0
        self.eof = False
        self.can_send = True
        self.can_receive = True
        #: the sender ended the stream while the tap relayed it: all of it must arrive
        self.exact = False
        self.ended = False

    @property
    def direction(self) -> str:
        """As the tap's status names it."""
        return f"{self.kind.value} from {self.side}"

    def finding(self, rule: int, text: str) -> None:
        self.findings.append(f"rule {rule} ({TAP_RULES[rule]}): {self.name}: {text}")

    # -------------------------------------------------------------- sent

    def record(self, data: bytes, fds: list[_SentFd], label: str, whole: bool) -> None:
        """`data` was sent with `fds` on its first byte (`whole`: a well-formed message,
        in one piece); the model is fed the same."""
        start, first = len(self.sent), len(self.fds)
        for sent in fds:
            sent.pos = start
        self.sent += data
        self.fds += fds
        if self.model is None:
            self.expect.update({i: (start, start) for i in range(first, len(self.fds))})
            self.forwarded = len(self.sent)
            return
        before = len(self.units)
        offset = 0
        try:
            while offset < len(data):
                n = min(self.model.wanted, len(data) - offset)
                marks = [_MARK + i for i in range(first, len(self.fds))] if offset == 0 else []
                unit = self.model.feed(data[offset : offset + n], marks)
                offset += n
                if unit is not None:
                    self._cut(unit, start + offset)
        except Exception as exc:  # the tap's framer, fed the same, fails the same
            self.finding(1, f"the tap's framer fails on {label} (bytes {start}..): {exc!r}")
            return
        self.clean = self.clean and whole
        if self.clean and (
            self.units[before:] != [(len(self.sent), True, False)]
            or any(self.expect.get(i) != (start, start) for i in range(first, len(self.fds)))
        ):  # fmt: skip
            self.finding(2, f"the tap's framer does not cut the well-formed {label} sent with "
                         f"byte {start} as one unit with its {len(fds)} fds: "
                         f"{self.units[before:]}")  # fmt: skip

    def _cut(self, unit: Unit, end: int, *, sure: bool = True) -> None:
        begin = end - len(unit.data)
        for k, mark in enumerate(unit.fds):
            i = mark - _MARK
            # more fds than one sendmsg passes ride on as many first bytes as they need
            at = begin + k // SCM_MAX_FD
            self.expect[i] = (at, at) if self.raw_from is None else (
                self.raw_from, self.fds[i].pos)  # fmt: skip
        msg = unit.message
        if (
            msg is not None
            and self.kind is ChannelKind.MAIN
            and not msg.is_reply
            and msg.request == FrontendReq.SET_BACKEND_REQ_FD
            and unit.fds
            and self.fds[unit.fds[0] - _MARK].partner is not None  # the first: a socket pair's
        ):
            self.replaced.add(unit.fds[0] - _MARK)
        (self.units if sure else self.maybe).append((end, unit.framed, bool(unit.problem)))
        if sure:
            self.forwarded = end
            if self.raw_from is None and self.model is not None and not self.model.decoding:
                self.raw_from = end

    def end(self, *, sure: bool) -> None:
        """The sender ended its stream: the model gives up the message it held, which the
        tap passes on unless `sure` is False (a close, which it may see as a reset)."""
        self.can_send = False
        self.ended = True
        if self.model is None:
            self.exact = True  # the kernel's: everything sent arrives
            return
        try:
            unit = self.model.end()
        except Exception as exc:  # the tap's framer, fed the same, fails the same
            self.finding(1, f"the tap's framer fails at the end of the stream: {exc!r}")
            return
        if unit is not None:
            self._cut(unit, len(self.sent), sure=sure)
        self.exact = sure

    # -------------------------------------------------------------- received

    def window(self, j: int) -> tuple[int, int]:
        """The first and last byte fd `j` may arrive with (one the model holds: where
        its unit will start, after the last complete one)."""
        return self.expect.get(j, (self.forwarded, self.forwarded))

    def read_size(self) -> int:
        """How much to read so that the next fd's byte is known: up to its window, then
        through it, then its last byte alone."""
        if self.got_fds >= len(self.fds):
            return _READ
        x = len(self.got)
        first, last = self.window(self.got_fds)
        if x < first:
            return first - x
        if x < last:
            return last - x
        return 1 if x == last else _READ

    def arrived(self, data: bytes,
                fds: list[int]) -> list[tuple[_SentFd, socket.socket, bool]]:  # fmt: skip
        """What one read brought; the backend channels among its fds: what was sent, the
        socket that arrived, whether the tap relays it."""
        x, n = len(self.got), len(data)
        if self.sent[x : x + n] != data:
            at = next((i for i in range(n) if self.sent[x + i : x + i + 1] != data[i : i + 1]), 0)
            self.finding(2, f"byte {x + at} arrived as {data[at : at + 16]!r}..., "
                         f"sent as {bytes(self.sent[x + at : x + at + 16])!r}... "
                         f"({len(self.sent)} bytes sent)")  # fmt: skip
        self.got += data
        channels = []
        for fd in fds:
            j = self.got_fds
            self.got_fds += 1
            kept = self._fd(j, fd, x, n)
            if kept is not None:
                channels.append(kept)
            else:
                os.close(fd)
        if self.got_fds < len(self.fds) and self.window(self.got_fds)[1] < len(self.got):
            sent = self.fds[self.got_fds]
            self.finding(2, f"fd #{self.got_fds} (sent with byte {sent.pos}) did not arrive "
                         f"with byte {self.window(self.got_fds)[1]}, where its unit starts; "
                         f"{len(self.got)} bytes arrived")  # fmt: skip
            self.got_fds = len(self.fds)  # said once
        return channels

    def _fd(self, j: int, fd: int, x: int,
            n: int) -> tuple[_SentFd, socket.socket, bool] | None:  # fmt: skip
        if j >= len(self.fds):
            self.finding(2, f"an fd nobody sent arrived with bytes {x}..{x + n - 1} "
                         f"({len(self.fds)} fds were sent)")  # fmt: skip
            return None
        sent = self.fds[j]
        first, last = self.window(j)
        if not first <= x <= x + n - 1 <= last:
            where = f"byte {first}" if first == last else f"bytes {first}..{last}"
            self.finding(2, f"fd #{j} (sent with byte {sent.pos}) arrived with bytes "
                         f"{x}..{x + n - 1}, not with {where}")  # fmt: skip
        st_ = os.fstat(fd)
        same = (st_.st_dev, st_.st_ino) == sent.ident
        if j in self.replaced:
            if same or not stat.S_ISSOCK(st_.st_mode):
                self.finding(2, f"the socket of SET_BACKEND_REQ_FD (fd #{j}) arrived "
                             f"{'as it was sent' if same else 'as no socket'}: the tap "
                             "must hand over one of its own")  # fmt: skip
                return None
            return sent, socket.socket(fileno=fd), True
        if not same:
            self.finding(2, f"fd #{j} (sent with byte {sent.pos}) arrived as another file: "
                         f"dev/ino {st_.st_dev}/{st_.st_ino}, sent {sent.ident[0]}/"
                         f"{sent.ident[1]}")  # fmt: skip
            return None
        return (sent, socket.socket(fileno=fd), False) if sent.handover else None

    def check_end(self) -> None:
        """Once nothing more can arrive (at a receiver still there to see it)."""
        if not self.can_receive:
            return
        if len(self.got) < self.forwarded:
            self.finding(2, f"{self.forwarded - len(self.got)} bytes of complete messages never "
                         f"arrived ({len(self.got)} of {len(self.sent)} sent)")  # fmt: skip
        elif self.exact and (len(self.got), self.got_fds) != (len(self.sent), len(self.fds)):
            self.finding(2, f"the {self.side} ended the stream; {len(self.got)} of "
                         f"{len(self.sent)} bytes and {self.got_fds} of {len(self.fds)} fds "
                         "arrived")  # fmt: skip


def _seen_ended(flows: list[_Flow]) -> bool:
    """Whether each of `flows` has arrived at its end, or has no receiver left."""
    return all(f.eof or not f.can_receive for f in flows)


def _ancillary_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", data[: len(data) - len(data) % 4]))
    return fds


class _TapInput:
    """One pair of connections through the tap, the harness at both ends."""

    def __init__(self, front: socket.socket, back: socket.socket) -> None:
        self.findings: list[str] = []
        self.trace: list[str] = []
        self.socks = [front, back]
        self.fds: list[int] = []
        self.main = {
            FRONTEND: _Flow("main from front-end", ChannelKind.MAIN, FRONTEND, front, back, True,
                            self.findings),
            BACKEND: _Flow("main from back-end", ChannelKind.MAIN, BACKEND, back, front, True,
                           self.findings),
        }  # fmt: skip
        self.flows = list(self.main.values())
        self.channels: list[dict[str, _Flow]] = []
        #: the backend channel the steps play on: the last one handed over, until it hangs up
        self.current: dict[str, _Flow] | None = None
        for sock in self.socks:
            sock.setblocking(False)

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        close_fds(self.fds)

    def first_finding(self) -> str:
        """What went wrong first (what else went wrong follows from it)."""
        return self.findings[0]

    # -------------------------------------------------------------- steps

    def step(self, step: tuple) -> None:
        what = step[0]
        if what == "sync":
            self.sync()
            return
        if what == "backend-channel":
            self.hand_over(step[1])
            return
        if what == "hangup":
            self.hang_up_channel(step[1], step[2])
            return
        whole = False
        if what in ("valid", "cut"):
            _, kind, side, (index, value, need), *rest = step
            label, data, natural = _valid_message(kind, side, index, value, need)
            whole = what == "valid"
            if what == "cut":
                data = data[: 1 + rest[0] % (len(data) - 1)]
                label += f" cut to {len(data)} bytes"
        elif what == "raw":
            _, kind, side, data, _fds = step
            label, natural = f"{len(data)} raw bytes", _NO_FD
        elif what == "hostile-main":
            _, side, (req, flags, payload, nfds, lie), _fds = step
            kind, natural = ChannelKind.MAIN, ("memfd", nfds)
            data = _main_request_bytes(req, flags, payload, lie)
            label = f"id {req} flags {flags:#x} with {len(payload)} bytes{' (lies)' if lie else ''}"
        else:  # hostile-shmem
            _, side, (req, flags, fields, nfds, raw), _fds = step
            kind, natural = ChannelKind.BACKEND, ("memfd", nfds)
            data = _backend_request_bytes(req, flags, fields, raw)
            label = f"{len(data)} raw bytes" if req < 0 else f"id {req} flags {flags:#x} {fields}"
        flow = self.main[side] if kind is ChannelKind.MAIN else (self.current or {}).get(side)
        if flow is None or not flow.can_send:
            self.trace.append(f"  (no {kind.value} channel to send {label} on from the {side})")
            return
        fd_kind, count = step[-1] or natural
        self.send(flow, data, _make_fds(fd_kind, count, self.fds, self.socks), label, whole)

    def send(self, flow: _Flow, data: bytes, fds: list[_SentFd], label: str,
             whole: bool = False) -> None:  # fmt: skip
        """Send without blocking (reading all the while: the tap may be waiting for us to
        read before it reads more); fds on the first byte."""
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [f.fd for f in fds]))]
        done = 0
        deadline = time.monotonic() + PATIENCE
        while done < len(data):
            try:
                if done == 0 and fds:
                    done += flow.sender.sendmsg([data], rights)
                else:
                    done += flow.sender.send(data[done:])
            except BlockingIOError:
                if time.monotonic() > deadline:
                    flow.finding(2, f"the tap stopped reading: {done} of {len(data)} bytes of "
                                 f"{label} sent in {PATIENCE:g}s")  # fmt: skip
                    break
                self._poll(100, flow.sender)
                self.pump()
            except OSError as exc:
                if exc.errno == errno.ETOOMANYREFS and done == 0:  # our fds in flight: not sent
                    self.trace.append(f"  ({label}: too many fds in flight; not sent)")
                    return
                flow.finding(2, f"the tap hung up on the {flow.side} ({exc.strerror}) while "
                             f"it sent {label}")  # fmt: skip
                flow.can_send = False
                break
        at = len(flow.sent)
        if done:
            flow.record(data[:done], fds, label, whole and done == len(data))
        kinds = sorted({_fd_kind(f.fd) for f in fds})
        with_fds = f" + {len(fds)} fds ({', '.join(kinds)})" if fds else ""
        self.trace.append(f"  {flow.name}: {label}, bytes {at}..{at + len(data) - 1}{with_fds}")
        self.pump()

    def hand_over(self, need: bool) -> None:
        """SET_BACKEND_REQ_FD with one end of a socket pair; once the back-end has what
        arrives, the steps play on that channel."""
        flow = self.main[FRONTEND]
        if not flow.can_send:
            return
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        self.socks.append(ours)
        st_ = os.fstat(theirs.fileno())
        sent = _SentFd(theirs.fileno(), (st_.st_dev, st_.st_ino), ours, handover=True)
        data = encode(ChannelKind.MAIN, FrontendReq.SET_BACKEND_REQ_FD, None, need_reply=need)
        with theirs:  # as a front-end does: else a channel handed over as it is never ends
            self.send(flow, data, [sent], "SET_BACKEND_REQ_FD", whole=True)
        self.wait(lambda: flow.eof or len(flow.got) >= flow.forwarded)

    def _channel(self, sent: _SentFd, back_end: socket.socket, relayed: bool) -> None:
        front_end = sent.partner
        assert front_end is not None
        back_end.setblocking(False)
        self.socks.append(back_end)
        n = len(self.channels) + 1
        channel = {
            side: _Flow(f"backend channel {n} from {side}", ChannelKind.BACKEND, side,
                        *((front_end, back_end) if side == FRONTEND else (back_end, front_end)),
                        relayed, self.findings)
            for side in (FRONTEND, BACKEND)
        }  # fmt: skip
        self.channels.append(channel)
        self.flows += channel.values()
        if sent.handover or relayed:
            self.current = channel
        how = "relayed by the tap" if relayed else "handed over as it was sent"
        self.trace.append(f"  backend channel {n}: {how}")

    def hang_up_channel(self, side: str, how: str) -> None:
        channel = self.current
        if channel is None:
            return
        self.sync()
        self.current = None  # no more steps on it
        out, back_in = channel[side], channel[BACKEND if side == FRONTEND else FRONTEND]
        self.trace.append(f"  {out.name}: {how}")
        self._hang_up(out, back_in, how)
        back_in.can_send = False
        self.wait(lambda: out.eof or not out.can_receive)
        if out.can_receive and not out.eof:
            out.finding(2, f"the {side} hung up ({how}); the other side never saw the end")

    def _hang_up(self, out: _Flow, back_in: _Flow, how: str) -> None:
        if how == "close":
            out.sender.close()
        else:
            out.sender.shutdown(socket.SHUT_WR if how == "shut-wr" else socket.SHUT_RDWR)
        out.end(sure=how != "close")
        if how != "shut-wr":
            back_in.can_receive = False

    def finish(self, how: str, side: str) -> None:
        """The ending: `how` of `side` on the main channel (the tap then drops every
        channel); or, "graceful", each side of each backend channel, then `side` on
        the main channel, shut for writing in turn. Then whatever is left arrives."""
        self.sync()
        if self.findings:
            return
        other = BACKEND if side == FRONTEND else FRONTEND
        if how == "graceful":
            for channel in self.channels:
                for flow in channel.values():
                    if not flow.ended:
                        self.trace.append(f"  {flow.name}: shut-wr")
                        flow.sender.shutdown(socket.SHUT_WR)
                        flow.end(sure=True)
                self.wait(partial(_seen_ended, list(channel.values())))
            how = "shut-wr"
        self.trace.append(f"  {self.main[side].name}: {how}")
        self._hang_up(self.main[side], self.main[other], how)
        for flow in self.flows:
            if flow.relayed and not flow.ended:  # the tap ends it: a message it held may go on
                flow.end(sure=False)
        self.wait(lambda: all(self._over(f) for f in self.flows))
        for flow in self.flows:
            if not self._over(flow):
                flow.finding(2, f"never saw the end ({len(flow.got)} of {len(flow.sent)} "
                             "bytes arrived)")  # fmt: skip
            flow.check_end()

    @staticmethod
    def _over(flow: _Flow) -> bool:
        """Nothing more will arrive: the tap dropped the channel, or (one it does not
        relay) all of it is here."""
        if not flow.can_receive or flow.eof:
            return True
        return not flow.relayed and len(flow.got) == len(flow.sent)

    # -------------------------------------------------------------- receiving

    def sync(self) -> None:
        """Wait until everything the model cut into units has arrived."""
        flows = [f for f in self.flows if f.can_receive]
        self.wait(lambda: all(f.eof or len(f.got) >= f.forwarded for f in flows))
        for flow in flows:
            if len(flow.got) < flow.forwarded:
                why = "the tap hung up" if flow.eof else f"nothing more in {PATIENCE:g}s"
                flow.finding(2, f"{flow.forwarded - len(flow.got)} bytes of complete messages "
                             f"not passed on ({len(flow.got)} of {len(flow.sent)} arrived; "
                             f"{why})")  # fmt: skip

    def wait(self, done: Callable[[], bool], seconds: float = PATIENCE) -> bool:
        deadline = time.monotonic() + seconds
        while True:
            self.pump()
            if done():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._poll(int(min(left, 0.1) * 1000) + 1)

    def _poll(self, ms: int, sending: socket.socket | None = None) -> None:
        """Wait at most `ms` for something to arrive, or for `sending` to take more."""
        poller = select.poll()
        if sending is not None:
            poller.register(sending, select.POLLOUT)
        for flow in self.flows:
            if flow.can_receive and not flow.eof:
                poller.register(flow.receiver, select.POLLIN)
        poller.poll(ms)

    def pump(self) -> None:
        """Read what has arrived, everywhere."""
        for flow in list(self.flows):
            while flow.can_receive and not flow.eof:
                try:
                    data, anc, flags, _ = flow.receiver.recvmsg(
                        flow.read_size(), _ANCILLARY, socket.MSG_CMSG_CLOEXEC
                    )
                except BlockingIOError:
                    break
                except OSError:  # ECONNRESET: the tap closed with our bytes unread
                    flow.eof = True
                    break
                fds = _ancillary_fds(anc)
                if flags & socket.MSG_CTRUNC:
                    flow.finding(2, "more fds arrived at once than SCM_RIGHTS passes")
                if not data:
                    close_fds(fds)
                    flow.eof = True
                    break
                for sent, sock, relayed in flow.arrived(data, fds):
                    self._channel(sent, sock, relayed)


def _fd_kind(fd: int) -> str:
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"
    if target.startswith("/memfd:"):
        return "memfd"
    kind, _, rest = target.partition(":")
    return rest.strip("[]") if kind == "anon_inode" else kind


def _fd_targets(pid: int) -> list[str]:
    """What a process's fds are (for a leak: which ones)."""
    found = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            found.append(os.readlink(f"/proc/{pid}/fd/{name}"))
    return sorted(found)


_tap_side = st.sampled_from([FRONTEND, BACKEND])
_tap_kind = st.sampled_from([ChannelKind.MAIN, ChannelKind.MAIN, ChannelKind.BACKEND])
#: None: the fds the message carries by nature
_tap_fds = st.one_of(
    st.none(),
    st.none(),
    st.tuples(st.sampled_from([*FD_KINDS, "mixed"]), st.sampled_from(FD_COUNTS)),
)
_tap_valid = st.tuples(
    st.integers(0, 63), st.one_of(st.integers(0, 1 << 20), st.sampled_from(ODD_VALUES)),
    st.booleans(),
)  # fmt: skip
_tap_message = st.tuples(st.just("valid"), _tap_kind, _tap_side, _tap_valid, _tap_fds)
_tap_handover = st.tuples(st.just("backend-channel"), st.booleans())
tap_steps = st.lists(
    st.one_of(
        _tap_message, _tap_message, _tap_message, _tap_message, _tap_handover, _tap_handover,
        st.tuples(st.just("cut"), _tap_kind, _tap_side, _tap_valid, st.integers(0, 5000),
                  _tap_fds),
        st.tuples(st.just("raw"), _tap_kind, _tap_side,
                  st.one_of(headers, st.binary(min_size=1, max_size=100)), _tap_fds),
        st.tuples(st.just("hostile-main"), _tap_side, main_message, _tap_fds),
        st.tuples(st.just("hostile-shmem"), _tap_side, st.one_of(plausible, hostile, garbage),
                  _tap_fds),
        st.tuples(st.just("hangup"), _tap_side, st.sampled_from(HANGUPS)),
        st.tuples(st.just("sync")),
    ),
    max_size=24,
)  # fmt: skip
tap_case = st.tuples(tap_steps, st.tuples(st.sampled_from(["graceful", "graceful", *HANGUPS]),
                                          _tap_side))  # fmt: skip


class TapTarget(_DaemonTarget):
    """A real `shmemctl tap` listening on both sides; the harness is both of its peers.

    Per input, the rules (TAP_RULES): 1. the tap alive and answering on its control
    socket, its log without "internal error" or a traceback; 2. what each side sent
    arrived at the other as `_Flow` says: the same bytes in order (across a hang-up, at
    least every complete message sent before it; all of it from a side that shut its
    writing), each fd the same file where the tap must attach it, but a
    SET_BACKEND_REQ_FD's socket, which must be one of the tap's own that relays;
    3. once both sides closed, its fds and threads back to their baseline; 4. its status
    then: idle, one connection more, and its counts within what was sent and what
    arrived."""

    def __init__(self, workdir: Path, extra: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.extra = extra
        self.front_path = str(workdir / "tap-front.sock")
        self.back_path = str(workdir / "tap-back.sock")
        run = workdir / "tap-run"
        self.env = {**os.environ, "SHMEMCTL_RUN_DIR": str(run)}
        self.ctl_path = str(run / TAP_NAME / "tap.ctl")
        self.log = workdir / "tap.log"
        self.proc: subprocess.Popen | None = None
        self.ctl: RawControl | None = None
        self.base: tuple[int, int] = (0, 0)  # fds, threads
        self.base_fds: list[str] = []
        self.last: dict[str, Any] = {}  # the status after the last input
        self.log_seen = 0
        self.clean = False

    def start(self) -> None:
        for path in (self.front_path, self.back_path, self.ctl_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shmemctl", "tap", "--front", f"listen:{self.front_path}",
             "--back", f"listen:{self.back_path}", "--name", TAP_NAME,
             "--reply-deadline", "0.2", *self.extra],
            env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.log, "a"),  # noqa: SIM115
        )  # fmt: skip
        paths = (self.front_path, self.back_path, self.ctl_path)
        if not _wait(lambda: all(os.path.exists(p) for p in paths), 15):
            raise RuntimeError(f"the tap did not start:\n{_log_tail(self.log)}")
        self.ctl = RawControl(self.ctl_path)
        self.last = self._idle(None)
        pid = self.proc.pid
        _wait(lambda: _fd_count(pid) == _fd_count(pid), 2)
        self.base = (_fd_count(pid), _tasks(pid))
        self.base_fds = _fd_targets(pid)
        self.log_seen = self.log.stat().st_size
        self.clean = True

    def _ready(self) -> None:
        if self.clean:
            return
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.last = self._idle(None)
                pid = self.proc.pid
                _settle(lambda: _fd_count(pid) <= self.base[0], lambda: "fds above baseline")
                self.log_seen = self.log.stat().st_size
                self.clean = True
                return
            except (AssertionError, OSError):
                pass
        self.recover()

    # -------------------------------------------------------------- one input

    def session(self, case: tuple) -> int:
        steps, (ending, side) = case
        self._ready()
        self.clean = False
        try:
            negotiation_check(self.ctl_path, "tap", TAP_COMMANDS)
        except AssertionError as exc:
            raise AssertionError(f"rule 1 ({TAP_RULES[1]}): {exc}") from None
        number = self.last["connection"] + 1
        play = _TapInput(_connect_unix(self.front_path), _connect_unix(self.back_path))
        try:
            for step in steps:
                play.step(step)
                if play.findings:
                    break
            else:
                play.finish(ending, side)
        finally:
            play.close()
        try:
            if play.findings:
                raise AssertionError(play.first_finding())
            self._end_check(number, play)
        except AssertionError as exc:  # which rule, the input, and what happened
            raise AssertionError(
                f"{exc}\n  input: {len(steps)} steps, then {ending} by the {side}\n"
                "  what happened, last first:\n" + "\n".join(reversed(play.trace[-40:]))
            ) from None
        self.clean = True
        return 1

    def _alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"rule 1 ({TAP_RULES[1]}): the tap died (exit "
                                 f"{self.proc.returncode}):\n{_log_tail(self.log)}")  # fmt: skip

    def _status(self) -> dict[str, Any]:
        assert self.ctl is not None
        self._alive()
        try:
            answer = self.ctl.ask("query-status")
            _check_answer(answer, b'{"execute":"query-status"}', "tap")
        except AssertionError as exc:
            raise AssertionError(f"rule 1 ({TAP_RULES[1]}): {exc}") from None
        if "error" in answer:
            raise AssertionError(f"rule 1 ({TAP_RULES[1]}): status failed: {answer['error']}")
        status: dict[str, Any] = answer["return"]
        return status

    def _shmem_config(self, status: dict[str, Any]) -> None:
        """The layout the last GET_SHMEM_CONFIG reply carried: an error until one has
        passed the tap, then the layout, of a connection the tap has seen."""
        assert self.ctl is not None
        try:
            answer = self.ctl.ask("query-shmem-config")
            _check_answer(answer, b'{"execute":"query-shmem-config"}', "tap")
        except AssertionError as exc:
            raise AssertionError(f"rule 1 ({TAP_RULES[1]}): {exc}") from None
        config = answer.get("return")
        if config is not None and not (
            isinstance(config, dict)
            and set(config) == {"nregions", "sizes", "connection"}
            and _is_int(config["connection"])
            and 0 < config["connection"] <= status["connection"]
        ):
            raise AssertionError(f"rule 4 ({TAP_RULES[4]}): query-shmem-config returned "
                                 f"{config!r:.300}")  # fmt: skip

    def _idle(self, number: int | None) -> dict[str, Any]:
        """The status once the tap waits for the next front-end (after connection
        `number`, if given)."""
        seen: list[dict[str, Any]] = []

        def idle() -> bool:
            seen[:] = [self._status()]
            s = seen[0]
            return s["state"] == "waiting for the front-end" and (
                number is None or s["connection"] == number)  # fmt: skip

        _settle(idle, lambda: f"rule 4 ({TAP_RULES[4]}): not idle after connection {number}: "
                f"state {seen[0]['state']!r}, connection {seen[0]['connection']}")  # fmt: skip
        return seen[0]

    def _end_check(self, number: int, play: _TapInput) -> None:
        assert self.proc is not None
        pid = self.proc.pid
        self._alive()
        status = self._idle(number)
        with open(self.log, "rb") as log:
            log.seek(self.log_seen)
            new = log.read()
        self.log_seen += len(new)
        text = new.decode(errors="replace")
        bad = next((ln for ln in text.splitlines() if "internal error" in ln or "Traceback" in ln),
                   None)  # fmt: skip
        if bad is not None:
            start = text.find(bad)
            raise AssertionError(f"rule 1 ({TAP_RULES[1]}): the tap's log says {bad.strip()!r}"
                                 f"\n{text[start : start + 3000]}")  # fmt: skip
        _settle(
            lambda: _fd_count(pid) <= self.base[0] and _tasks(pid) <= self.base[1],
            lambda: (
                f"rule 3 ({TAP_RULES[3]}): {_fd_count(pid)} fds (baseline {self.base[0]}), "
                f"{_tasks(pid)} threads (baseline {self.base[1]}) once both sides closed; "
                f"fds beyond the baseline's: {_beyond(_fd_targets(pid), self.base_fds)}"
            ),
        )
        self._shmem_config(status)
        problems = _count_problems(self.last, status, play)
        if problems:
            raise AssertionError(f"rule 4 ({TAP_RULES[4]}): " + "; ".join(problems))
        self.last = status


def _beyond(now: list[str], base: list[str]) -> list[str]:
    extra = list(now)
    for target in base:
        if target in extra:
            extra.remove(target)
    return extra


def _count_problems(before: dict[str, Any], after: dict[str, Any], play: _TapInput) -> list[str]:
    """What is wrong with the counts of the status after an input, given the one before
    and what the input sent and what arrived."""
    problems = []
    if any(side["attached"] for side in after["sides"].values()):
        problems.append(f"a side still attached when idle: {after['sides']}")
    for rule, count in before["violations"].items():
        if after["violations"].get(rule, 0) < count:
            problems.append(f"violations of {rule} went down: {count} -> {after['violations']}")
    for kind in ChannelKind:
        for side in (FRONTEND, BACKEND):
            flows = [f for f in play.flows if f.kind is kind and f.side == side and f.relayed]
            old, new = before["counters"][kind.value][side], after["counters"][kind.value][side]
            delta = {key: new[key] - old[key] for key in new}

            def units(f: _Flow, index: int, arrived: bool) -> int:
                done = [u for u in f.units if u[index] and (not arrived or u[0] <= len(f.got))]
                return len(done) + (0 if arrived else sum(1 for u in f.maybe if u[index]))

            bounds = {
                "bytes": (sum(len(f.got) for f in flows), sum(len(f.sent) for f in flows)),
                "fds": (sum(f.got_fds for f in flows), sum(len(f.fds) for f in flows)),
                "messages": (sum(units(f, 1, True) for f in flows),
                             sum(units(f, 1, False) for f in flows)),
                "undecodable": (sum(units(f, 2, True) for f in flows),
                                sum(units(f, 2, False) for f in flows)),
            }  # fmt: skip
            for key, (low, high) in bounds.items():
                if not low <= delta[key] <= high:
                    problems.append(
                        f"{kind.value} from {side}: {key} counted {delta[key]}, "
                        f"not within {low}..{high} (what arrived..what was sent)"
                    )
    lost = {f.direction for f in play.flows
            if f.relayed and f.raw_from is not None and f.raw_from <= len(f.got)}  # fmt: skip
    may = {f.direction for f in play.flows if f.relayed and f.raw_from is not None}
    if not lost <= set(after["raw"]) <= may:
        problems.append(f"relayed raw: {after['raw']}; the framing was lost on {sorted(lost)}"
                        f" (and perhaps {sorted(may - lost)})")  # fmt: skip
    return problems


# ------------------------------------------------------------------ entry

TARGETS = ("codec", "engine", "frontend", "backend", "control-frontend", "control-backend",
           "sim-control", "tap")  # fmt: skip
#: Examples per hypothesis run for the targets that drive daemons with long examples:
#: small, so that --seconds is kept to closely.
DAEMON_CHUNK = 25


def run_target(target: str, examples: int, seconds: float, seed_value: int,
               daemon_args: tuple[str, ...] = (), *, peer_args: tuple[str, ...] = (),
               inputs: int | None = None, keep_going: bool = False, shrink: bool = True,
               wanted: str | None = None, workdir: str | None = None) -> Outcome:  # fmt: skip
    """One target's run. `daemon_args` go to the daemon under test (for the control
    targets, the one whose socket is fuzzed), `peer_args` to the other one of a pair. The
    daemons' sockets and logs go to `workdir` (kept), else to a temporary directory.
    With `keep_going`, the run goes on past failures (until one that says `wanted`)."""
    budget = {"inputs": inputs, "keep_going": keep_going, "shrink": shrink, "wanted": wanted}
    if target == "codec":
        return _run(target, codec_body, codec_case, examples, seconds, seed_value, **budget)
    if target == "engine":
        return _run(target, engine_body, ops, examples, seconds, seed_value, **budget)
    with contextlib.ExitStack() as stack:
        tmp = Path(workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="fuzz-")))
        if target == "frontend":
            fe = FrontendTarget(tmp, daemon_args)
            stack.callback(fe.close)
            return _run(target, fe.session, backend_messages, examples, seconds, seed_value,
                        **budget)  # fmt: skip
        if target == "backend":
            be = BackendTarget(tmp, daemon_args)
            stack.callback(be.close)
            return _run(target, be.session, main_messages, examples, seconds, seed_value,
                        **budget)  # fmt: skip
        if target in ("control-frontend", "control-backend"):
            role = target.removeprefix("control-")
            fe_args, be_args = (daemon_args, peer_args) if role == "frontend" else (
                peer_args, daemon_args)  # fmt: skip
            pair = PairTarget(tmp, role, fe_args, be_args)
            stack.callback(pair.stop)
            pair.start()
            return _run(target, pair.session, control_case(role), examples, seconds,
                        seed_value, recover=pair.recover, chunk_size=DAEMON_CHUNK,
                        **budget)  # fmt: skip
        if target in ("sim-control", "tap"):
            daemon, case = ((SimControlTarget(tmp, daemon_args), sim_case)
                            if target == "sim-control"
                            else (TapTarget(tmp, daemon_args), tap_case))  # fmt: skip
            stack.callback(daemon.stop)
            daemon.start()
            return _run(target, daemon.session, case, examples, seconds, seed_value,
                        recover=daemon.recover, chunk_size=DAEMON_CHUNK, **budget)  # fmt: skip
    raise ValueError(f"no target {target!r}; there are: {', '.join(TARGETS)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    parser.add_argument(
        "--examples", type=int, help="per target, at most (default 1000; no limit with --inputs)"
    )
    parser.add_argument("--inputs", type=int, help="per target: stop once this many are fed")
    parser.add_argument("--seconds", type=float, default=60, help="per target, at most")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="go on after a failure (restarting the daemons) to find others",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--workdir", help="keep the daemons' sockets and logs here")
    parser.add_argument(
        "--no-shrink",
        action="store_true",
        help="report failing examples as found (faster; longer examples)",
    )
    args = parser.parse_args()
    if args.examples is None:
        args.examples = 1000 if args.inputs is None else sys.maxsize
    outcomes = []
    for target in TARGETS if args.target == "all" else (args.target,):
        outcome = run_target(target, args.examples, args.seconds, args.seed,
                             inputs=args.inputs, keep_going=args.keep_going,
                             workdir=args.workdir, shrink=not args.no_shrink)  # fmt: skip
        outcomes.append(outcome)
        if not args.json:
            verdict = (
                "no failure"
                if not outcome.failures
                else f"{len(outcome.failures)} FAILED:\n" + "\n\n".join(outcome.failures)
            )
            print(f"{target:16} {outcome.examples:7} examples {outcome.inputs:8} inputs "
                  f"in {outcome.seconds:6.1f}s  {verdict}", flush=True)  # fmt: skip
    if args.json:
        print(json.dumps({"seed": args.seed, "targets": [o.__dict__ for o in outcomes]}))
    sys.exit(1 if any(o.failures for o in outcomes) else 0)


if __name__ == "__main__":
    main()
