"""Fuzzing harness: hypothesis-driven, seeded, bounded in examples and in seconds.

    python fuzz/harness.py [--target codec|engine|frontend|backend|all]
                           [--examples N] [--seconds S] [--seed K]

Targets: the codec (bytes and fds into MessageReader), the engine (map/unmap/reset
sequences against real mmaps), the front-end daemon and backend_sim (each a real
process, fed hostile message sequences over real sockets). After every example the
invariants are checked: nothing but the layer's own error, the daemon alive, its
fds back to their baseline, and the kernel holding exactly what its table holds.
A failure prints hypothesis's shrunk example; the same --seed reproduces the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from shmemctl.backend import BackendEndpoint, DeviceModel
from shmemctl.channel import Channel, close_fds
from shmemctl.control import ControlClient
from shmemctl.daemon import listen_unix
from shmemctl.shmem import RegionTable, ShmemRefused
from shmemctl.shmem.procmaps import disagreements, read_maps
from shmemctl.wire import ChannelKind, MessageReader, ShmemMap, WireError
from shmemctl.wire.messages import encode_shmem_request

PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20
U64 = (1 << 64) - 1


@dataclass
class Outcome:
    target: str
    examples: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


CHUNK = 200


def _chunk(body: Callable[..., None], strategy: st.SearchStrategy, size: int, seed_value: int,
           ran: list[int]) -> Callable[[], None]:  # fmt: skip
    @seed(seed_value)
    @settings(max_examples=size, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(strategy)
    def test(case: object) -> None:
        ran[0] += 1
        body(case)

    return test


def _run(target: str, body: Callable[..., None], strategy: st.SearchStrategy, examples: int,
         seconds: float, seed_value: int) -> Outcome:  # fmt: skip
    """Up to `examples` examples, stopping between chunks of CHUNK once `seconds` are
    spent. Chunk k is seeded with seed_value + k, so the same seed repeats the run."""
    outcome = Outcome(target)
    started = time.monotonic()
    chunk = 0
    while outcome.examples < examples and time.monotonic() - started < seconds:
        size = min(CHUNK, examples - outcome.examples)
        ran = [0]
        try:
            _chunk(body, strategy, size, seed_value + chunk, ran)()
        except Exception as exc:  # shrunk by hypothesis: report it, with how to repeat it
            outcome.failures.append(
                f"{type(exc).__name__}: {exc}"[:4000] + f"\n(chunk {chunk} of seed {seed_value})"
            )
            outcome.examples += ran[0]
            break
        outcome.examples += ran[0]
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


def codec_body(case: tuple) -> None:
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


def engine_body(sequence: list) -> None:
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

    def session(self, messages: list) -> None:
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
        try:
            for req, flags, fields, nfds, raw in messages:
                fds = ((self.buffer,) * nfds) if nfds < 8 else (a.fileno(),) * nfds
                if req < 0:
                    data = raw
                else:
                    shmid, off, length, fd_off, mflags = fields
                    data = encode_shmem_request(req, ShmemMap(shmid, off, length, fd_off, mflags),
                                                need_reply=flags == 0x9)  # fmt: skip
                try:
                    ch.send(data, fds)
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

    def check_agreement(self) -> None:
        assert self.proc.poll() is None, "the front-end died"
        with ControlClient(self.ctl) as c:
            status = c.execute("status")
        assert status["disagreements"] == [], status["disagreements"]

    def check(self) -> None:
        assert self.proc.poll() is None, "the front-end died"
        assert _wait(lambda: _fd_count(self.proc.pid) <= self.baseline, 5), (
            f"front-end fds {_fd_count(self.proc.pid)} > baseline {self.baseline}"
        )
        with ControlClient(self.ctl) as c:
            status = c.execute("status")
        assert status["disagreements"] == [], status["disagreements"]
        assert all(r["count"] == 0 for r in status["regions"]) or status["state"] == "connected"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.listener.close()
        os.close(self.buffer)


main_messages = st.lists(
    st.tuples(
        st.integers(0, 50), st.sampled_from([0x1, 0x9, 0x5, 0x0, 0x21, 0xD]),
        st.one_of(st.binary(max_size=64), st.sampled_from([b"\0" * 8, b"\0" * 40, b"\0" * 2056])),
        st.integers(0, 4), st.booleans(),
    ),
    min_size=1, max_size=10,
)  # fmt: skip


class BackendTarget:
    """A real backend_sim process; we are a front-end that says anything at all."""

    def __init__(self, workdir: Path) -> None:
        self.sock = str(workdir / "fuzz-be.sock")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "backend_sim", "--listen", self.sock, "--regions", "0=1M",
             "--control", str(workdir / "fuzz-be.ctl"), "--reply-timeout", "0.5"],
            stdout=subprocess.DEVNULL, stderr=open(workdir / "fuzz-be.log", "w"),  # noqa: SIM115
        )  # fmt: skip
        assert _wait(lambda: os.path.exists(self.sock), 10), "backend_sim did not start"
        time.sleep(0.2)
        self.baseline = _fd_count(self.proc.pid)

    def session(self, messages: list) -> None:
        s = socket.socket(socket.AF_UNIX)
        s.connect(self.sock)
        ch = Channel(s, ChannelKind.MAIN, replies=True)
        extra = [os.eventfd(0) for _ in range(4)]
        try:
            for req, flags, payload, nfds, lie in messages:
                size = len(payload) + (7 if lie else 0)  # sometimes announce more than sent
                try:
                    ch.send(struct.pack("<III", req, flags, size) + payload, tuple(extra[:nfds]))
                    _drain(ch)
                except Exception:
                    break
        finally:
            close_fds(extra)
            s.close()
        self.check()

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


# ------------------------------------------------------------------ entry


def run_target(target: str, examples: int, seconds: float, seed_value: int,
               daemon_args: tuple[str, ...] = ()) -> Outcome:  # fmt: skip
    if target == "codec":
        return _run(target, codec_body, codec_case, examples, seconds, seed_value)
    if target == "engine":
        return _run(target, engine_body, ops, examples, seconds, seed_value)
    with tempfile.TemporaryDirectory(prefix="shmemctl-fuzz-") as tmp:
        if target == "frontend":
            fe = FrontendTarget(Path(tmp), daemon_args)
            try:
                return _run(target, fe.session, backend_messages, examples, seconds, seed_value)
            finally:
                fe.close()
        be = BackendTarget(Path(tmp))
        try:
            return _run(target, be.session, main_messages, examples, seconds, seed_value)
        finally:
            be.close()


TARGETS = ("codec", "engine", "frontend", "backend")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    parser.add_argument("--examples", type=int, default=1000, help="per target, at most")
    parser.add_argument("--seconds", type=float, default=60, help="per target, at most")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    outcomes = []
    for target in TARGETS if args.target == "all" else (args.target,):
        outcome = run_target(target, args.examples, args.seconds, args.seed)
        outcomes.append(outcome)
        if not args.json:
            verdict = "no failure" if not outcome.failures else "FAILED:\n" + outcome.failures[0]
            print(f"{target:9} {outcome.examples:6} examples in {outcome.seconds:6.1f}s  {verdict}")
    if args.json:
        print(json.dumps([o.__dict__ for o in outcomes]))
    sys.exit(1 if any(o.failures for o in outcomes) else 0)


if __name__ == "__main__":
    main()
