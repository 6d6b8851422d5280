"""The pytest plugin, as a user's CI meets it: a separate pytest run, in a directory of
its own, with only the installed shmemctl (its `pytest11` entry point) to find."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from .conftest import PATIENCE


def run_pytest(where: Path, test_code: str, *args: str) -> subprocess.CompletedProcess[str]:
    (where / "pytest.ini").write_text("[pytest]\n")  # no configuration of ours applies
    (where / "test_user.py").write_text(textwrap.dedent(test_code))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", *args],
        cwd=where, capture_output=True, text=True, timeout=PATIENCE * 3,
        env={"PATH": "/usr/bin:/bin", "SHMEMCTL_RUN_DIR": str(where / "run")},
    )  # fmt: skip


def test_the_fixtures_start_real_daemons_and_take_options(tmp_path: Path) -> None:
    done = run_pytest(
        tmp_path,
        """
        import pytest
        from shmemctl import Frontend

        @pytest.mark.shmem(regions="0=4M,3=64K")
        def test_pair(shmem_pair):
            mapping = shmem_pair.backend.map(3, 0, 4096)
            status = shmem_pair.frontend.wait_for(lambda s: s.holds(mapping))
            assert status.regions == {0: 4 << 20, 3: 64 << 10} and status.agrees

        def test_a_vmm_meets_the_backend(shmem_backend):
            with Frontend.start(connect=shmem_backend.socket) as vmm:
                assert vmm.wait_for(lambda s: s.state == "connected").shmem

        @pytest.mark.parametrize("shmem_frontend", [{"shmem_bit": 21}], indirect=True)
        def test_indirect(shmem_frontend):
            assert shmem_frontend.status().raw["shmem_bit"] == 21
            assert len(str(shmem_frontend.socket)) < 108  # AF_UNIX's limit
    """,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout


def test_shmem_daemons_starts_each_daemon_as_the_test_says(tmp_path: Path) -> None:
    done = run_pytest(
        tmp_path,
        """
        def test_through_a_tap(shmem_daemons, tmp_path):
            front, back = tmp_path / "f.sock", tmp_path / "b.sock"
            device = shmem_daemons.backend(listen=back, regions="0=4M")
            tap = shmem_daemons.tap(front=f"listen:{front}", back=f"connect:{back}")
            vmm = shmem_daemons.frontend(connect=front, args=["--reconnect", "1"])
            device.wait_for(lambda s: s.raw["ready"])  # the handshake went through the tap
            mapping = device.map(0, 0x1000, 4096)
            seen = tap.wait_for(lambda s: s.holds(mapping) and s.agrees is True)
            assert vmm.status().holds(mapping) and seen.role == "tap"
            assert tap.violations() == {}

        def test_names_tell_them_apart(shmem_daemons, tmp_path):
            shmem_daemons.backend(listen=tmp_path / "a.sock", name="first")
            shmem_daemons.backend(listen=tmp_path / "b.sock", name="second")
            assert 0
    """,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 failed, 1 passed" in done.stdout, done.stdout
    # each daemon's log has a section of its own in the failure's report
    assert "shmemctl first: log" in done.stdout and "shmemctl second: log" in done.stdout
    assert "left things behind" not in done.stdout


def test_a_failing_test_shows_the_messages_and_the_logs(tmp_path: Path) -> None:
    done = run_pytest(
        tmp_path,
        """
        def test_fails(shmem_pair):
            shmem_pair.frontend.get_shmem_config()
            shmem_pair.backend.map(0, 0, 4096)
            assert shmem_pair.frontend.mappings() == ()
    """,
    )
    assert done.returncode == 1
    out = done.stdout
    assert "shmemctl frontend: last 40 messages" in out and "shmemctl backend: log" in out
    trace = out.split("shmemctl frontend: last 40 messages", 1)[1]
    assert "GET_SHMEM_CONFIG" in trace and "SHMEM_MAP" in trace  # decoded, both channels
    assert "backend channel established" in out.split("shmemctl backend: log", 1)[1]


def test_what_a_test_leaves_running_fails_it_loudly(tmp_path: Path) -> None:
    left = tmp_path / "left"
    done = run_pytest(
        tmp_path,
        f"""
        from shmemctl import pytest_plugin

        def test_keeps_the_daemon(request, shmem_backend):
            started = request.node.stash[pytest_plugin._STARTED][0]
            started.stoppers.clear()  # as if its handle forgot to stop it
            started.closers.clear()
            with open({str(left)!r}, "w") as f:
                print(shmem_backend.pid, shmem_backend.control.parent,
                      shmem_backend.socket.parent, file=f)
    """,
    )
    pid, *dirs = left.read_text().split()
    os.kill(int(pid), signal.SIGKILL)  # what the plugin found still running
    for where in dirs:
        shutil.rmtree(where)
    assert done.returncode == 1
    assert "ERROR at teardown of test_keeps_the_daemon" in done.stdout
    report = done.stdout.split("shmemctl left things behind after the test: ", 1)[1]
    assert f"the backend (pid {pid}) still runs" in report
    assert "backend.ctl is still there" in report
    assert "fds it opened in this process are still open" in report and "socket:" in report


def test_it_is_turned_off_by_name(tmp_path: Path) -> None:
    done = run_pytest(tmp_path, "def test_x(shmem_pair):\n    pass\n", "-p", "no:shmemctl")
    assert done.returncode == 1 and "fixture 'shmem_pair' not found" in done.stdout


def test_conformance_checks_are_items(tmp_path: Path) -> None:
    device = f"{sys.executable} -m backend_sim --listen {{socket}} --scenario blobs " \
             "--scenario-rate 50"  # fmt: skip
    good = run_pytest(tmp_path, "", f"--shmem-conformance-backend={device}")
    assert good.returncode == 0, good.stdout
    assert "PASSED shmem-conformance-backend::test_conformance[need-reply-on-a-getter]" in (
        good.stdout
    )
    assert " failed" not in good.stdout

    bad = run_pytest(tmp_path, "", f"--shmem-conformance-backend={device} --fault echo-need-reply")
    assert bad.returncode == 1
    assert "FAILED shmem-conformance-backend::test_conformance[need-reply-on-a-getter]" in (
        bad.stdout
    )
    failure = bad.stdout.split("test_conformance[need-reply-on-a-getter] _", 1)[1]
    assert "§3: NEED_REPLY on a request with its own reply changes nothing" in failure
    assert "expected: exactly one reply, the features" in failure
    assert "arrived:" in failure and "backend_sim" in failure  # and the device's own output


def test_conformance_of_a_front_end(tmp_path: Path) -> None:
    vmm = f"{sys.executable} -m shmemctl frontend --connect {{socket}} --control {tmp_path}/f.ctl"
    done = run_pytest(tmp_path, "", f"--shmem-conformance-frontend={vmm}")
    assert done.returncode == 0, done.stdout
    assert "PASSED shmem-conformance-frontend::test_conformance[connects]" in done.stdout


def test_a_command_that_cannot_start_is_said_once_with_its_words(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    device = f"sh -c 'echo run >> {runs}; echo boom-why-i-died >&2; exit 3' {{socket}}"
    done = run_pytest(tmp_path, "", f"--shmem-conformance-backend={device}")
    assert done.returncode == 1
    assert runs.read_text() == "run\n"  # started once, for every item
    assert done.stdout.count("could not run the backend checks: the command exited (3)") >= 19
    assert "boom-why-i-died" in done.stdout


def test_conformance_items_run_once_under_xdist(tmp_path: Path) -> None:
    device = f"{sys.executable} -m backend_sim --listen {{socket}} --scenario blobs"
    done = run_pytest(tmp_path, "", "-n", "2", f"--shmem-conformance-backend={device}")
    assert done.returncode == 0, done.stdout[-3000:]
    assert " failed" not in done.stdout and "passed" in done.stdout
