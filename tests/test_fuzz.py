"""A short, seeded run of the fuzzing harness (fuzz/harness.py runs it long, on demand)."""

from __future__ import annotations

import itertools
import random

import pytest

from fuzz.harness import (
    PLAUSIBLE,
    SAFE_BUFFER,
    SEPARATORS,
    _join,
    _safe_request,
    frame_requests,
    random_spec,
    render,
    run_target,
)
from shmemctl.control.protocol import MAX_DEPTH, MAX_REQUEST, RequestStream, RequestTooLong

BUDGET = {
    "codec": 400,
    "engine": 80,
    "frontend": 40,
    "backend": 60,
    # an example of these carries dozens of inputs
    "control-frontend": 8,
    "control-backend": 8,
    "sim-control": 8,
    # an example is one pair of connections through the tap, with its steps and ending
    "tap": 60,
}


@pytest.mark.parametrize("target", sorted(BUDGET))
def test_short_fuzz_run_finds_nothing(target: str) -> None:
    outcome = run_target(target, BUDGET[target], seconds=30, seed_value=20261122)
    assert outcome.failures == [], "\n\n".join(outcome.failures)
    assert outcome.examples > 0
    assert outcome.inputs >= outcome.examples


def test_the_harness_catches_a_broken_frontend() -> None:
    """With its overlap check switched off, a front-end lets two mappings claim one range:
    its table and the kernel disagree, and the harness must say so."""
    outcome = run_target("frontend", 200, seconds=90, seed_value=3,
                         daemon_args=("--fault", "skip-overlap-check"))  # fmt: skip
    assert outcome.failures, "the harness missed a front-end that maps over its own mappings"


def test_hostile_control_lines_catch_a_broken_frontend_behind_backend_sim() -> None:
    """Maps asked for on backend_sim's control socket reach a real front-end; one that maps
    over its own mappings must show up as a table that disagrees with /proc."""
    # seed 3 finds it in example 6, on a connection whose every request is answered; seed 5
    # needs ~72 examples (more than 40 s on a loaded machine) unless a hang-up race helps
    outcome = run_target("control-backend", 400, seconds=40, seed_value=3, keep_going=True,
                         shrink=False, wanted="table vs /proc",
                         peer_args=("--fault", "skip-overlap-check"))  # fmt: skip
    assert any("table vs /proc" in f for f in outcome.failures), outcome.failures


def test_sim_control_catches_a_backend_that_sends_other_maps_than_it_was_told() -> None:
    """backend_sim with map-out-of-bounds sends every map shifted past its region: the
    hostile front-end sees a request other than the control command asked for."""
    outcome = run_target("sim-control", 400, seconds=40, seed_value=5, keep_going=True,
                         shrink=False, wanted="was told",
                         daemon_args=("--fault", "map-out-of-bounds"))  # fmt: skip
    assert any("was told" in f for f in outcome.failures), outcome.failures


def test_control_lines_never_ask_backend_sim_for_a_huge_buffer() -> None:
    """A map's fd_offset + len is what backend_sim allocates and tags page by page; the
    harness keeps it small, or so large it fails at once."""
    rng = random.Random(7)
    for _ in range(20000):
        spec = random_spec(rng, "backend")
        if spec[0] != "req" or spec[1] not in ("map", "batch"):
            continue
        obj = _safe_request({"execute": spec[1], "arguments": spec[2]})
        args = obj["arguments"]
        maps = args.get("maps") if isinstance(args, dict) and spec[1] == "batch" else [args]
        for m in maps if isinstance(maps, list) else []:
            if not isinstance(m, dict):
                continue
            length, fd_offset = m.get("len"), m.get("fd_offset", 0)
            if type(length) is int and type(fd_offset) is int:
                assert not SAFE_BUFFER < length + fd_offset < 2**63, m


def daemons_reading(pieces: list[bytes]) -> list[bytes | str]:
    """What a daemon's own framer makes of a stream sent in these pieces: each complete
    request it serves (its bytes), "error" for one it answers as bad, and "overlong"
    where it gives up on the client."""
    requests, out = RequestStream(), []
    for piece in pieces:
        for request in requests.feed(piece):
            if isinstance(request, RequestTooLong):
                out.append("overlong")
                return out  # and the client is dropped
            out.append(request if isinstance(request, bytes) else "error")
    return out


def harness_reading(stream: bytes) -> list[bytes | str]:
    """The same, as the harness expects it (frame_requests), to know what to check."""
    out: list[bytes | str] = []
    for framed in frame_requests(stream):
        if len(framed.data) > MAX_REQUEST:
            out.append("overlong")
            break
        if not framed.complete:
            break
        out.append("error" if framed.junk or framed.deepest > MAX_DEPTH else framed.data)
    return out


def test_every_line_kind_renders_and_is_framed_as_the_daemon_frames_it() -> None:
    """QMP input is a stream: the harness must cut it where the daemon does, line kind by
    line kind and whatever separates them, or it checks answers against the wrong
    requests."""
    rng = random.Random(11)
    for role in PLAUSIBLE:
        specs = [random_spec(rng, role) for _ in range(2000)]
        lines = [render(spec)[0] for spec in specs]
        assert {spec[0] for spec in specs} >= {"req", "json", "raw", "nest", "number", "blank"}
        for line in lines:  # each on its own, ended as a person ends it
            assert harness_reading(line + b"\n") == daemons_reading([line + b"\n"]), line[:200]
        for separator in SEPARATORS:  # and back to back, sent a line at a time
            for start in range(0, len(lines), 50):
                sent = [_join(lines[start : start + k], separator) for k in range(51)]
                pieces = [after[len(before) :] for before, after in itertools.pairwise(sent)]
                assert harness_reading(sent[-1]) == daemons_reading(pieces), (
                    role, separator, start
                )  # fmt: skip
