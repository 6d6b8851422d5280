"""`shmemctl demo`: both daemons, a scripted device, and the kernel's word on every step."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import click

from .pair import Launched, PairError, daemon_status, launch, wait_for
from .rundir import PairPaths
from .shmem.procmaps import kernel_segments, read_maps
from .sizes import hex_range, human_size

REGIONS = {0: 8 << 20, 2: 64 << 10}
TOUR = """\
map 0 0 1M
map 0 0x80000 1M
map 2 0 64K ro
map 0 0x100000 4K fd_offset=4K
map 0 3M 64K noreply
map 0 0x310000 64K noreply
map 0 0x320000 64K
map 0 7M 2M
unmap 0 0 1M
unmap 0 0x100000 8K
map 0 0 1M
"""
WHY = [
    "a 1 MiB read-write buffer at the start of region 0",
    "refused: it would overlap the first mapping",
    "a read-only buffer filling region 2",
    "one page, 4 KiB into its buffer",
    "batching: three maps, only the last asks for an ack",
    "",
    "",
    "refused: 7M + 2M ends past the 8 MiB region",
    "unmap the first mapping: the reservation comes back",
    "refused: not one whole mapping",
    "the same range can be mapped again",
]


def _show_regions(pid: int, bases: dict[int, int]) -> None:
    lines = read_maps(pid)
    for shmid, base in sorted(bases.items()):
        segs = kernel_segments(lines, base, REGIONS[shmid])
        parts = []
        for seg in segs:
            label = "--" if seg.access == "none" else seg.access
            parts.append(f"{hex_range(seg.start, seg.end - seg.start)} {label}")
        click.echo(f"      region {shmid} @ {base:#x}: " + " | ".join(parts))


def run_demo(pause: float) -> None:
    with tempfile.TemporaryDirectory(prefix="shmemctl-demo-") as tmp:
        paths = PairPaths(Path(tmp))
        # The back-end sleeps after every step so the kernel's view can be shown
        # while nothing moves; the batch (noreply lines) goes out as one burst.
        sleep = f"sleep {max(300, int(pause * 1000))}"
        paced = [sleep] + [
            step + ("" if "noreply" in step else f"\n{sleep}") for step in TOUR.splitlines()
        ]
        tour = Path(tmp, "tour.txt")
        tour.write_text("\n".join(paced) + "\n")
        spec = ",".join(f"{k}={human_size(v)}" for k, v in REGIONS.items())
        click.echo(f"starting backend_sim (regions {spec}) and the front-end on {paths.vhost}")
        try:
            pair = launch(paths, backend_args=["--regions", spec, "--script", str(tour)],
                          backend_stdout=subprocess.PIPE, timeout=60)  # fmt: skip
        except PairError as exc:
            raise click.ClickException(str(exc)) from None
        try:
            _tour(paths, pair)
        finally:
            pair.stop()
        click.echo("\nfront-end log:")
        for line in paths.logfile("frontend").read_text().splitlines():
            click.echo("  " + line.split(" ", 2)[-1])


def _tour(paths: PairPaths, pair: Launched) -> None:
    frontend, backend = pair.frontend, pair.backend
    click.echo(f"front-end pid {frontend.pid} reserved its regions; /proc says:")
    _show_regions(frontend.pid, pair.bases)
    assert backend.stdout is not None
    backend.stdout.readline()  # the opening pause
    for why in WHY:
        line = backend.stdout.readline().rstrip("\n")
        click.echo(f"\n  {line}" + (f"    <- {why}" if why else ""))
        if "noreply" not in line:
            _show_regions(frontend.pid, pair.bases)
            backend.stdout.readline()  # the pause's own result line
    fds = len(os.listdir(f"/proc/{frontend.pid}/fd"))
    click.echo(f"\nthe front-end holds {fds} fds: every received fd was closed "
               "once mapped (the mapping keeps the file)")  # fmt: skip
    click.echo("\nstopping the back-end: the front-end drops every mapping")
    backend.terminate()
    backend.wait(60)

    def disconnected() -> bool:
        status = daemon_status(paths, "frontend")
        return status is not None and status["state"] != "connected"

    try:
        wait_for(paths, {"frontend": frontend}, disconnected, 60, "disconnected")
    except PairError as exc:
        raise click.ClickException(str(exc)) from None
    _show_regions(frontend.pid, pair.bases)
