"""The command line as a user meets it: the demo, help, and usage errors."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from shmemctl.cli import main

from .conftest import PATIENCE


def run(*args: str, timeout: float = PATIENCE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmemctl", *args], capture_output=True, text=True, timeout=timeout
    )


def test_demo_tells_the_whole_story() -> None:
    done = run("demo", "--pause", "0")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "map 0 0 1M: ok" in out
    assert "map 0 0x80000 1M: EEXIST" in out
    assert "unmap 0 0x100000 8K: ENOENT" in out
    assert "0x0+0x10000 ro" in out  # the read-only mapping, as /proc shows it
    # after the back-end stops, every region is one reservation again
    tail = out.split("stopping the back-end", 1)[1]
    assert "0x0+0x800000 --" in tail and "0x0+0x10000 --" in tail
    assert "Traceback" not in done.stderr


def test_usage_errors_say_what_would_be_right() -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["frontend"])
    assert result.exit_code == 2
    assert "give exactly one of --connect PATH or --listen PATH" in result.output
    result = runner.invoke(main, ["frontend", "--connect", "x", "--shmem-bit", "20"])
    assert result.exit_code == 2
    assert "'20' is not one of '22', '21'" in result.output
    result = runner.invoke(main, ["frontend", "--connect", "x", "--max-reserve", "lots"])
    assert result.exit_code == 2
    assert "write a number of bytes like 4096, 0x1000, 64K, 8M or 1G" in result.output


def test_version_says_the_protocol_bit_too() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith("shmemctl 0.")
    assert "SHMEM at protocol feature bit 22" in result.output


def test_backend_sim_usage_errors() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "backend_sim", "--regions", "0=8M"],
        capture_output=True, text=True, timeout=PATIENCE,
    )  # fmt: skip
    assert done.returncode == 2
    assert "give exactly one of --listen PATH or --connect PATH" in done.stderr
