"""The client commands on a tap's name, and `ls` over every pair and tap of a host: real
`shmemctl` processes against a real tap between a front-end and backend_sim."""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from shmemctl.tap.truth import AGREE

from .conftest import PATIENCE, MiB, wait_until
from .test_cli_pair import Shell, wait_subscribed
from .test_tap import region_mappings, start_pair

FE_PID, BE_PID = "front-end", "back-end"


@pytest.fixture
def sh(tmp_path: Path) -> Iterator[Shell]:
    shell = Shell(str(tmp_path / "run"))
    yield shell
    shell("down", "--name", "p")  # a pair `up` started outlives the test otherwise


class Lines:
    """A streaming command's stdout, read line by line in a thread, so that a test can
    wait for one line with a deadline and stop the command once it came."""

    def __init__(self, stream: subprocess.Popen[str]) -> None:
        self.stream = stream
        self.seen: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.stream.stdout is not None
        for line in self.stream.stdout:
            self._queue.put(line.rstrip("\n"))

    def wait_for(self, *words: str) -> str:
        """The first line holding every one of `words`."""

        def found() -> str | None:
            while not self._queue.empty():
                self.seen.append(self._queue.get())
            for line in self.seen:
                if all(word in line for word in words):
                    return line
            if self.stream.poll() is not None:
                raise AssertionError(f"{self.stream.args[3:]} exited: {self.seen}")
            return None

        try:
            return wait_until(found, what=f"a line with {words}")  # type: ignore[return-value]
        except AssertionError as exc:
            raise AssertionError(f"{exc}; lines: {self.seen}") from None

    def stop(self) -> None:
        self.stream.terminate()
        self.stream.communicate(timeout=PATIENCE)


def test_status_on_a_tap_shows_both_sides_the_mappings_and_the_verdict(spawn, tmp_path, sh) -> None:
    pair = start_pair(spawn, tmp_path, "listen", "connect")
    assert pair.fe is not None and pair.be is not None
    pair.monitor("be").execute("map", shmid=0, shm_offset=MiB, len=MiB)
    pair.monitor("be").execute("map", shmid=2, shm_offset=0, len=64 << 10, ro=True)

    done = sh("status", "--name", "t")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    own = pair.monitor("tap").execute("query-status")
    assert out.startswith(f"tap        pid {own['process']['pid']}  ")
    assert f"pid {pair.fe.pid}  " in out and f"pid {pair.be.pid}  " in out
    for m in region_mappings(own, 0) + region_mappings(own, 2):
        assert m["ino"] and f"dev {m['dev']} ino {m['ino']}" in out
    assert f"{'0x100000+0x100000':<24} rw  fd_offset 0x0  /memfd:" in out
    assert f"{'0x0+0x10000':<24} ro  fd_offset 0x0  /memfd:" in out
    assert "region 0  8M at 0x" in out and "(inferred)  1 mappings, 1M mapped" in out
    assert "violations: none" in out
    assert "/proc: agree: front-end pid" in out
    done = sh("map", "--name", "t", "0", "0", "4K")  # a tap changes nothing
    assert done.returncode == 1 and "t is a tap: it only watches its pair" in done.stderr

    done = sh("status", "--name", "t", "--json")
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    assert view.keys() == own.keys() and view["role"] == "tap"
    assert view["regions"] == own["regions"]
    sides = view["sides"]
    assert (sides[FE_PID]["process"]["pid"], sides[BE_PID]["process"]["pid"]) == (
        pair.fe.pid,
        pair.be.pid,
    )
    assert view["truth"]["verdict"] == AGREE


def test_status_on_a_tap_that_is_gone_says_so_with_exit_3(spawn, tmp_path, sh) -> None:
    pair = start_pair(spawn, tmp_path, "listen", "connect")
    pair.tap.stop()
    stale = tmp_path / "run" / "t" / "tap.ctl"
    if not stale.exists():  # a tap that cleaned up: leave a dead socket as a crash would
        stale_socket(stale)
    done = sh("status", "--name", "t")
    stale.unlink(missing_ok=True)
    assert done.returncode == 3
    assert "is the tap running? (shmemctl tap --front ... --back ... --name t)" in done.stderr


def stale_socket(path: Path) -> None:
    """A control socket file nobody listens on (its daemon died without removing it)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()


def test_watch_on_a_tap_shows_a_violation_standing_out(spawn, tmp_path, sh) -> None:
    pair = start_pair(spawn, tmp_path, "listen", "connect",
                      be_args=("--fault", "map-out-of-bounds"))  # fmt: skip
    watch = Lines(sh.popen("watch", "--name", "t"))
    try:
        wait_subscribed(watch.stream, daemons=1)
        with pytest.raises(AssertionError, match=r"GenericError.*refused by the front-end: EINVAL"):
            pair.monitor("be").execute("map", shmid=0, shm_offset=0, len=MiB)
        line = watch.wait_for("VIOLATION")
    finally:
        watch.stop()
    assert " tap      VIOLATION back-end broke map-valid (§5: " in line
    assert "shmid 0 [0x800000, 0x900000)" in line and line.endswith("[backend SHMEM_MAP]")


def test_trace_on_a_tap_prints_what_the_pair_exchanged(spawn, tmp_path, sh) -> None:
    pair = start_pair(spawn, tmp_path, "listen", "connect")
    trace = Lines(sh.popen("trace", "--name", "t"))
    try:
        wait_subscribed(trace.stream, daemons=1)
        pair.monitor("be").execute("map", shmid=0, shm_offset=0, len=MiB)
        asked = trace.wait_for("be->fe backend SHMEM_MAP need_reply")
        answered = trace.wait_for("fe->be backend SHMEM_MAP reply 0")
    finally:
        trace.stop()
    assert " tap      " in asked and "fds=1" in asked
    assert trace.seen.index(asked) < trace.seen.index(answered)


def test_ls_lists_taps_and_pairs_and_a_stale_name(spawn, tmp_path, sh) -> None:
    pair = start_pair(spawn, tmp_path, "listen", "connect")
    assert pair.fe is not None and pair.be is not None
    pair.monitor("be").execute("map", shmid=0, shm_offset=0, len=MiB)
    pair.monitor("be").execute("map", shmid=2, shm_offset=0, len=64 << 10)
    done = sh("up", "--name", "p", "--regions", "0=8M", "--timeout", str(PATIENCE))
    assert done.returncode == 0, done.stderr
    assert sh("map", "--name", "p", "0", "0", "64K").returncode == 0
    stale_socket(tmp_path / "run" / "old" / "frontend.ctl")
    (tmp_path / "run" / "empty").mkdir()  # a downed pair's directory: nothing to list

    done = sh("ls", "--json")
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert list(rows) == ["old", "p", "t"]
    tap, up, old = rows["t"], rows["p"], rows["old"]
    assert tap["kind"] == "tap" and tap["state"] == "relaying"
    assert tap["peers"] == {FE_PID: pair.fe.pid, BE_PID: pair.be.pid}
    assert (tap["mappings"], tap["mapped_bytes"], tap["violations"], tap["verdict"]) == (
        2, MiB + (64 << 10), 0, AGREE,
    )  # fmt: skip
    assert up["kind"] == "pair" and up["state"] == "connected"
    assert all(isinstance(pid, int) for pid in up["peers"].values())
    assert (up["mappings"], up["mapped_bytes"], up["violations"], up["verdict"]) == (
        1, 64 << 10, None, AGREE,
    )  # fmt: skip
    assert (old["kind"], old["state"], old["mappings"]) == ("pair", "not answering", None)
    assert "no daemon answers" in old["error"]

    done = sh("ls")
    assert done.returncode == 0, done.stderr
    header, *lines = done.stdout.splitlines()
    assert header.split() == ["NAME", "KIND", "PEERS", "STATE", "MAPPINGS", "MAPPED",
                              "VIOLATIONS", "/PROC"]  # fmt: skip
    assert [line.split()[:2] for line in lines] == [["old", "pair"], ["p", "pair"], ["t", "tap"]]
    assert lines[0].split()[2:] == ["-,-", "not", "answering", "-", "-", "-", "-"]
    assert lines[2].split()[2:] == [f"{pair.fe.pid},{pair.be.pid}", "relaying", "2", "1088K",
                                    "0", "agree"]  # fmt: skip
    assert lines[1].split()[3:] == ["connected", "1", "64K", "-", "agree"]
