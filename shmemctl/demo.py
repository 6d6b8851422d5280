"""`shmemctl demo`: both daemons, a scripted device, and the kernel's word on every step."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

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


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise click.ClickException(f"timed out waiting for {what}")
        time.sleep(0.02)


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
        sock = os.path.join(tmp, "vhost.sock")
        # The back-end sleeps after every step so the kernel's view can be shown
        # while nothing moves; the batch (noreply lines) goes out as one burst.
        sleep = f"sleep {max(300, int(pause * 1000))}"
        paced = [sleep] + [
            step + ("" if "noreply" in step else f"\n{sleep}") for step in TOUR.splitlines()
        ]
        Path(tmp, "tour.txt").write_text("\n".join(paced) + "\n")
        spec = ",".join(f"{k}={human_size(v)}" for k, v in REGIONS.items())
        be_log = Path(tmp, "backend.log")
        fe_log = Path(tmp, "frontend.log")
        click.echo(f"starting backend_sim (regions {spec}) and the front-end on {sock}")
        with be_log.open("w") as be_err, fe_log.open("w") as fe_err:
            backend = subprocess.Popen(
                [sys.executable, "-m", "backend_sim", "--listen", sock,
             "--control", os.path.join(tmp, "backend.ctl"), "--regions", spec,
                 "--script", "tour.txt"],
                stdout=subprocess.PIPE, stderr=be_err, text=True, cwd=tmp,
            )  # fmt: skip
            frontend = None
            try:
                _wait(lambda: os.path.exists(sock), 10, "backend_sim to listen")
                frontend = subprocess.Popen(
                    [sys.executable, "-m", "shmemctl", "frontend", "--connect", sock,
                 "--control", os.path.join(tmp, "frontend.ctl")],
                    stderr=fe_err, stdout=subprocess.DEVNULL,
                )  # fmt: skip
                _wait(lambda: "connected:" in fe_log.read_text(), 10, "the handshake")
                bases = {
                    int(s): int(a, 16)
                    for s, a in re.findall(r"region (\d+): \S+ reserved at (0x[0-9a-f]+)",
                                           fe_log.read_text())
                }  # fmt: skip
                click.echo(f"front-end pid {frontend.pid} reserved its regions; /proc says:")
                _show_regions(frontend.pid, bases)
                assert backend.stdout is not None
                backend.stdout.readline()  # the opening pause
                for why in WHY:
                    line = backend.stdout.readline().rstrip("\n")
                    click.echo(f"\n  {line}" + (f"    <- {why}" if why else ""))
                    if "noreply" not in line:
                        _show_regions(frontend.pid, bases)
                        backend.stdout.readline()  # the pause's own result line
                fds = len(os.listdir(f"/proc/{frontend.pid}/fd"))
                click.echo(f"\nthe front-end holds {fds} fds: every received fd was closed "
                           "once mapped (the mapping keeps the file)")  # fmt: skip
                click.echo("\nstopping the back-end: the front-end drops every mapping")
                backend.terminate()
                backend.wait(10)
                _wait(lambda: "back-end gone" in fe_log.read_text(), 10, "the disconnect")
                _show_regions(frontend.pid, bases)
            finally:
                for proc in (frontend, backend):
                    if proc is not None and proc.poll() is None:
                        proc.terminate()
                        proc.wait(10)
        click.echo("\nfront-end log:")
        for line in fe_log.read_text().splitlines():
            click.echo("  " + line.split(" ", 2)[-1])
