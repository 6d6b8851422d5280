"""How long one Prometheus scrape of `shmemctl metrics` takes with many mappings in place.

A pair is started whose backend_sim fills region 0 with EXISTING 4 KiB mappings (the
bench layout of shmemctl.bench), then the exposition is made ROUNDS times in this
process (what a scrape of a running `metrics --listen` costs) and once more as a
whole `shmemctl metrics --once` (with the interpreter's start). Prints each figure's
median and spread; no figure is judged.

    python bench/metrics_scrape.py [--existing 65536] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client import generate_latest

from shmemctl.bench_layout import bench_span, churn_base
from shmemctl.pair import launch
from shmemctl.rundir import DEFAULT_NAME, PairPaths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--existing", type=int, default=65_536, help="mappings in place")
    parser.add_argument("--rounds", type=int, default=5, help="scrapes to time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shmemctl-scrape-") as run:
        os.environ["SHMEMCTL_RUN_DIR"] = run
        from shmemctl.metrics import registry  # reads the run directory at each scrape

        paths = PairPaths(Path(run) / DEFAULT_NAME)
        paths.dir.mkdir()
        script = Path(run) / "fill"
        # one timed pair after the fill: the bench line says when every mapping is there
        script.write_text(f"bench ack 4096 {args.existing} 1\n")
        region = bench_span(churn_base(args.existing), args.existing)
        launched = launch(
            paths, timeout=600, backend_stdout=subprocess.PIPE,
            backend_args=["--regions", f"0={region}", "--script", str(script)],
        )  # fmt: skip
        try:
            assert launched.backend.stdout is not None
            launched.backend.stdout.readline()  # the fill is done
            samples, size = [], 0
            for _ in range(args.rounds):
                start = time.perf_counter()
                size = len(generate_latest(registry()))
                samples.append(time.perf_counter() - start)
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "shmemctl", "metrics", "--once"], check=True,
                           stdout=subprocess.DEVNULL)  # fmt: skip
            whole = time.perf_counter() - start
        finally:
            launched.stop()
    print(f"{args.existing} mappings in place, exposition {size} bytes")
    print(f"scrape in a running exporter: median {statistics.median(samples) * 1000:.0f} ms, "
          f"min {min(samples) * 1000:.0f}, max {max(samples) * 1000:.0f} "
          f"({args.rounds} rounds)")  # fmt: skip
    print(f"`shmemctl metrics --once`, interpreter start included: {whole * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
