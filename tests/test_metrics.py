"""`shmemctl metrics`: the host's pairs and taps scraped over real HTTP while a scenario
runs, parsed by prometheus-client's own parser, held against the daemons' own status."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import PATIENCE, wait_until
from .test_cli_pair import Shell
from .test_tap import start_pair

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, by name and labels (the parser refuses what the
    format does not allow)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def host(spawn, tmp_path) -> Iterator[Shell]:
    """A pair "default" running the blobs scenario and a tap "t" watching another pair,
    both in the test's run directory; and a stale name whose control socket nobody
    serves."""
    sh = Shell(str(tmp_path / "run"))
    done = sh("up", "--regions", "0=8M,2=64K", "--scenario", "blobs", "--timeout", str(PATIENCE))
    assert done.returncode == 0, done.stderr
    start_pair(spawn, tmp_path, "listen", "connect")
    stale = tmp_path / "run" / "gone"
    stale.mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(stale / "frontend.ctl"))  # bound, never listening: nobody answers
    try:
        yield sh
    finally:
        dead.close()
        sh("down")


def test_a_scrape_says_what_the_daemons_say(host, tmp_path) -> None:
    sh = host
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "shmemctl", "metrics", "--listen", f"127.0.0.1:{port}"],
        env=sh.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/metrics"

    def scrape() -> Samples | None:
        try:
            with urllib.request.urlopen(url, timeout=PATIENCE) as answer:
                assert answer.headers["Content-Type"].startswith("text/plain")
                return parse(answer.read().decode())
        except OSError:
            return None  # not serving yet

    try:
        first = wait_until(scrape, what="the first scrape")
        assert isinstance(first, dict)
        for role in ("frontend", "backend"):
            assert value(first, "shmemctl_up", pair="default", role=role) == 1
            assert value(first, "shmemctl_connected", pair="default", role=role) == 1
        assert value(first, "shmemctl_up", pair="t", role="tap") == 1
        assert value(first, "shmemctl_state", pair="t", role="tap", state="relaying") == 1
        assert value(first, "shmemctl_proc_verdict", pair="t", role="tap", verdict="agree") == 1
        assert value(first, "shmemctl_up", pair="gone", role="frontend") == 0
        # the scenario maps and unmaps meanwhile: the counters only go up
        maps = value(first, "shmemctl_frontend_maps_total", pair="default")
        assert maps is not None
        later = wait_until(lambda: (s := scrape()) and
                           (value(s, "shmemctl_frontend_maps_total", pair="default") or 0) > maps
                           and s, what="more maps")  # fmt: skip
        assert isinstance(later, dict)
        # stopped, the pair's own status and a scrape agree exactly
        assert sh("scenario", "stop").returncode == 0
        assert sh("map", "2", "0", "4K").returncode == 0  # region 2: the scenario's is 0
        assert sh("map", "2", "0", "4K").returncode == 1  # refused: EEXIST
        status = sh("status", "--json")
        assert status.returncode == 0, status.stderr
        now = scrape()
        assert now is not None
        views = json.loads(status.stdout)
        fe = views["frontend"]
        for region in fe["regions"]:
            shmid = str(region["shmid"])
            labels = {"pair": "default", "role": "frontend", "shmid": shmid}
            assert value(now, "shmemctl_region_mappings", **labels) == region["count"]
            assert value(now, "shmemctl_region_mapped_bytes", **labels) == region["mapped_bytes"]
            assert value(now, "shmemctl_region_size_bytes", **labels) == region["size"]
        for key in ("maps", "unmaps", "refused", "resets", "connections"):
            assert value(now, f"shmemctl_frontend_{key}_total", pair="default") == (
                fe["counters"][key])  # fmt: skip
        assert fe["refusals"]["EEXIST"] >= 1
        for errno, count in fe["refusals"].items():
            assert value(now, "shmemctl_frontend_refusals_total", pair="default",
                         errno=errno) == count  # fmt: skip
        # every acked map and unmap, timed from the request read to the answer sent
        latency = fe["ack_latency"]
        assert latency["count"] >= fe["counters"]["maps"] > 0
        assert value(now, "shmemctl_frontend_ack_seconds_count", pair="default") == (
            latency["count"])  # fmt: skip
        assert value(now, "shmemctl_frontend_ack_seconds_sum", pair="default") == pytest.approx(
            latency["sum"])  # fmt: skip
        counts = [value(now, "shmemctl_frontend_ack_seconds_bucket", pair="default",
                        le=le) for le in ("1e-05", "0.001", "1.0", "+Inf")]  # fmt: skip
        assert counts == sorted(counts) and counts[-1] == latency["count"]
        # the tapped pair's two processes, as the tap found them by SO_PEERCRED
        for side in ("front-end", "back-end"):
            labels = {"pair": "t", "role": "tap", "process": side}
            assert (value(now, "shmemctl_process_open_fds", **labels) or 0) > 0
            assert (value(now, "shmemctl_process_resident_memory_bytes", **labels) or 0) > 0
    finally:
        server.terminate()
        server.wait(PATIENCE)


def test_once_prints_one_exposition_and_a_bad_address_is_refused(host) -> None:
    sh = host
    done = sh("metrics", "--once")
    assert done.returncode == 0, done.stderr
    samples = parse(done.stdout)
    assert value(samples, "shmemctl_up", pair="default", role="frontend") == 1
    done = sh("metrics", "--listen", "nowhere")
    assert done.returncode == 2
    assert "write HOST:PORT" in done.stderr
