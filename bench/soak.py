"""Does a daemon keep what passes through it? Many SHMEM_MAPs (and their unmaps) go from
backend_sim to the front-end, directly or through `shmemctl tap`; every N maps the
watched daemon's open fds (/proc/PID/fd) and RSS are read. Each map carries a memfd that
the tap passes on and closes, and that the front-end maps and closes: the fd count has
to stay flat. Exit 1 if it does not.

    python bench/soak.py [--daemon tap|frontend] [--maps N] [--every N] [--mode M] [--json]

The tap is watched over 100,000 maps by default, the front-end over 1,000,000. A sample
is taken as each bench step's last unmap is answered; the next step may have begun, so one
map's fd may be on its way: it is counted apart ("in flight").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from shmemctl.bench import MODES, daemon_sample, run_cells
from shmemctl.pair import Launched
from shmemctl.rundir import PairPaths
from shmemctl.sizes import mib

MAPS = {"tap": 100_000, "frontend": 1_000_000}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--daemon", choices=list(MAPS), default="tap", help="whose fds to watch")
    parser.add_argument("--maps", type=int, help="maps to pass at least (default: by daemon)")
    parser.add_argument("--every", type=int, help="maps between samples (default: a 20th)")
    parser.add_argument("--mode", choices=MODES, default="batch64", help="how maps are acked")
    parser.add_argument("--json", action="store_true", help="print the samples as JSON")
    args = parser.parse_args()
    maps = args.maps or MAPS[args.daemon]
    every = args.every or max(1, maps // 20)

    steps = math.ceil(maps / every)
    samples: list[dict[str, Any]] = []

    def sample(pair: Launched, paths: PairPaths, results: list[dict[str, Any]]) -> None:
        # after each step: before the first, a daemon may still be closing what setting
        # the pair up used (a control connection that asked whether it was up)
        if results:
            samples.append(daemon_sample(pair, paths, args.daemon))

    # a generous limit: the maps are many and the machine may be busy
    run_cells([(args.mode, 4096, 0, every)] * steps, tap=args.daemon == "tap", timeout=3600,
              watch=sample)  # fmt: skip
    # what the daemon holds of its own: a map's fd passing through is not kept, and a
    # control connection (the status each sample asks) is the reader's, not the maps'
    own = [s["fds"] - s["in_flight"] - s["control"] for s in samples]
    first, last = samples[0], samples[-1]
    flat = len(set(own)) == 1 and last["in_flight"] == 0
    if args.json:
        print(json.dumps({"daemon": args.daemon, "samples": samples, "flat": flat}))
    else:
        print(f"{'maps':>9} {'fds':>4} {'in flight':>9} {'control':>7} {'RSS':>7}")
        for s in samples:
            print(f"{s['maps']:>9,} {s['fds']:>4} {s['in_flight']:>9} {s['control']:>7} "
                  f"{mib(s['rss']):>7}")  # fmt: skip
        verdict = "flat" if flat else "NOT flat"
        print(
            f"{args.daemon} fds {own[0]} -> {own[-1]} over {last['maps']:,} maps (min "
            f"{min(own)}, max {max(own)}, a map's fd in flight and control connections "
            f"apart: {verdict}; "
            f"{last['in_flight']} in flight at the end); RSS {mib(first['rss'])} -> "
            f"{mib(last['rss'])} ({len(samples)} samples, one every {every:,} maps and a "
            "tenth more for each step's warm-up)"
        )
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
