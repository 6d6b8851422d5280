"""`shmemctl bench --tap` in its quickest form: real daemons with and without a real tap
between them. The figures are the machine's; only their shape is checked, never their
size."""

from __future__ import annotations

import json

import pytest

from shmemctl.bench import MODES, render_tap_bench, tap_bench


def test_the_tap_bench_prints_both_figures_their_ratio_and_the_taps_fds(capsys) -> None:
    tap_bench(as_json=True, quick=True, repeats=1)
    report = json.loads(capsys.readouterr().out)

    assert report["repeats"] == 1
    assert [r["mode"] for r in report["results"]] == list(MODES)
    for r in report["results"]:
        direct, tap = r["direct"], r["tap"]
        for side in (direct, tap):
            assert len(side["runs"]) == 1
            assert side["median"] == side["min"] == side["max"] > 0
            assert side["spread"] == 0
        assert r["ratio"] == pytest.approx(tap["median"] / direct["median"], abs=1e-3)
        assert r["ratio_min"] == r["ratio_max"] == r["ratio"]

    [run] = report["tap_process"]
    before, after = run["before"], run["after"]
    assert before["fds"] > 0 and after["fds"] > 0
    assert before["rss"] > 0 and after["rss"] > 0
    # once the last unmap is answered no map's fd is left on its way through the tap, and
    # the tap counted every map of every cell (warm-up maps besides)
    assert after["in_flight"] == 0
    assert after["maps"] >= sum(r["pairs"] for r in report["results"])

    text = render_tap_bench(report, elapsed=1.0)
    for r in report["results"]:
        assert f"{r['direct']['median']:.0f}" in text
        assert f"{r['tap']['median']:.0f}" in text
        assert f"{r['ratio']:.0%}" in text
    assert f"fds {before['fds']} -> {after['fds']} over {after['maps']:,} maps" in text
