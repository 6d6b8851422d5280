"""A short, seeded run of the fuzzing harness (fuzz/harness.py runs it long, on demand)."""

from __future__ import annotations

import pytest

from fuzz.harness import run_target

BUDGET = {"codec": 400, "engine": 80, "frontend": 40, "backend": 60}


@pytest.mark.parametrize("target", sorted(BUDGET))
def test_short_fuzz_run_finds_nothing(target: str) -> None:
    outcome = run_target(target, BUDGET[target], seconds=60, seed_value=20261122)
    assert outcome.failures == [], outcome.failures[0]
    assert outcome.examples > 0


def test_the_harness_catches_a_broken_frontend() -> None:
    """With its overlap check switched off, a front-end lets two mappings claim one range:
    its table and the kernel disagree, and the harness must say so."""
    outcome = run_target("frontend", 200, seconds=90, seed_value=3,
                         daemon_args=("--fault", "skip-overlap-check"))  # fmt: skip
    assert outcome.failures, "the harness missed a front-end that maps over its own mappings"
