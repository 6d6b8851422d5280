"""A short, seeded run of the fuzzing harness (fuzz/harness.py runs it long, on demand)."""

from __future__ import annotations

import random

import pytest

from fuzz.harness import (
    PLAUSIBLE,
    SAFE_BUFFER,
    _safe_request,
    _segments,
    random_spec,
    render,
    run_target,
)

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
    outcome = run_target("control-backend", 400, seconds=40, seed_value=5, keep_going=True,
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


def test_every_line_kind_renders_and_counts_its_lines() -> None:
    rng = random.Random(11)
    for role in PLAUSIBLE:
        specs = [random_spec(rng, role) for _ in range(2000)]
        rendered = [render(spec) for spec in specs]
        assert {spec[0] for spec in specs} >= {"req", "json", "raw", "nest", "number", "blank"}
        stream = b"".join(line + b"\n" for line, _ in rendered)
        assert len(_segments(rendered)) == stream.count(b"\n")
