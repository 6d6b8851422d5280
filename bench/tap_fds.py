"""Does the tap keep what it forwards? 100,000 SHMEM_MAPs (and their unmaps) pass through
`shmemctl tap` between backend_sim and the front-end; every N maps the tap's open fds
(/proc/PID/fd) and RSS are read. Each map carries a memfd the tap receives, passes on and
must close: its fd count has to stay flat. Exit 1 if it does not.

    python bench/tap_fds.py [--maps 100000] [--every 5000] [--mode batch64] [--json]

A sample is taken as a bench step's last unmap is answered; the next step may have begun,
so one map's fd may be on its way through the tap: it is counted apart ("in flight").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from shmemctl.bench import MODES, run_cells, tap_sample
from shmemctl.pair import Launched
from shmemctl.rundir import PairPaths
from shmemctl.sizes import mib


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--maps", type=int, default=100_000, help="maps to forward at least")
    parser.add_argument("--every", type=int, default=5000, help="maps between samples")
    parser.add_argument("--mode", choices=MODES, default="batch64", help="how maps are acked")
    parser.add_argument("--json", action="store_true", help="print the samples as JSON")
    args = parser.parse_args()

    steps = math.ceil(args.maps / args.every)
    samples: list[dict[str, Any]] = []

    def sample(pair: Launched, paths: PairPaths, _results: list[dict[str, Any]]) -> None:
        samples.append(tap_sample(pair, paths))

    # a generous limit: the maps are many and the machine may be busy
    run_cells([(args.mode, 4096, 0, args.every)] * steps, tap=True, timeout=3600, watch=sample)
    # what the tap holds of its own: a map's fd passing through is not kept
    own = [s["fds"] - s["in_flight"] for s in samples]
    first, last = samples[0], samples[-1]
    flat = len(set(own)) == 1 and last["in_flight"] == 0
    if args.json:
        print(json.dumps({"samples": samples, "flat": flat}))
    else:
        print(f"{'maps':>9} {'fds':>4} {'in flight':>9} {'RSS':>7}")
        for s in samples:
            print(f"{s['maps']:>9,} {s['fds']:>4} {s['in_flight']:>9} {mib(s['rss']):>7}")
        verdict = "flat" if flat else "NOT flat"
        print(
            f"tap fds {own[0]} -> {own[-1]} over {last['maps']:,} maps (min {min(own)}, "
            f"max {max(own)}, a map's fd in flight apart: {verdict}; {last['in_flight']} in "
            f"flight at the end); RSS {mib(first['rss'])} -> {mib(last['rss'])} "
            f"({len(samples)} samples, one every {args.every:,} maps and a tenth more for "
            "each step's warm-up)"
        )
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
