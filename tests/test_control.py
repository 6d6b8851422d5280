"""The control protocol against a real front-end process: what a client gets, and
what a hostile local client cannot do to the daemon."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import socket
import stat
import tempfile

import pytest

from shmemctl import __version__
from shmemctl.control import ControlClient, ControlError, ErrorClass, peer_allowed
from shmemctl.control.protocol import MAX_REQUEST
from shmemctl.events import Event
from shmemctl.wire import ShmemMap

from .conftest import PATIENCE, MiB, memfd, qmp_negotiate, recv_lines


@pytest.fixture
def frontend_ctl(driven, tmp_path):
    backend, fe = driven()
    backend.wait_ready()
    return str(tmp_path / "run" / "default" / "frontend.ctl"), backend, fe


def raw(path: str) -> tuple[socket.socket, object]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(PATIENCE)
    sock.connect(path)
    qmp_negotiate(sock)
    return sock, sock.makefile("rb")


def test_greeting_and_status(frontend_ctl) -> None:
    path, _backend, fe = frontend_ctl
    version = {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": f"shmemctl {__version__}"}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    try:
        # QMP's greeting: the version as QEMU gives one, and no capabilities on offer
        assert qmp_negotiate(sock) == {"version": version, "capabilities": []}
    finally:
        sock.close()
    with ControlClient(path) as client:
        assert client.execute("query-version") == version
        commands = {c["name"] for c in client.execute("query-commands")}
        assert {"query-status", "reset", "get-shmem-config", "read", "subscribe",
                "qmp_capabilities", "query-commands", "query-version"} <= commands  # fmt: skip
        assert "status" not in commands
        st = client.execute("query-status")
        assert st["role"] == "frontend"
        assert st["state"] == "connected"
        assert st["negotiated"]["shmem"] is True
        assert "SHMEM" in st["negotiated"]["protocol_features"]
        assert [r["shmid"] for r in st["regions"]] == [0, 2]
        assert st["disagreements"] == []
        assert st["process"]["pid"] == fe.pid


def test_the_socket_and_its_directory_are_private(frontend_ctl) -> None:
    path, _, _ = frontend_ctl
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700


@pytest.mark.parametrize(
    ("line", "error_class", "words"),
    [
        (b"this is not json", ErrorClass.GENERIC, "not JSON"),
        (b"42", ErrorClass.GENERIC, "QMP input must be a JSON object, not 42"),
        (b"[1, 2]", ErrorClass.GENERIC, "QMP input must be a JSON object"),
        (b'{"id": 1}', ErrorClass.GENERIC, "QMP input lacks member 'execute'"),
        (b'{"id": 1, "execute": "format-disk"}', ErrorClass.NOT_FOUND,
         "The command format-disk has not been found on the frontend"),
        (b'{"id": 1, "execute": "read", "arguments": {"shmid": 0}}', ErrorClass.GENERIC,
         "needs the argument 'offset'"),
        (b'{"id": 1, "execute": "read", "arguments": {"shmid": "0", "offset": 0}}',
         ErrorClass.GENERIC, "'shmid' must be int"),
        (b'{"id": 1, "execute": "read", "arguments": {"shmid": true, "offset": 0}}',
         ErrorClass.GENERIC, "'shmid' must be int, not true"),
        (b'{"id": 1, "execute": "reset", "arguments": {"force": 1}}', ErrorClass.GENERIC,
         "reset takes no argument force"),
        (b'{"id": 1, "execute": "query-status", "sudo": true}', ErrorClass.GENERIC,
         "QMP input member 'sudo' is unexpected"),
    ],
)  # fmt: skip
def test_bad_requests_get_specific_errors_and_no_effect(
    frontend_ctl, line: bytes, error_class: str, words: str
) -> None:
    path, _, fe = frontend_ctl
    sock, f = raw(path)
    try:
        sock.sendall(line + b"\n")
        answer = json.loads(f.readline())
        assert answer["error"]["class"] == error_class
        assert words in answer["error"]["desc"]
        # the connection and the daemon carry on
        sock.sendall(b'{"id": 2, "execute": "query-status", "arguments": {"max_mappings": 0}}\n')
        assert json.loads(f.readline())["return"]["state"] == "connected"
    finally:
        sock.close()
    assert "reset" not in fe.log()


def test_subscribing_to_an_unknown_event_is_refused_with_the_known_ones(frontend_ctl) -> None:
    path, backend, _ = frontend_ctl
    sock, f = raw(path)
    try:
        # the names are QMP's, upper case: the lower-case one is no event either
        sock.sendall(b'{"id": 1, "execute": "subscribe", "arguments": {"events": ["MAPPED", '
                     b'"MAPD", "mapped", "MAPD"]}}\n')  # fmt: skip
        answer = json.loads(f.readline())
        assert answer["id"] == 1 and answer["error"]["class"] == ErrorClass.GENERIC
        assert answer["error"]["desc"] == (
            "subscribe: no event 'MAPD', 'mapped'; the events are: " + ", ".join(Event)
        )
        # refused whole: not even the known name is subscribed to
        buf = memfd(MiB)
        try:
            assert backend.map(ShmemMap(0, 0, 4096, 0), (buf,)) == "ok"
        finally:
            os.close(buf)
        sock.sendall(b'{"id": 2, "execute": "query-status", "arguments": {"max_mappings": 0}}\n')
        answer = json.loads(f.readline())  # the next line is the answer, not an event
        assert answer["id"] == 2 and answer["return"]["counters"]["maps"] == 1
    finally:
        sock.close()
    with ControlClient(path) as client, pytest.raises(ControlError, match="no event 'unmaped'"):
        client.subscribe(["unmaped"])


def test_an_oversized_line_is_refused_and_the_client_dropped(frontend_ctl) -> None:
    path, _, fe = frontend_ctl
    sock, f = raw(path)
    try:
        # The daemon may hang up while we are still sending: that is the point.
        with contextlib.suppress(OSError):
            sock.sendall(b"x" * (MAX_REQUEST * 4))
        fe.wait_log(f"request longer than {MAX_REQUEST} bytes; closing")
        # dropped: reading ends (EOF, or a reset since our bytes were left unread)
        try:
            rest = f.read()
        except ConnectionResetError:
            rest = b""
        assert b'"return"' not in rest
    finally:
        sock.close()
    with ControlClient(path) as client:
        assert client.execute("query-status", max_mappings=0)["state"] == "connected"
    assert fe.alive()


def test_a_subscriber_that_never_reads_is_dropped_not_the_daemon(frontend_ctl) -> None:
    path, backend, fe = frontend_ctl
    lazy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    lazy.connect(path)
    qmp_negotiate(lazy)
    lazy.sendall(b'{"id": 1, "execute": "subscribe", "arguments": {"events": ["MESSAGE"]}}\n')
    # the answer: subscribed from here on, and it never reads again
    assert b'"return"' in recv_lines(lazy)[0]
    buf = memfd(MiB)
    hung_up = select.poll()
    hung_up.register(lazy, select.POLLHUP)
    try:
        for _ in range(3000):  # two traced messages per map and per unmap
            assert backend.map(ShmemMap(0, 0, 4096, 0), (buf,)) == "ok"
            assert backend.unmap(ShmemMap(0, 0, 4096)) == "ok"
            if hung_up.poll(0):  # the daemon let go of it (the kernel says, not the log)
                break
        assert hung_up.poll(0), "the lazy subscriber was never dropped"
    finally:
        os.close(buf)
        lazy.close()
    assert "reads too slowly; dropping it" in fe.log()  # and says why, in these words
    with ControlClient(path) as client:
        assert client.execute("query-status", max_mappings=0)["counters"]["maps"] >= 1


def test_many_clients_at_once(frontend_ctl) -> None:
    path, _, _ = frontend_ctl
    clients = [ControlClient(path) for _ in range(12)]
    try:
        for c in clients:
            assert c.execute("query-status", max_mappings=0)["state"] == "connected"
    finally:
        for c in clients:
            c.close()


def test_peer_check_allows_our_uid_and_root_only() -> None:
    assert peer_allowed(os.getuid())
    assert peer_allowed(0)
    assert not peer_allowed(65534 if os.getuid() != 65534 else 65533)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another user")
def test_a_client_of_another_uid_is_refused(spawn, tmp_path) -> None:
    # A control socket another user can reach: the file modes, which normally keep
    # everyone else out, are opened here so that the SO_PEERCRED check is what refuses.
    door = tempfile.mkdtemp(prefix="shmemctl-uid-test-")
    path = os.path.join(door, "ctl", "frontend.ctl")
    fe = spawn("frontend", "--connect", str(tmp_path / "nobody-there.sock"), "--reconnect", "5",
               "--control", path)  # fmt: skip
    fe.wait_status()
    os.chmod(door, 0o755)
    os.chmod(os.path.dirname(path), 0o755)
    os.chmod(path, 0o666)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child becomes nobody and knocks
        try:
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(PATIENCE)
            s.connect(path)
            f = s.makefile("rb")
            greeting = f.readline()  # QMP greets anyone; the first request is refused
            s.sendall(b'{"execute": "qmp_capabilities", "id": 1}\n')
            os.write(write_end, greeting + f.read())  # the answer, then the daemon hangs up
        finally:
            os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(child, 0)
    with os.fdopen(read_end, "rb") as r:
        line = r.read()
    assert os.waitstatus_to_exitcode(status) == 0
    greeting, answer, *rest = line.splitlines()
    assert json.loads(greeting)["QMP"]["capabilities"] == []
    answer = json.loads(answer)
    assert answer["id"] == 1 and answer["error"]["class"] == ErrorClass.GENERIC
    assert answer["error"]["desc"] == (
        f"uid 65534 may not use this frontend's control socket; run as uid {os.getuid()} or root"
    )
    assert rest == []  # and nothing more: the connection is over
    fe.wait_log(r"control: refused pid \d+ of uid 65534")
    shutil.rmtree(door, ignore_errors=True)
