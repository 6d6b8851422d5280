"""`shmemctl bench`: map+unmap round trips between the real daemons, and the codec alone.

The pair bench starts backend_sim and the front-end as processes over a real
socket and hands backend_sim `bench` script lines, so every pair goes
through the same BackendChannel, channel, codec and RegionTable as always.
For batched modes a pair's latency is its batch's time divided by the batch
size (one ack confirms the whole batch).

With --tap the same cells run through `shmemctl tap` (the front-end connects to the
tap, the tap to backend_sim) and without it, in alternating order, several times: the
machine is noisy, so each figure is a median with its range, and the tap's cost is the
ratio of the two. The tap's open fds and RSS are read from /proc before and after each
run through it. With --floor bench/relay_floor.c (or its Python twin, .py), a third run
of each cell goes through that relay in the tap's place: it frames and forwards as the
tap does and checks nothing, so what it keeps of the direct figure is what any relay
(written in that language) keeps on the machine.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import psutil

from .bench_layout import bench_span, churn_base
from .channel import DEFAULT_BUSY_POLL
from .daemon import cpu_seconds
from .pair import Launched, PairError, daemon_status, launch
from .rundir import PairPaths
from .sizes import human_size, mib

MODES = ("ack", "batch16", "batch64")
LENS = (4096, 2 << 20)
EXISTING = (0, 1000, 65_536)


#: below this share of the direct run's pairs/s, the tap costs more than it should
TAP_TARGET = 0.6

Cell = tuple[str, int, int, int]  # mode, len, existing, pairs


def _cells(
    quick: bool, existing_counts: Sequence[int] = EXISTING, lens: Sequence[int] = LENS
) -> list[Cell]:
    cells = []
    for existing in existing_counts:  # ascending: backend_sim only grows the existing mappings
        for length in lens:
            for mode in MODES:
                pairs = (
                    (400 if mode == "ack" else 1024)
                    if quick
                    else (6000 if mode == "ack" else 16384)
                )
                cells.append((mode, length, existing, pairs))
    return cells


def run_pair_bench(
    quick: bool = False, timeout: float = 600.0, existing: Sequence[int] = EXISTING
) -> list[dict[str, Any]]:
    """Run every cell in one pair of daemons; return one result dict per cell, with the
    front-end's RSS once the cell is done (`frontend_rss`)."""
    return run_cells(_cells(quick, sorted(existing)), timeout=timeout, watch=frontend_rss)


def frontend_rss(pair: Launched, _paths: PairPaths, results: list[dict[str, Any]]) -> None:
    """A `Watch`: the front-end's RSS into the result of the cell just done, its existing
    mappings still in place (backend_sim only grows them)."""
    if results:
        with contextlib.suppress(psutil.NoSuchProcess):  # gone: the bench says it ended
            results[-1]["fe_rss"] = psutil.Process(pair.frontend.pid).memory_info().rss


def rss_per_mapping(results: Sequence[dict[str, Any]]) -> list[tuple[int, int, float | None]]:
    """(existing mappings, the front-end's RSS after their last cell, bytes of RSS a
    mapping against the cells without any) for each count of existing mappings."""
    last: dict[int, int] = {}
    for r in results:
        if "fe_rss" in r:
            last[r["existing"]] = r["fe_rss"]
    empty = last.get(0)
    return [
        (n, rss, (rss - empty) / n if n and empty is not None else None)
        for n, rss in sorted(last.items())
    ]


def _region_for(most: int) -> int:
    """Region 0's size for a bench whose largest EXISTING is `most`: at least 512 MiB,
    more when the existing 4 KiB mappings need it."""
    return max(512 << 20, bench_span(churn_base(most), most))


#: called once the pair is connected (no results yet) and after each cell's result
Watch = Callable[[Launched, PairPaths, list[dict[str, Any]]], None]


def run_cells(
    cells: Sequence[Cell],
    *,
    tap: bool = False,
    timeout: float = 600.0,
    watch: Watch | None = None,
    relay: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Run `cells` as backend_sim's script in one pair, through a tap if `tap` (the relay
    floor that the command `relay` runs, in its place, if given); one result dict per
    cell."""
    with tempfile.TemporaryDirectory(prefix="shmemctl-bench-") as tmp:
        paths = PairPaths(Path(tmp))
        script = Path(tmp, "bench.txt")
        script.write_text("".join(f"bench {m} {n} {e} {p}\n" for m, n, e, p in cells))
        # the 128M churn window with the existing 4K pages around it
        most = max((existing for _m, _n, existing, _p in cells), default=0)
        regions = f"0={_region_for(most)}"
        # the front-end's default limits stop at 131,072 mappings a region
        limits = ["--max-mappings", str(most + 1024), "--max-mappings-per-region",
                  str(most + 1024)] if most + 1024 > 131_072 else []  # fmt: skip
        try:
            pair = launch(paths, backend_args=["--regions", regions, "--script", str(script)],
                          frontend_args=limits, backend_stdout=subprocess.PIPE, timeout=60,
                          tap=tap, relay=_relay_command(relay))  # fmt: skip
        except PairError as exc:
            raise click.ClickException(str(exc)) from None
        try:
            results: list[dict[str, Any]] = []
            if watch is not None:
                watch(pair, paths, results)
            assert pair.backend.stdout is not None
            end = time.monotonic() + timeout
            for line in pair.backend.stdout:
                _step, _, outcome = line.partition(": ")
                try:
                    results.append(json.loads(outcome))
                except json.JSONDecodeError:
                    raise click.ClickException(f"bench step failed: {line.strip()}") from None
                if watch is not None:
                    watch(pair, paths, results)
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


def _relay_command(relay: list[str] | None) -> list[str] | None:
    """How a relay floor is started, waiting as our daemons do (its sockets follow)."""
    return None if relay is None else [*relay, "-B", str(SPIN_US)]


def daemon_sample(pair: Launched, paths: PairPaths, role: str = "tap") -> dict[str, Any]:
    """A daemon's open fds (/proc/PID/fd), how many of them are a SHMEM_MAP's memfd on its
    way through (at most one per direction while maps pass; none once they stopped),
    its RSS and CPU time so far, and how many maps it has handled (its own count).
    `role`: "tap", which forwards each memfd, or "frontend", which maps it."""
    proc = pair.tap if role == "tap" else pair.frontend
    assert proc is not None
    pid = proc.pid
    fd_dir = f"/proc/{pid}/fd"
    fds = in_flight = control = 0
    # control connections are sockets bound to the control path (the listener too):
    # one that a client closed may still be open until the daemon's thread sees it
    at_control = _sockets_at(str(paths.control(role)))
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except FileNotFoundError:  # closed since the listing: a passing fd
            continue
        fds += 1
        in_flight += target.startswith("/memfd:")
        control += target.startswith("socket:[") and target[8:-1] in at_control
    rss = psutil.Process(pid).memory_info().rss
    # read after /proc: the control connection is one more fd of the daemon while it lasts
    status = daemon_status(paths, role)
    maps = None
    if status is not None:
        counters = status["counters"]
        maps = counters["backend"]["back-end"]["fds"] if role == "tap" else counters["maps"]
    return {"fds": fds, "in_flight": in_flight, "control": max(0, control - 1), "rss": rss,
            "maps": maps, "cpu_s": round(cpu_seconds(pid), 6)}  # fmt: skip


def _sockets_at(path: str) -> set[str]:
    """Inodes of the Unix sockets bound to `path`: its listener and the connections it
    accepted (/proc/net/unix names them all by the path)."""
    with open("/proc/net/unix") as table:
        next(table)  # the heading
        return {
            fields[6] for line in table if len(fields := line.split()) > 7 and fields[7] == path
        }


def _spread(values: list[float]) -> dict[str, Any]:
    """Median and range of one side's pairs/s; spread is the range over the median."""
    median = statistics.median(values)
    low, high = min(values), max(values)
    spread = round((high - low) / median, 3) if median else None
    return {"runs": values, "median": round(median, 1), "min": low, "max": high, "spread": spread}


def run_tap_bench(
    quick: bool = False,
    repeats: int | None = None,
    timeout: float = 600.0,
    floor: Path | None = None,
) -> dict[str, Any]:
    """Each cell directly and through the tap, `repeats` times in turn (a slow spell of
    the machine does not fall on one side only); per cell both figures' median and range
    and the ratio tap / direct, and the tap's fds and RSS before and after each run
    through it. With `floor` (relay_floor.c, or relay_floor.py: the same in Python),
    each cell through that relay too, in the tap's place: what a relay that checks
    nothing keeps of the direct figure."""
    if repeats is None:
        repeats = 3 if quick else 5
    cells = _cells(quick, existing_counts=(0,), lens=(4096,) if quick else LENS)
    if not quick:
        # half a full cell: twice `repeats` runs of every cell fit in about ten minutes of a
        # busy machine
        cells = [(mode, length, existing, pairs // 2) for mode, length, existing, pairs in cells]
    sides = ("direct", "tap", "floor") if floor is not None else ("direct", "tap")
    runs: dict[str, list[list[dict[str, Any]]]] = {side: [] for side in sides}
    process: list[dict[str, Any]] = []

    def before_and_after(pair: Launched, paths: PairPaths, results: list[dict[str, Any]]) -> None:
        if not results:
            process.append({"before": daemon_sample(pair, paths)})
        elif len(results) == len(cells):
            process[-1]["after"] = daemon_sample(pair, paths)

    with tempfile.TemporaryDirectory() as tmp:
        relay = None if floor is None else _built(floor, Path(tmp))
        for repeat in range(repeats):
            for side in sides[repeat % len(sides) :] + sides[: repeat % len(sides)]:
                watch = before_and_after if side == "tap" else None
                through = relay if side == "floor" else None
                result = run_cells(cells, tap=side != "direct", timeout=timeout, watch=watch,
                                   relay=through)  # fmt: skip
                runs[side].append(result)
    results = []
    for i, (mode, length, _existing, _pairs) in enumerate(cells):
        figures = {side: [run[i]["pairs_per_s"] for run in runs[side]] for side in sides}
        direct = figures["direct"]
        row: dict[str, Any] = {"mode": mode, "len": length, "pairs": runs["direct"][0][i]["pairs"],
                               "direct": _spread(direct)}  # fmt: skip
        for side, prefix in (("tap", "ratio"), ("floor", "floor_ratio")):
            if side not in figures:
                continue
            # each run against the direct run of the same repeat, beside it in time
            paired = [t / d for t, d in zip(figures[side], direct, strict=True)]
            row[side] = _spread(figures[side])
            row[prefix] = round(row[side]["median"] / row["direct"]["median"], 3)
            row[f"{prefix}_min"] = round(min(paired), 3)
            row[f"{prefix}_max"] = round(max(paired), 3)
        results.append(row)
    return {"results": results, "repeats": repeats, "target_ratio": TAP_TARGET,
            "tap_process": process}  # fmt: skip


def tap_bench(
    *, as_json: bool, quick: bool, repeats: int | None = None, floor: Path | None = None
) -> None:
    started = time.monotonic()
    report = run_tap_bench(quick, repeats, floor=floor)
    if as_json:
        click.echo(json.dumps(report))
    else:
        click.echo(render_tap_bench(report, time.monotonic() - started))


def percent(share: float) -> str:
    """`share` in whole percent, rounded down: 59.8% against a target of 60% reads 59%,
    never the target it missed."""
    return f"{math.floor(share * 100 + 1e-9)}%"


def render_tap_bench(report: dict[str, Any], elapsed: float) -> str:
    """The tap bench's report as a table, then the tap's fds and RSS per run."""

    def figure(side: dict[str, Any]) -> str:
        span = f"({side['min']:.0f}-{side['max']:.0f})"
        return f"{side['median']:>8.0f} {span:<15}"

    def ratio(r: dict[str, Any], prefix: str) -> str:
        low, high = percent(r[f"{prefix}_min"]), percent(r[f"{prefix}_max"])
        return f"{percent(r[prefix]):>10} ({low}-{high})"

    floor = any("floor" in r for r in report["results"])
    heading = (
        f"{'mode':8} {'len':>5} {'direct':>8} {'(min-max)':<15} {'tap':>8} {'(min-max)':<15}"
        " tap/direct (min-max)"
    )
    if floor:
        heading += f"  {'floor':>8} {'(min-max)':<15} floor/direct (min-max)"
    lines = [heading]
    for r in report["results"]:
        below = "" if r["ratio"] >= TAP_TARGET else f"  below {TAP_TARGET:.0%}"
        line = f"{r['mode']:8} {human_size(r['len']):>5} {figure(r['direct'])} {figure(r['tap'])}"
        line += ratio(r, "ratio")
        if floor:
            line += f"  {figure(r['floor'])}{ratio(r, 'floor_ratio')}"
        lines.append(line + below)
    for n, run in enumerate(report["tap_process"], 1):
        before, after = run["before"], run["after"]
        maps = after["maps"] - before["maps"]
        cpu_us = (after["cpu_s"] - before["cpu_s"]) / maps * 1e6 if maps else 0.0
        lines.append(
            f"tap run {n}: fds {before['fds']} -> {after['fds']} over {after['maps']:,} maps "
            f"(a map's fd in flight among them: {before['in_flight']} -> {after['in_flight']}), "
            f"RSS {mib(before['rss'])} -> {mib(after['rss'])}, CPU {cpu_us:.0f} us per map+unmap"
        )
    lines.append(
        f"({elapsed:.0f}s; pairs/s: median (min-max) of {report['repeats']} runs each, direct and "
        "through the tap in turn; tap/direct: of the medians, and (min-max) of "
        f"each tap run over the direct run beside it; target: tap >= {TAP_TARGET:.0%} of direct)"
    )
    if floor:
        lines.append(
            "(floor: relay_floor in the tap's place, a relay that frames and forwards as the "
            "tap does and checks nothing: what any relay keeps of the direct figure here)"
        )
    return "\n".join(lines)


#: how our daemons wait for an answer: they poll this long before they sleep, and the C
#: floor's -B spins as long, so that the two are compared alike
SPIN_US = round(DEFAULT_BUSY_POLL * 1e6)


#: the floor's MEDIAN line: pairs/s, and each side's CPU per pair (user+sys)
_FLOOR_LINE = re.compile(
    r"MEDIAN.*pairs/s=\s*(\d+).*be=([\d.]+)\+([\d.]+) fe=([\d.]+)\+([\d.]+)"
)


def _built(source: Path, directory: Path) -> list[str]:
    """The command that runs the floor at `source`: C compiled into `directory`, or
    Python as it is."""
    if source.suffix == ".py":
        return [sys.executable, str(source)]
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise click.ClickException("no C compiler to build the floor (apt-get install gcc)")
    binary = directory / source.stem
    subprocess.run([cc, "-O2", "-o", str(binary), str(source)], check=True)
    return [str(binary)]


def run_floor(source: Path, quick: bool) -> dict[tuple[str, int], dict[str, dict[str, float]]]:
    """Build and run the C floor for the same modes, blocking and spinning SPIN_US before
    it sleeps (as our daemons do); {(mode, len): {"blocking": {"pairs_per_s",
    "fe_cpu_us", "be_cpu_us"}, "spinning": ...}}: each side's CPU per pair, so that
    each of our daemons can be held against the C side in its place."""
    out: dict[tuple[str, int], dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        floor = _built(source, Path(tmp))
        for mode in MODES:
            arg = "ack" if mode == "ack" else f"batch:{mode.removeprefix('batch')}"
            for length in LENS:
                n = "5000" if quick else "40000"
                for kind, wait in (("blocking", []), ("spinning", ["-B", str(SPIN_US)])):
                    proc = subprocess.run(
                        [*floor, "-m", arg, "-l", str(length), "-n", n, "-r", "3", *wait],
                        capture_output=True, text=True, check=True,
                    )  # fmt: skip
                    m = _FLOOR_LINE.search(proc.stdout)
                    if m:
                        be_user, be_sys, fe_user, fe_sys = map(float, m.groups()[1:])
                        out.setdefault((mode, length), {})[kind] = {
                            "pairs_per_s": float(m[1]), "fe_cpu_us": fe_user + fe_sys,
                            "be_cpu_us": be_user + be_sys,
                        }  # fmt: skip
    return out


def pair_bench(
    *, as_json: bool, quick: bool, floor: Path | None = None, existing: Sequence[int] = EXISTING
) -> None:
    started = time.monotonic()
    results = run_pair_bench(quick, existing=existing)
    floors = run_floor(floor, quick) if floor else {}
    base = {(r["mode"], r["len"]): r["pairs_per_s"] for r in results if r["existing"] == 0}
    for r in results:
        empty = base.get((r["mode"], r["len"]))
        r["cost_vs_empty"] = None if not empty else round(1 - r["pairs_per_s"] / empty, 3)
        for kind, f in floors.get((r["mode"], r["len"]), {}).items():
            # how many times our time per pair is the floor's
            r[f"floor_{kind}_pairs_per_s"] = f["pairs_per_s"]
            r[f"floor_{kind}_ratio"] = round(f["pairs_per_s"] / r["pairs_per_s"], 2)
            r[f"floor_{kind}_fe_cpu_us"] = f["fe_cpu_us"]
            r[f"floor_{kind}_be_cpu_us"] = f["be_cpu_us"]
    if as_json:
        click.echo(json.dumps({"results": results, "spin_us": SPIN_US}))
        return
    click.echo(render_pair_bench(results, bool(floors), time.monotonic() - started))


def render_pair_bench(results: list[dict[str, Any]], floors: bool, elapsed: float) -> str:
    header = (
        f"{'mode':8} {'len':>5} {'existing':>8} {'pairs/s':>9} {'p50 us':>8} {'p99 us':>8}"
        f" {'cost':>7} {'fe cpu':>7} {'be cpu':>7}"
    )
    if floors:
        header += f" {'C spin':>8} {'x spin':>7} {'C block':>8} {'x block':>7}"
    lines = [header]
    for r in results:
        cost = "" if r.get("cost_vs_empty") is None else f"{r['cost_vs_empty']:+.1%}"
        peer = "-" if r.get("peer_cpu_us") is None else f"{r['peer_cpu_us']:.0f}"
        line = (
            f"{r['mode']:8} {human_size(r['len']):>5} {r['existing']:>8} {r['pairs_per_s']:>9.0f} "
            f"{r['p50_us']:>8.1f} {r['p99_us']:>8.1f} {cost:>7} {peer:>7} "
            f"{r.get('cpu_us', 0):>7.0f}"
        )
        for kind in ("spinning", "blocking") if floors else ():
            ratio = r.get(f"floor_{kind}_ratio")
            floor = r.get(f"floor_{kind}_pairs_per_s")
            line += f" {floor:>8.0f}" if floor else f" {'-':>8}"
            line += f" {ratio:>6.2f}x" if ratio else f" {'-':>7}"
        lines.append(line)
    if floors:
        lines.append("each side's CPU per map+unmap, ours over the C floor's in its place "
                     f"(spinning {SPIN_US} us), with no existing mappings:")  # fmt: skip
        for r in results:
            c_fe, c_be = r.get("floor_spinning_fe_cpu_us"), r.get("floor_spinning_be_cpu_us")
            if r["existing"] or not c_fe or not c_be or r.get("peer_cpu_us") is None:
                continue
            fe, be = r["peer_cpu_us"], r["cpu_us"]
            lines.append(
                f"  {r['mode']:8} {human_size(r['len']):>5}  front-end {fe:.0f} / {c_fe:.0f} us "
                f"= {fe / c_fe:.1f}x   backend_sim {be:.0f} / {c_be:.0f} us = {be / c_be:.1f}x"
            )
    rss = rss_per_mapping(results)
    if rss:
        lines.append("front-end RSS: " + ", ".join(
            f"{mib(size)} with {n:,} mappings" + ("" if each is None else f" ({each:.0f} B each)")
            for n, size, each in rss
        ))  # fmt: skip
    lines.append(
        f"({elapsed:.0f}s; cost = slowdown against the same cell with no existing mappings; "
        "batched latency = batch time / batch size; fe cpu, be cpu = each daemon's CPU "
        "microseconds per map+unmap while timed"
        + (f"; C spin, C block = the C floor's pairs/s, spinning {SPIN_US} us before it "
           "sleeps as our daemons do, and blocking; x spin, x block = our time per pair over "
           "the floor's" if floors else "")
        + ")"
    )  # fmt: skip
    return "\n".join(lines)


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
