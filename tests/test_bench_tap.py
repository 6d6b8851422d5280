"""`shmemctl bench` in its quickest forms: real daemons, with and without a real tap
between them. The figures are the machine's; only their shape is checked, never their
size."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from shmemctl.bench import (
    _FLOOR_LINE,
    MODES,
    _region_for,
    daemon_sample,
    frontend_rss,
    percent,
    render_pair_bench,
    render_tap_bench,
    rss_per_mapping,
    run_cells,
    tap_bench,
)

BENCH = Path(__file__).parent.parent / "bench"


@pytest.mark.parametrize("floor", ["relay_floor.c", "relay_floor.py"])
def test_the_tap_bench_prints_both_figures_their_ratio_and_the_taps_fds(capsys, floor) -> None:
    """Also through a relay floor from bench/, built or run as it is: every cell
    completes through it (so it relays the backend channel it is handed, as the tap
    does), with its figures."""
    tap_bench(as_json=True, quick=True, repeats=1, floor=BENCH / floor)
    report = json.loads(capsys.readouterr().out)

    assert report["repeats"] == 1
    assert [r["mode"] for r in report["results"]] == list(MODES)
    for r in report["results"]:
        direct, tap, floor = r["direct"], r["tap"], r["floor"]
        for side in (direct, tap, floor):
            assert len(side["runs"]) == 1
            assert side["median"] == side["min"] == side["max"] > 0
            assert side["spread"] == 0
        assert r["ratio"] == pytest.approx(tap["median"] / direct["median"], abs=1e-3)
        assert r["ratio_min"] == r["ratio_max"] == r["ratio"]
        assert r["floor_ratio"] == pytest.approx(floor["median"] / direct["median"], abs=1e-3)
        assert r["floor_ratio_min"] == r["floor_ratio_max"] == r["floor_ratio"]

    [run] = report["tap_process"]
    before, after = run["before"], run["after"]
    assert before["fds"] > 0 and after["fds"] > 0
    assert before["rss"] > 0 and after["rss"] > 0
    # once the last unmap is answered no map's fd is left on its way through the tap, and
    # the tap counted every map of every cell (warm-up maps besides)
    assert after["in_flight"] == 0
    assert after["maps"] >= sum(r["pairs"] for r in report["results"])

    text = render_tap_bench(report, elapsed=1.0)
    assert "floor/direct" in text.splitlines()[0]
    for r, line in zip(report["results"], text.splitlines()[1:], strict=False):
        assert line.startswith(r["mode"])
        for figure in (r["direct"], r["tap"], r["floor"]):
            assert f" {figure['median']:.0f} " in line
        assert percent(r["ratio"]) in line and percent(r["floor_ratio"]) in line
    assert f"fds {before['fds']} -> {after['fds']} over {after['maps']:,} maps" in text


def test_a_ratio_just_under_the_target_never_reads_as_the_target() -> None:
    side = {"median": 1000.0, "min": 1000.0, "max": 1000.0}
    row = {"mode": "batch16", "len": 4096, "direct": side, "tap": side,
           "ratio": 0.598, "ratio_min": 0.5949, "ratio_max": 0.6}  # fmt: skip
    report = {"results": [row], "tap_process": [], "repeats": 1}
    line = render_tap_bench(report, elapsed=1.0).splitlines()[1]
    assert line.endswith(" 59% (59%-60%)  below 60%"), line
    assert percent(0.6) == "60%" and percent(0.29) == "29%" and percent(1.0) == "100%"


def test_the_pair_bench_says_what_each_daemon_spent(capsys) -> None:
    results = run_cells([("ack", 4096, 0, 50), ("batch64", 4096, 128, 128)])
    for r in results:
        # both sides worked for every pair: neither figure can be nothing
        assert r["cpu_us"] > 0 and r["peer_cpu_us"] > 0
    text = render_pair_bench(results, floors=False, elapsed=1.0)
    assert "fe cpu  be cpu" in text.splitlines()[0]
    row = text.splitlines()[2].split()
    assert row[:3] == ["batch64", "4K", "128"]
    assert row[-2:] == [f"{results[1]['peer_cpu_us']:.0f}", f"{results[1]['cpu_us']:.0f}"]


@pytest.mark.parametrize(("most", "size"), [(0, 512 << 20), (65_536, 512 << 20),
                                             (262_144, (512 + 128 + 512) << 20)])  # fmt: skip
def test_region_zero_grows_with_the_mappings_a_bench_keeps_in_place(most, size) -> None:
    assert _region_for(most) == size


def test_the_pair_bench_weighs_the_front_end_with_its_mappings_in_place() -> None:
    """The front-end's RSS after each cell, and what a mapping kept in place adds to it."""
    results = run_cells([("ack", 4096, 0, 20), ("ack", 4096, 4096, 20)], watch=frontend_rss)
    assert all(r["fe_rss"] > 0 for r in results)
    (none, empty, each0), (n, full, each) = rss_per_mapping(results)
    assert (none, each0, n) == (0, None, 4096)
    assert empty == results[0]["fe_rss"] and full == results[1]["fe_rss"]
    assert each == (full - empty) / 4096
    text = render_pair_bench(results, floors=False, elapsed=1.0)
    assert "front-end RSS: " in text and "with 4,096 mappings (" in text


def test_the_floors_figures_are_read_per_side() -> None:
    """shmem_floor's MEDIAN line gives pairs/s and each side's CPU; the report holds each
    of our daemons against the C side in its place."""
    line = ("MEDIAN  mode=ack+B  len=4096  touch=0 n=5000  secs=  0.132 pairs/s=    37968 "
            "us/pair=  26.338  cpu_us/pair: be=3.15+22.78 fe=1.58+24.46 (user+sys)")  # fmt: skip
    m = _FLOOR_LINE.search(line)
    assert m is not None and m[1] == "37968"
    assert [float(g) for g in m.groups()[1:]] == [3.15, 22.78, 1.58, 24.46]
    row = {"mode": "ack", "len": 4096, "existing": 0, "pairs": 100, "pairs_per_s": 3797.0,
           "p50_us": 1.0, "p99_us": 2.0, "cpu_us": 259.3, "peer_cpu_us": 260.4,
           "floor_spinning_pairs_per_s": 37968.0, "floor_spinning_ratio": 10.0,
           "floor_spinning_fe_cpu_us": 26.04, "floor_spinning_be_cpu_us": 25.93}  # fmt: skip
    text = render_pair_bench([row], floors=True, elapsed=1.0)
    assert "front-end 260 / 26 us = 10.0x" in text and "backend_sim 259 / 26 us = 10.0x" in text
    assert "37968" in text.splitlines()[1]


BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_the_hot_path_script_says_what_each_side_costs() -> None:
    out = subprocess.run([sys.executable, str(BENCH / "hot_path.py"), "50"], check=True,
                         capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    assert "us CPU per map+unmap pair, both sides, 50 pairs: front-end " in out
    assert " us, device " in out


def test_the_tap_hot_path_script_relays_clean_traffic_and_says_what_a_hop_costs() -> None:
    out = subprocess.run([sys.executable, str(BENCH / "tap_hot_path.py"), "50"], check=True,
                         capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    assert "us CPU per map+unmap pair, 50 pairs: tap " in out
    # the tap judged what it relayed, and found a well-behaved pair well-behaved
    assert out.rstrip().endswith("violations seen: 0"), out


@pytest.mark.parametrize("daemon", ["frontend", "tap"])
def test_the_soak_watches_either_daemons_fds(daemon: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "soak.py"), "--daemon", daemon, "--maps", "256",
         "--every", "128", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    report = json.loads(done.stdout)
    assert report["daemon"] == daemon and len(report["samples"]) == 2
    assert report["flat"] is True and done.returncode == 0
    assert all(s["fds"] > 0 and s["rss"] > 0 for s in report["samples"])
    assert report["samples"][-1]["maps"] >= 256


def test_a_daemons_sample_counts_control_connections_apart() -> None:
    """A control connection open while the fds are read is the reader's, not the maps':
    it is counted apart, so that a status asked a moment before is not taken for a leak."""
    samples = []

    def watch(pair, paths, results) -> None:
        if results:
            samples.append(daemon_sample(pair, paths, "frontend"))
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(paths.control("frontend")))
                assert client.recv(4096).startswith(b'{"QMP"')  # accepted: the daemon holds it
                samples.append(daemon_sample(pair, paths, "frontend"))

    run_cells([("ack", 4096, 0, 20)], watch=watch)
    quiet, asked = samples
    assert asked["control"] >= 1  # ours, at least (the launch's may not be closed yet)

    def own(sample: dict) -> int:
        return sample["fds"] - sample["in_flight"] - sample["control"]

    assert own(asked) == own(quiet)
