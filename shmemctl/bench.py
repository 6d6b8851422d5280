"""`shmemctl bench`: map+unmap round trips between the real daemons, and the codec alone.

The pair bench starts backend_sim and the front-end as processes over a real
socket and hands backend_sim `bench` script lines, so every pair goes
through the same BackendChannel, channel, codec and RegionTable as always.
For batched modes a pair's latency is its batch's time divided by the batch
size (one ack confirms the whole batch).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

import click

from .pair import PairError, launch
from .rundir import PairPaths
from .sizes import human_size

MODES = ("ack", "batch16", "batch64")
LENS = (4096, 2 << 20)
EXISTING = (0, 1000, 65_536)


def _cells(quick: bool) -> list[tuple[str, int, int, int]]:
    cells = []
    for existing in EXISTING:  # ascending: backend_sim only grows the existing mappings
        for length in LENS:
            for mode in MODES:
                pairs = (
                    (400 if mode == "ack" else 1024)
                    if quick
                    else (6000 if mode == "ack" else 16384)
                )
                cells.append((mode, length, existing, pairs))
    return cells


def run_pair_bench(quick: bool = False, timeout: float = 600.0) -> list[dict[str, Any]]:
    """Run every cell in one pair of daemons; return one result dict per cell."""
    cells = _cells(quick)
    with tempfile.TemporaryDirectory(prefix="shmemctl-bench-") as tmp:
        paths = PairPaths(Path(tmp))
        script = Path(tmp, "bench.txt")
        script.write_text("".join(f"bench {m} {n} {e} {p}\n" for m, n, e, p in cells))
        # 512M: the 128M churn window with 65,536 existing 4K pages around it
        try:
            pair = launch(paths, backend_args=["--regions", "0=512M", "--script", str(script)],
                          backend_stdout=subprocess.PIPE, timeout=60)  # fmt: skip
        except PairError as exc:
            raise click.ClickException(str(exc)) from None
        try:
            results = []
            assert pair.backend.stdout is not None
            end = time.monotonic() + timeout
            for line in pair.backend.stdout:
                _step, _, outcome = line.partition(": ")
                try:
                    results.append(json.loads(outcome))
                except json.JSONDecodeError:
                    raise click.ClickException(f"bench step failed: {line.strip()}") from None
                if len(results) == len(cells) or time.monotonic() > end:
                    break
            if len(results) != len(cells):
                if time.monotonic() > end:
                    # not a failure of the pair: the machine is too busy for the time allowed
                    raise click.ClickException(
                        f"bench ran out of time: {len(results)} of {len(cells)} cells in "
                        f"{timeout:g}s; is the machine busy? (try again when it is idler)"
                    )
                tail = paths.logfile("frontend").read_text()[-2000:]
                raise click.ClickException(f"bench ended early after {len(results)} cells\n{tail}")
            return results
        finally:
            pair.stop()


def run_floor(source: Path, quick: bool) -> dict[tuple[str, int], float]:
    """Build and run the C floor for the same modes; pairs/s by (mode, len)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise click.ClickException("no C compiler to build the floor (apt-get install gcc)")
    out: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        binary = os.path.join(tmp, "shmem_floor")
        subprocess.run([cc, "-O2", "-o", binary, str(source)], check=True)
        for mode in MODES:
            arg = "ack" if mode == "ack" else f"batch:{mode.removeprefix('batch')}"
            for length in LENS:
                n = "5000" if quick else "40000"
                proc = subprocess.run(
                    [binary, "-m", arg, "-l", str(length), "-n", n, "-r", "3"],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                m = re.search(r"MEDIAN.*pairs/s=\s*(\d+)", proc.stdout)
                if m:
                    out[(mode, length)] = float(m[1])
    return out


def pair_bench(*, as_json: bool, quick: bool, floor: Path | None = None) -> None:
    started = time.monotonic()
    results = run_pair_bench(quick)
    floors = run_floor(floor, quick) if floor else {}
    base = {(r["mode"], r["len"]): r["pairs_per_s"] for r in results if r["existing"] == 0}
    for r in results:
        r["cost_vs_empty"] = round(1 - r["pairs_per_s"] / base[(r["mode"], r["len"])], 3)
        f = floors.get((r["mode"], r["len"]))
        if f:
            r["floor_pairs_per_s"] = f
            r["floor_ratio"] = round(f / r["pairs_per_s"], 2)
    if as_json:
        click.echo(json.dumps({"results": results}))
        return
    header = (
        f"{'mode':8} {'len':>5} {'existing':>8} {'pairs/s':>9} {'p50 us':>8} {'p99 us':>8}"
        f" {'cost':>7}"
    )
    if floors:
        header += f" {'floor/us':>8}"
    # cost: how much slower than the same mode and length with no existing mappings
    click.echo(header)
    for r in results:
        line = (
            f"{r['mode']:8} {human_size(r['len']):>5} {r['existing']:>8} {r['pairs_per_s']:>9.0f} "
            f"{r['p50_us']:>8.1f} {r['p99_us']:>8.1f} {r['cost_vs_empty']:>+7.1%}"
        )
        if "floor_ratio" in r:
            line += f" {r['floor_ratio']:>7.2f}x"
        click.echo(line)
    click.echo(
        f"({time.monotonic() - started:.0f}s; cost = slowdown against the same cell with no "
        "existing mappings; batched latency = batch time / batch size"
        + ("; floor/us = the C floor's pairs/s over ours" if floors else "")
        + ")"
    )


def codec_bench(as_json: bool) -> None:
    """What one SHMEM_MAP costs to parse and build: construct, compiled construct, struct."""
    from .wire import BackendReq, ChannelKind, ShmemMap, decode_body, decode_header
    from .wire import structs as S
    from .wire.messages import encode_shmem_request

    m = ShmemMap(1, 0x10000, 0x4000, 0, 1)
    raw = encode_shmem_request(BackendReq.SHMEM_MAP, m, need_reply=True)
    head, body = raw[:12], raw[12:]
    compiled_header = S.Header.compile()
    compiled_mmap = S.VhostUserMMap.compile()
    cases = {
        "construct parse": lambda: (S.Header.parse(head), S.VhostUserMMap.parse(body)),
        "construct compiled parse": lambda: (
            compiled_header.parse(head),
            compiled_mmap.parse(body),
        ),
        "struct parse": lambda: (S.HEADER.unpack(head), S.MMAP_STRUCT.unpack(body)),
        "shmemctl decode (struct + checks + typed message)": lambda: decode_body(
            ChannelKind.BACKEND, decode_header(head, replies=False), body
        ),
        "construct build": lambda: S.VhostUserMMap.build(
            {"shmid": 1, "fd_offset": 0, "shm_offset": 0x10000, "len": 0x4000, "flags": 1}
        ),
        "shmemctl encode (one struct pack)": lambda: encode_shmem_request(
            BackendReq.SHMEM_MAP, m, need_reply=True
        ),
    }
    results = {}
    for name, fn in cases.items():
        n = 20000
        best = min(timeit.repeat(fn, number=n, repeat=3)) / n
        results[name] = round(best * 1e6, 3)
    if as_json:
        click.echo(json.dumps({"codec_us": results}))
        return
    for name, us in results.items():
        click.echo(f"{us:9.3f} us  {name}")
