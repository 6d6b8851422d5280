"""The tiny device's tests, written as a device developer would write them: the
shmemctl pytest plugin's `shmem_frontend` is a real front-end to connect to, and
its handle says what the front-end holds and what its /proc/PID/maps shows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shmemctl import Frontend

DEVICE = Path(__file__).parent / "tiny_device.py"


def start_device(frontend: Frontend, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(DEVICE), str(frontend.socket), *args],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_the_blob_lands_in_the_front_ends_region(shmem_frontend: Frontend) -> None:
    device = start_device(shmem_frontend)
    try:
        assert device.stdout is not None and device.stdout.readline() == "mapped\n"
        status = shmem_frontend.wait_for(lambda s: len(s.mappings) == 1)
        blob = status.mappings[0]
        assert (blob.shmid, blob.shm_offset, blob.len, blob.writable) == (0, 0, 4096, True)
        assert status.agrees  # /proc/PID/maps holds the same file at the same place
        assert status.regions == {0: 1 << 20}
        assert shmem_frontend.read(0, 0, 24) == b"hello from a tiny device"
    finally:
        device.terminate()
        device.wait()


@pytest.mark.shmem(shmem_bit=21)
def test_a_front_end_reading_shmem_at_bit_21_gets_no_blob(shmem_frontend: Frontend) -> None:
    # the device offers SHMEM at bit 22 only: this front-end never negotiates it
    device = start_device(shmem_frontend)
    try:
        status = shmem_frontend.wait_for(lambda s: s.state == "connected")
        assert not status.shmem and status.mappings == ()
    finally:
        device.terminate()
        device.wait()
