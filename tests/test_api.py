"""The typed Python API (`import shmemctl`), on real daemons: results are records,
refusals are exceptions with the CLI's words, waits are on events, and what a
handle started is gone when it closes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

import shmemctl
from shmemctl import BackendSim, Frontend, Mapping, MapRefused, Pair, Tap, Timeout
from shmemctl.events import Event
from shmemctl.pair import launch
from shmemctl.rundir import PairPaths

from .conftest import PATIENCE


def test_a_pair_maps_unmaps_and_says_so_in_records(tmp_path: Path) -> None:
    with Pair.start(regions="0=8M,2=64K", run_dir=tmp_path, name="vm1") as pair:
        assert pair.name == "vm1" and pair.paths.dir == tmp_path / "vm1"
        assert pair.frontend.get_shmem_config().regions() == {0: 8 << 20, 2: 64 << 10}

        mapping = pair.backend.map(0, 0x10000, 4096)
        assert mapping[:5] == (0, 0x10000, 4096, 0, True)
        status = pair.frontend.wait_for(lambda s: s.holds(mapping), timeout=PATIENCE)
        assert status.role == "frontend" and status.state == "connected" and status.shmem
        assert status.agrees is True and status.disagreements == ()
        assert status.regions == {0: 8 << 20, 2: 64 << 10}
        held = next(m for m in status.mappings if m.shm_offset == 0x10000)
        assert held.ino and held.file.startswith("/memfd:")  # what /proc says the file is
        assert pair.backend.status().holds(mapping)
        # what backend_sim wrote into its buffer, read through the front-end's mapping
        assert pair.frontend.read(0, 0x10000, 16) == b"shmemctl buffer "

        ro = pair.backend.map(2, 0, 4096, writable=False)
        assert not ro.writable and pair.frontend.wait_for(lambda s: s.holds(ro))

        pair.backend.unmap(0, 0x10000, 4096)
        assert not pair.frontend.status().holds(mapping)
        assert pair.frontend.reset() == 1  # the read-only one
        assert pair.frontend.mappings() == ()


def test_a_refusal_is_map_refused_with_the_errno_and_the_reason(tmp_path: Path) -> None:
    with Pair.start(regions="0=8M", run_dir=tmp_path) as pair:
        pair.backend.map(0, 0, 0x100000)
        with pytest.raises(MapRefused) as refused:
            pair.backend.map(0, 0x80000, 0x100000)
        assert refused.value.errno == "EEXIST" and refused.value.value == -17
        assert "overlaps 0x0+0x100000" in refused.value.reason
        assert str(refused.value).startswith("refused by the front-end: EEXIST")
        with pytest.raises(MapRefused) as gone:
            pair.backend.unmap(0, 0x200000, 4096)  # nothing there
        assert gone.value.errno is not None
        # what the device checks before sending is not the front-end's refusal
        with pytest.raises(shmemctl.ControlError) as local:
            pair.backend.map(0, 0, 4096, fd_offset=1)
        assert not isinstance(local.value, MapRefused)


def test_events_and_waits_come_from_the_subscription(tmp_path: Path) -> None:
    with Pair.start(regions="0=8M", run_dir=tmp_path) as pair:
        with pair.frontend.events([Event.MAPPED, Event.UNMAPPED]) as events:
            pair.backend.map(0, 0, 4096)
            pair.backend.unmap(0, 0, 4096)
            first, second = next(events), next(events)
        assert (first.name, second.name, first.role) == (Event.MAPPED, Event.UNMAPPED, "frontend")
        assert first.mapping is not None and first.mapping[:3] == (0, 0, 4096)
        assert 0 < first.time <= second.time

        with pytest.raises(Timeout, match=r"did not reach what was waited for within 0\.2s"):
            pair.frontend.wait_for(lambda s: s.state == "never", timeout=0.2)


def test_handles_on_somebody_elses_peer_and_attach(tmp_path: Path) -> None:
    sock = tmp_path / "vhost.sock"
    with Frontend.start(listen=sock) as frontend:
        assert frontend.status().state in ("listening", "disconnected")
        with BackendSim.start(connect=sock, regions="0=4M") as backend:
            status = frontend.wait_for(lambda s: s.state == "connected", timeout=PATIENCE)
            assert status.regions == {0: 4 << 20}
            # a second handle on the same daemon, by its control socket: closing it
            # leaves the daemon running
            with BackendSim.attach(control=backend.control) as same:
                mapping = same.map(0, 0, 4096)
            assert backend.status().holds(mapping)
            pid = backend.pid
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
        assert not backend.control.parent.exists()  # its private directory went with it


def test_a_pair_by_name_is_attached_and_left_running(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SHMEMCTL_RUN_DIR", str(tmp_path))
    with Pair.start(regions="0=8M", run_dir=tmp_path, name="vm2") as started:
        with Pair.attach("vm2") as attached:
            mapping = attached.backend.map(0, 0, 4096)
            assert attached.frontend.wait_for(lambda s: s.holds(mapping))
        assert started.frontend.status().holds(mapping)  # still there
        pids = (started.frontend.pid, started.backend.pid)
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


def test_a_daemon_that_cannot_start_says_why(tmp_path: Path) -> None:
    with pytest.raises(shmemctl.DaemonUnreachable, match="exited"):
        BackendSim.start(listen=tmp_path / "v.sock", regions="0=3")  # not a page multiple


def test_what_a_handle_started_leaves_nothing_behind(tmp_path: Path) -> None:
    before = set(os.listdir("/proc/self/fd"))
    with Pair.start(regions="0=8M") as pair:
        made = pair.paths.dir.parent
        pair.backend.map(0, 0, 4096)
        pair.frontend.status()
        with pair.frontend.events() as events:
            pair.backend.unmap(0, 0, 4096)
            assert next(events).name == Event.UNMAPPED
    assert not made.exists()
    assert set(os.listdir("/proc/self/fd")) <= before


def test_the_api_is_typed_records_not_dicts() -> None:
    assert shmemctl.Mapping is Mapping  # the project's one mapping record
    assert shmemctl.ShmemConfig.__module__ == "shmemctl.wire.messages"
    assert (Path(shmemctl.__file__).parent / "py.typed").exists()
    with pytest.raises(AttributeError):
        _ = shmemctl.Nothing  # type: ignore[attr-defined]


def test_the_readme_example_runs(tmp_path: Path) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    done = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, timeout=PATIENCE,
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("EEXIST the device's own reading: overlaps 0x0+0x100000")


def test_a_tap_is_attached_and_its_picture_is_a_status(tmp_path: Path) -> None:
    paths = PairPaths(tmp_path / "vm")
    paths.dir.mkdir()
    launched = launch(paths, tap=True, backend_args=["--regions", "0=8M"], timeout=PATIENCE)
    try:
        with Tap.attach(control=paths.control("tap")) as tap, BackendSim.attach(
            control=paths.control("backend")
        ) as backend:
            mapping = backend.map(0, 0x20000, 4096)
            status = tap.wait_for(lambda s: s.holds(mapping) and s.agrees, timeout=PATIENCE)
            assert status.role == "tap" and status.regions == {0: 8 << 20}
            assert status.disagreements == () and tap.violations() == {}
    finally:
        launched.stop()


@pytest.mark.parametrize(
    ("module", "needs_api"),
    [("shmemctl.bench", True), ("shmemctl.pair", True), ("shmemctl.inventory", True),
     ("shmemctl.cli", True), ("shmemctl.metrics", True), ("shmemctl.frontend", False),
     ("shmemctl.tap", False), ("backend_sim", False)],
)  # fmt: skip
def test_any_module_imports_first(module: str, needs_api: bool) -> None:
    # the package's lazy names must not be what a sibling's `from . import x` finds, and
    # the daemons load neither the API nor its client (asyncio, qemu.qmp)
    loaded = f"import sys, {module}; print('shmemctl.api' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", loaded], capture_output=True, text=True,
                          timeout=PATIENCE)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(needs_api)
