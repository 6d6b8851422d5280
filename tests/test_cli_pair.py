"""The CLI as a script would use it: real `shmemctl` processes against real daemons."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from shmemctl.cli import main
from shmemctl.events import Event

from .conftest import PATIENCE, MiB, wait_until


class Shell:
    """Runs shmemctl commands with the pair's run directory under the test's tmp_path."""

    def __init__(self, run_dir: str) -> None:
        self.env = {**os.environ, "SHMEMCTL_RUN_DIR": run_dir}

    def __call__(self, *args: str, timeout: float = PATIENCE) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "shmemctl", *args],
            capture_output=True, text=True, timeout=timeout, env=self.env, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert "Traceback" not in done.stderr, done.stderr
        return done

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "shmemctl", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env,
        )  # fmt: skip


@pytest.fixture
def sh(tmp_path):
    shell = Shell(str(tmp_path / "run"))
    yield shell
    shell("down")
    shell("down", "--name", "other")


@pytest.fixture
def pair(sh):
    done = sh("up", "--regions", "0=8M,2=64K", "--timeout", str(PATIENCE))
    assert done.returncode == 0, done.stderr
    assert "pair default is up" in done.stdout
    return sh


def test_the_issue_walkthrough(pair) -> None:
    sh = pair
    done = sh("map", "0", "0", "1M")
    assert (done.returncode, done.stdout.strip()) == (0, "mapped 0x0+0x100000 in region 0 rw")

    done = sh("map", "0", "0x80000", "1M")
    assert done.returncode == 1
    assert (
        "refused by the front-end: EEXIST (reply value -17); "
        "the device's own reading: overlaps 0x0+0x100000"
    ) in done.stderr

    done = sh("map", "2", "0", "64K", "--ro", "--json")
    assert done.returncode == 0
    assert json.loads(done.stdout) == {
        "result": "ok", "shmid": 2, "shm_offset": 0, "len": 65536, "fd_offset": 0, "flags": 0,
    }  # fmt: skip

    done = sh("status", "--json")
    assert done.returncode == 0
    views = json.loads(done.stdout)
    fe, be = views["frontend"], views["backend"]
    assert fe["state"] == "connected" and be["state"] == "connected"
    assert fe["disagreements"] == []
    assert [(r["shmid"], r["count"]) for r in fe["regions"]] == [(0, 1), (2, 1)]
    assert fe["regions"][1]["mappings"][0]["writable"] is False
    assert "memfd:shmemctl-buffer" in fe["regions"][0]["mappings"][0]["file"]
    assert fe["process"]["rss"] > 0 and be["process"]["fds"] > 0
    text = sh("status").stdout
    assert "the mapping table and /proc/PID/maps agree" in text
    assert f"pid {fe['process']['pid']}" in text and f"pid {be['process']['pid']}" in text

    done = sh("config")
    assert done.returncode == 0
    assert "nregions 2" in done.stdout and "8M" in done.stdout and "64K" in done.stdout

    done = sh("read", "2", "0", "24")
    assert "shmemctl buffer" in done.stdout

    done = sh("reset", "--yes")
    assert (done.returncode, done.stdout.strip()) == (
        0,
        "reset with RESET_DEVICE: dropped 2 mappings",
    )
    done = sh("unmap", "0", "0", "1M")
    assert done.returncode == 1
    assert "refused by the front-end: ENOENT (reply value -2)" in done.stderr

    assert sh("map", "0", "0", "1M").returncode == 0
    done = sh("unmap", "0", "0", "1M")
    assert (done.returncode, done.stdout.strip()) == (0, "unmapped 0x0+0x100000 in region 0")

    done = sh("down")
    assert done.returncode == 0 and "pair default is down" in done.stdout
    done = sh("status")
    assert done.returncode == 3
    assert "pair default is not up" in done.stderr
    assert sh("map", "0", "0", "4K").returncode == 3


def test_batch_one_ack(pair) -> None:
    done = pair("batch", "0:0:64K", "0:64K:64K:ro", "0:128K:4K:fd_offset=4K", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"result": "ok", "count": 3}
    status = json.loads(pair("status", "--json").stdout)["frontend"]
    assert status["regions"][0]["count"] == 3
    done = pair("batch", "0:0:bad")
    assert done.returncode == 2 and "write SHMID:OFFSET:LEN" in done.stderr


def wait_subscribed(stream: subprocess.Popen[str], daemons: int = 2) -> None:
    """Wait until a `watch` or `trace` process is subscribed on both daemons.

    Each daemon's client runs its QMP connection on a thread of its own, made as it
    connects; the process starts its one reader thread per daemon only once every
    daemon has answered its `subscribe` (and a daemon subscribes a client before it
    answers). So its thread count in /proc, the main thread and two per daemon, says
    when an event of either daemon will reach it. It prints nothing before the first
    event, so there is no output to wait for instead."""

    def subscribed() -> bool:
        if stream.poll() is not None:
            _, err = stream.communicate()
            raise AssertionError(f"{stream.args} exited {stream.returncode}: {err}")
        return len(os.listdir(f"/proc/{stream.pid}/task")) >= 1 + 2 * daemons

    wait_until(subscribed, what=f"{stream.args[3:]} to subscribe on {daemons} daemons")


def test_watch_and_trace_see_a_map_happen(pair) -> None:
    watch = pair.popen("watch", "--json", "--count", "2")
    text = pair.popen("watch", "--count", "2")
    trace = pair.popen("trace", "--count", "4")
    wait_subscribed(watch)
    wait_subscribed(text)
    wait_subscribed(trace)
    assert pair("map", "0", "1M", "64K").returncode == 0
    out, err = text.communicate(timeout=PATIENCE)
    assert text.returncode == 0, err
    shown = sorted(re.sub(r"^\d\d:\d\d:\d\d\.\d{3} ", "", line) for line in out.splitlines())
    assert shown == [
        "backend  MAPPED    region 0 0x100000+0x10000 rw",
        "frontend MAPPED    region 0 0x100000+0x10000 rw",
    ], out
    out, err = watch.communicate(timeout=PATIENCE)
    assert watch.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert {(e["source"], e["event"]) for e in events} == {
        ("frontend", Event.MAPPED),
        ("backend", Event.MAPPED),
    }
    # each record in QMP's form, and the daemon it came from
    for e in events:
        assert set(e) == {"event", "data", "timestamp", "source"}, e
        assert set(e["timestamp"]) == {"seconds", "microseconds"}, e
    out, err = trace.communicate(timeout=PATIENCE)
    assert trace.returncode == 0, err
    assert "SHMEM_MAP" in out and "need_reply" in out and "reply 0" in out


def traced_lines(out: str) -> dict[str, list[tuple[str, str, str, str]]]:
    """`shmemctl trace` lines, per daemon in the order it printed them: (direction,
    channel, request, flags) of each message."""
    seen: dict[str, list[tuple[str, str, str, str]]] = {"frontend": [], "backend": []}
    for line in out.splitlines():
        found = re.match(
            r"\d\d:\d\d:\d\d\.\d{3} (\w+) +(->|<-) (\w+) +(\w+)(?: (reply|need_reply)\b)?",
            line,
        )
        assert found, f"not a trace line: {line!r}"
        source, arrow, channel, request, flags = found.groups()
        seen[source].append((arrow, channel, request, flags or ""))
    return seen


def test_trace_shows_each_message_once_on_each_side(pair) -> None:
    """Each message: one line by the daemon that sent it, one by the one that received it,
    and nothing else. --count stops the trace at exactly as many lines as the three
    requests make: a second line of any message but the very last would push another
    message's line out."""
    trace = pair.popen("trace", "--count", "12")
    wait_subscribed(trace)
    assert pair("map", "0", "0", "64K").returncode == 0  # backend channel, back-end first
    assert pair("unmap", "0", "0", "64K").returncode == 0
    assert pair("config").returncode == 0  # main channel, front-end first
    out, err = trace.communicate(timeout=PATIENCE)
    assert trace.returncode == 0, err
    assert traced_lines(out) == {
        "backend": [
            ("->", "backend", "SHMEM_MAP", "need_reply"),
            ("<-", "backend", "SHMEM_MAP", "reply"),
            ("->", "backend", "SHMEM_UNMAP", "need_reply"),
            ("<-", "backend", "SHMEM_UNMAP", "reply"),
            ("<-", "main", "GET_SHMEM_CONFIG", ""),
            ("->", "main", "GET_SHMEM_CONFIG", "reply"),
        ],
        "frontend": [
            ("<-", "backend", "SHMEM_MAP", "need_reply"),
            ("->", "backend", "SHMEM_MAP", "reply"),
            ("<-", "backend", "SHMEM_UNMAP", "need_reply"),
            ("->", "backend", "SHMEM_UNMAP", "reply"),
            ("->", "main", "GET_SHMEM_CONFIG", ""),
            ("<-", "main", "GET_SHMEM_CONFIG", "reply"),
        ],
    }, out


def test_up_twice_is_refused_and_a_stale_directory_is_cleaned(sh, tmp_path) -> None:
    stale = tmp_path / "run" / "other"
    stale.mkdir(parents=True)
    (stale / "frontend.pid").write_text("999999\n")  # no such process
    (stale / "vhost.sock").write_text("left over")
    done = sh("up", "--name", "other")
    assert done.returncode == 0, done.stderr
    done = sh("up", "--name", "other")
    assert done.returncode == 1
    assert "pair other is already up" in done.stderr and "shmemctl down --name other" in done.stderr
    assert sh("map", "--name", "other", "0", "0", "4K").returncode == 0


def test_up_that_cannot_start_shows_the_log(sh) -> None:
    done = sh("up", "--regions", "0=8M", "--shmem-bit", "21", "--timeout", str(PATIENCE))
    # both sides at 21: it works; the pair negotiates SHMEM at the legacy bit
    assert done.returncode == 0, done.stderr
    status = json.loads(sh("status", "--json").stdout)
    assert status["frontend"]["negotiated"]["protocol_features"][-1] == "SHMEM@21"
    sh("down")
    done = sh("up", "--regions", "0=1000")
    assert done.returncode == 2 and "not a multiple of the page size" in done.stderr


def test_explicit_sockets_and_the_wrong_daemon(pair, tmp_path) -> None:
    fe_ctl = str(tmp_path / "run" / "default" / "frontend.ctl")
    be_ctl = str(tmp_path / "run" / "default" / "backend.ctl")
    done = pair("map", "--frontend", fe_ctl, "0", "0", "4K")
    assert done.returncode == 2
    assert "map is the back-end's to do, and no --backend socket was given" in done.stderr
    done = pair("reset", "--yes", "--backend", be_ctl)
    assert done.returncode == 2 and "reset is the front-end's to do" in done.stderr
    done = pair("map", "--backend", fe_ctl, "0", "0", "4K")  # a front-end where a back-end belongs
    assert done.returncode == 1 and "has no 'map' command" in done.stderr
    done = pair("status", "--backend", be_ctl, "--json")
    assert done.returncode == 0 and set(json.loads(done.stdout)) == {"backend"}


def test_scenarios_show_life(pair) -> None:
    done = pair("scenario", "start", "blobs", "--rate", "50", "--seed", "7")
    assert done.returncode == 0, done.stderr
    assert "scenario blobs running on region 0 at 50/s" in done.stdout

    def busy() -> bool:
        # The seed fixes the order of the device's actions, not how many have run when a
        # status or the stop arrives: the scenario keeps its own clock while each CLI call
        # takes as long as the machine makes it. Read-only mappings come and go (with seed
        # 7 none is mapped after actions 36, 41-44, 94-100, 111-120, 125-141, ...: about
        # two seconds in, where the stop used to land), so wait for one to be there.
        fe = json.loads(pair("status", "--json", "--max-mappings", "100").stdout)["frontend"]
        region = fe["regions"][0]
        return (
            region["count"] >= 5
            and fe["counters"]["unmaps"] >= 1
            and any(not m["writable"] for m in region["mappings"])
        )

    wait_until(busy, what="blobs to map (some read-only) and unmap")
    done = pair("scenario", "start", "dax")
    assert done.returncode == 1 and "scenario blobs is running; stop it first" in done.stderr
    done = pair("scenario", "stop")
    assert done.returncode == 0 and "scenario blobs stopped after" in done.stdout
    status = json.loads(pair("status", "--json").stdout)
    assert status["frontend"]["disagreements"] == []

    assert pair("reset", "--yes").returncode == 0
    done = pair("scenario", "start", "dax", "--rate", "50")
    assert done.returncode == 0, done.stderr

    def windows() -> list[dict]:
        fe = json.loads(pair("status", "--json").stdout)["frontend"]
        return fe["regions"][0]["mappings"]

    wait_until(lambda: len(windows()) >= 3, what="dax windows")
    found = windows()
    assert all(m["len"] == 2 * MiB and "shmemctl-dax-" in m["file"] for m in found)
    assert len({m["fd_offset"] for m in found}) == len(found)  # distinct windows of the file
    done = pair("scenario", "start", "dax", "--shmid", "2")
    assert done.returncode == 1


def test_reset_asks_on_a_terminal() -> None:
    runner = CliRunner()
    # CliRunner's stdin is not a terminal: no question, and no daemon either
    result = runner.invoke(main, ["reset", "--name", "nobody-here-at-all"])
    assert result.exit_code == 3


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["map", "0", "lots", "4K"], "write a number of bytes like 4096"),
        (["map", "x", "0", "4K"], "'x' is not a valid integer"),
        (["unmap", "0", "0"], "Missing argument 'LEN'"),
        (["scenario", "start", "fireworks"], "'fireworks' is not one of"),
        (["up", "--name", "../etc"], "use letters, digits"),
    ],
)
def test_usage_errors_exit_2_with_a_reason(args: list[str], words: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert words in result.output


def test_shell_completion_script() -> None:
    result = CliRunner().invoke(main, ["completion", "bash"])
    assert result.exit_code == 0
    assert "_SHMEMCTL_COMPLETE" in result.output and "complete " in result.output


def test_down_kills_nothing_that_is_not_ours(sh, tmp_path) -> None:
    victim = subprocess.Popen(["sleep", "infinity"])  # killed below, however long the test takes
    try:
        run = tmp_path / "run" / "default"
        run.mkdir(parents=True)
        (run / "frontend.pid").write_text(f"{victim.pid}\n")
        done = sh("down")
        assert done.returncode == 0 and "was not up" in done.stdout
        assert victim.poll() is None
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
