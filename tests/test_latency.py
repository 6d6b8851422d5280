"""The latency histogram a front-end keeps (shmemctl.latency), in memory."""

from __future__ import annotations

from shmemctl.latency import BOUNDS, LatencyHistogram


def test_observations_land_in_cumulative_buckets_with_their_sum() -> None:
    h = LatencyHistogram()
    for seconds in (3e-6, 5e-6, 7e-6, 2e-3, 5.0):
        h.observe(seconds)
    out = h.to_json()
    assert out["count"] == 5 and out["sum"] == 3e-6 + 5e-6 + 7e-6 + 2e-3 + 5.0
    counts = dict(out["buckets"])
    assert counts[5e-6] == 2  # a bound holds what equals it
    assert counts[1e-5] == 3 and counts[2.5e-3] == 4 and counts[1.0] == 4
    assert counts["+Inf"] == 5
    assert [b for b, _ in out["buckets"]] == [*BOUNDS, "+Inf"]


def test_an_empty_histogram_is_all_zero() -> None:
    out = LatencyHistogram().to_json()
    assert out["count"] == 0 and out["sum"] == 0.0
    assert all(count == 0 for _, count in out["buckets"])
