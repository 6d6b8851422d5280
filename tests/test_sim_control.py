"""backend_sim's control commands under a front-end the test plays, answering well and
badly: what a refused, malformed or unanswered request leaves behind (nothing but what
the device can account for), what a client's bad arguments get (a clear error, never an
internal one), and how a reset racing an outstanding map comes out."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from backend_sim.control import BackendState, batch
from backend_sim.device import SimDevice
from backend_sim.presets import DEFAULT, PRESETS
from shmemctl import Pair
from shmemctl.channel import Channel, close_fds
from shmemctl.control import ControlClient, ControlError, ErrorClass
from shmemctl.wire import BackendReq, FrontendReq, Message, ShmemMap
from shmemctl.wire.messages import encode_u64_reply

from .conftest import PATIENCE, MiB, Proc, qmp_negotiate, wait_until
from .test_backend_sim import HandFrontend

PAGE = os.sysconf("SC_PAGE_SIZE")
EEXIST = (1 << 64) - 17
U64 = (1 << 64) - 1


def held_files(pid: int) -> list[str]:
    """The files a backend_sim holds open: its buffers (memfds) and the files behind its
    scenarios. (Sockets come and go with control clients, asynchronously.)"""
    fds = f"/proc/{pid}/fd"
    links = []
    for name in os.listdir(fds):
        try:
            links.append(os.readlink(f"{fds}/{name}"))
        except FileNotFoundError:  # closed while we looked
            continue
    return sorted(
        link
        for link in links
        if link.startswith("/memfd:") or ("shmemctl-" in link and not link.endswith(".log"))
    )


class Sim:
    """A backend_sim process, the front-end the test plays on its main and backend
    channels, and a control client that runs commands in the background so the test
    can answer what they send."""

    def __init__(self, proc: Proc, sock: str, ctl: str) -> None:
        self.proc = proc
        self.sock = sock
        self.ctl = ControlClient(ctl)
        self.pool = ThreadPoolExecutor(1)
        self.fe = HandFrontend(sock)
        self.backend: Channel = self._handshake()

    def _handshake(self) -> Channel:
        """Features and a backend channel, each acked: once it returns, backend_sim is
        serving this connection (it serves one at a time, in order)."""
        offered = self.fe.call(FrontendReq.GET_PROTOCOL_FEATURES).payload
        self.fe.call(FrontendReq.SET_PROTOCOL_FEATURES, offered, need_reply=True)
        backend = self.fe.open_backend_channel()
        wait_until(lambda: self.status()["ready"], what="backend_sim ready for SHMEM requests")
        return backend

    def reconnect(self) -> None:
        """Hang up and connect again, as a front-end that restarts does."""
        self.fe.close()
        self.fe = HandFrontend(self.sock)
        self.backend = self._handshake()

    def status(self) -> dict[str, Any]:
        with ControlClient(self.ctl.path) as client:
            return client.execute("query-status")

    def start(self, name: str, **arguments: Any) -> Future[Any]:
        return self.pool.submit(self.ctl.execute, name, **arguments)

    def request(self) -> Message:
        """The next SHMEM request backend_sim sends; its fds are closed."""
        msg = self.backend.recv(timeout=30)
        close_fds(msg.fds)
        return msg

    def answer(self, req: BackendReq, value: int) -> None:
        self.backend.send(encode_u64_reply(req, value))

    def error_of(self, future: Future[Any]) -> ControlError:
        with pytest.raises(ControlError) as caught:
            future.result(timeout=60)
        assert "internal error" not in caught.value.desc
        return caught.value

    def settled(self) -> None:
        """backend_sim holds no file but those its believed mappings use."""
        want = len({m["buffer"] for m in self.status()["mapped"]})
        wait_until(lambda: len(held_files(self.proc.pid)) == want, 30,
                   f"backend_sim to hold {want} files")  # fmt: skip
        assert len(self.status()["buffers"]) == want

    def close(self) -> None:
        self.ctl.close()
        self.pool.shutdown(cancel_futures=True)
        self.fe.close()


@pytest.fixture
def sim(spawn: Callable[..., Proc], tmp_path: Path) -> Iterator[Callable[..., Sim]]:
    made: list[Sim] = []

    def start(*args: str) -> Sim:
        sock = str(tmp_path / "vhost.sock")
        proc = spawn("backend_sim", "--listen", sock, "--regions", "0=8M,2=64K", *args)
        proc.wait_state("listening")
        made.append(Sim(proc, sock, str(tmp_path / "run/default/backend.ctl")))
        return made[-1]

    yield start
    for s in made:
        s.close()


# ------------------------------------------------------------------ item 2


def test_a_refused_map_leaves_no_buffer(sim: Callable[..., Sim]) -> None:
    s = sim()
    for n in range(50):
        pending = s.start("map", shmid=0, shm_offset=0, len=4096)
        assert s.request().request == BackendReq.SHMEM_MAP
        s.answer(BackendReq.SHMEM_MAP, EEXIST)
        err = s.error_of(pending)
        assert err.error_class == ErrorClass.GENERIC, n
        assert err.desc.startswith("refused by the front-end: EEXIST"), (n, err.desc)
    assert s.status()["buffers"] == []
    s.settled()


def test_a_refused_map_of_512_mib_frees_its_memory(sim: Callable[..., Sim]) -> None:
    s = sim("--regions", "0=1G")
    pending = s.start("map", shmid=0, shm_offset=0, len=512 * MiB)
    s.request()
    s.answer(BackendReq.SHMEM_MAP, 1)
    s.error_of(pending)
    assert s.status()["buffers"] == []
    s.settled()


# ------------------------------------------------------------------ item 3


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        ({"shmid": 0, "shm_offset": 0, "len": 512 << 30}, "ends past region 0's size"),
        ({"shmid": 7, "shm_offset": 0, "len": 4096}, "shmid 7 is not a region"),
        ({"shmid": 0, "shm_offset": 0, "len": 0}, "len is 0"),
        ({"shmid": 0, "shm_offset": 0x1000, "len": 100}, "multiples of the page size"),
        ({"shmid": 0, "shm_offset": U64, "len": 4096}, "overflow 64 bits"),
        ({"shmid": 0, "shm_offset": 0, "len": 4096, "fd_offset": 1 << 40}, "--max-buffer"),
    ],
    ids=["past-the-region", "no-region", "zero", "misaligned", "overflow", "huge-fd-offset"],
)
def test_what_cannot_be_right_is_refused_before_allocating(
    sim: Callable[..., Sim], arguments: dict[str, int], words: str
) -> None:
    s = sim()
    err = s.error_of(s.start("map", **arguments))
    assert err.error_class == ErrorClass.GENERIC
    assert words in err.desc and "not sent" in err.desc
    # nothing reached the front-end, nothing was allocated
    assert not s.backend.wait_readable(0)
    assert s.status()["buffers"] == []
    assert held_files(s.proc.pid) == []


def test_a_buffer_past_max_buffer_is_refused_with_the_option_named(
    sim: Callable[..., Sim],
) -> None:
    s = sim("--max-buffer", "64K")
    err = s.error_of(s.start("map", shmid=0, shm_offset=0, len=128 << 10))
    assert "--max-buffer (64K)" in err.desc
    maps = [{"shmid": 0, "shm_offset": k * (32 << 10), "len": 32 << 10} for k in range(3)]
    err = s.error_of(s.start("batch", maps=maps))
    assert "--max-buffer (64K)" in err.desc and "batch" in err.desc
    assert not s.backend.wait_readable(0)
    # within the cap it goes through
    pending = s.start("map", shmid=0, shm_offset=0, len=64 << 10)
    s.request()
    s.answer(BackendReq.SHMEM_MAP, 0)
    assert pending.result(timeout=60)["result"] == "ok"


# ------------------------------------------------------------------ item 5


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        ({"shmid": 256, "shm_offset": 0, "len": 4096}, "'shmid' must be from 0 to 255, not 256"),
        ({"shmid": -1, "shm_offset": 0, "len": 4096}, "'shmid' must be from 0 to 255, not -1"),
        ({"shmid": 0, "shm_offset": 1 << 64, "len": 4096}, "'shm_offset' must be from 0 to"),
        ({"shmid": 0, "shm_offset": 0, "len": -4096}, "'len' must be from 0 to"),
        ({"shmid": 0, "shm_offset": 0, "len": 1 << 63}, "ends past region 0's size"),
        ({"shmid": 0, "shm_offset": 0, "len": 4096, "buffer": 0}, "'buffer' must be at least 1"),
    ],
    ids=["shmid-256", "shmid-minus-1", "offset-2-64", "negative-len", "len-2-63", "buffer-0"],
)
def test_out_of_range_arguments_are_usage_errors(
    sim: Callable[..., Sim], arguments: dict[str, int], words: str
) -> None:
    s = sim()
    for command in ("map", "unmap", "batch"):
        if command == "unmap":
            args: dict[str, Any] = {k: arguments[k] for k in ("shmid", "shm_offset", "len")}
            if "buffer" in arguments or "ends past" in words:
                continue  # no buffer to name; a long unmap is the front-end's to refuse
        elif command == "batch":
            args = {"maps": [arguments]}
        else:
            args = arguments
        err = s.error_of(s.start(command, **args))
        assert err.error_class == ErrorClass.GENERIC, (command, err.desc)
        assert words in err.desc, (command, err.desc)
    assert not s.backend.wait_readable(0)
    assert s.proc.alive()


def _raw_answer(path: str, line: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(path)
        qmp_negotiate(sock)
        sock.sendall(line + b"\n")
        return json.loads(sock.makefile("rb").readline())


@pytest.mark.parametrize(
    ("line", "words"),
    [
        (b"[" * 5000, "JSON nested more than 16 levels deep"),  # refused before it closes
        (b'{"execute": "query-status", "id": ' + b"[" * 100 + b"]" * 100 + b"}", "nested"),
        (b'{"execute": "query-status", "id": ' + b"9" * 5000 + b"}", "not JSON"),
        (b'{"execute": "query-status", "id": "\xc3("}', "not JSON"),
        (b'{"execute": "query-status", "id": NaN}', "NaN is not a JSON value"),
        (b'{"execute": "query-status", "id": -Infinity}', "-Infinity is not a JSON value"),
        (b'{"execute": "query-status", "id": 1e999}', "1e999 is too large"),
    ],
    ids=["deep-array", "deep-id", "huge-int", "bad-utf8", "nan-id", "infinity-id", "1e999-id"],
)
def test_hostile_lines_get_a_clear_error_on_both_daemons(
    driven, tmp_path: Path, spawn: Callable[..., Proc], line: bytes, words: str
) -> None:
    backend, _fe = driven()
    backend.wait_ready()
    sock = str(tmp_path / "sim.sock")
    be = spawn("backend_sim", "--listen", sock, "--control", str(tmp_path / "be.ctl"))
    be.wait_state("listening")
    for ctl in (tmp_path / "run/default/frontend.ctl", tmp_path / "be.ctl"):
        answer = _raw_answer(str(ctl), line)
        assert answer["error"]["class"] == ErrorClass.GENERIC, answer
        assert words in answer["error"]["desc"], answer
    assert be.alive()


@pytest.mark.parametrize(
    "bad",
    [
        b"\x09\x00\x00\x00\x05\x00\x00\x00\x28\x00\x00\x00" + bytes(40),  # a 40-byte reply
        encode_u64_reply(BackendReq.SHMEM_MAP, 0)[:4] + b"\x04\x00\x00\x00"
        + encode_u64_reply(BackendReq.SHMEM_MAP, 0)[8:],  # flags 0x4: not a reply
        encode_u64_reply(BackendReq.SHMEM_MAP, 0)[:4] + b"\x15\x00\x00\x00"
        + encode_u64_reply(BackendReq.SHMEM_MAP, 0)[8:],  # flags 0x15
        encode_u64_reply(BackendReq.SHMEM_UNMAP, 0),  # the answer to another request
    ],
    ids=["40-byte-reply", "flags-0x4", "flags-0x15", "wrong-request"],
)  # fmt: skip
def test_a_malformed_answer_is_the_front_ends_fault(sim: Callable[..., Sim], bad: bytes) -> None:
    s = sim()
    pending = s.start("map", shmid=0, shm_offset=0, len=64 << 10)
    s.request()
    s.backend.send(bad)
    err = s.error_of(pending)
    assert err.error_class == ErrorClass.GENERIC
    assert "the front-end" in err.desc and "outcome is unknown" in err.desc, err.desc
    # its outcome is unknown: kept, and said to be unconfirmed, so its buffer is accounted for
    (kept,) = s.status()["mapped"]
    assert kept["confirmed"] is False and kept["shm_offset"] == 0
    s.settled()
    # the channel still works
    pending = s.start("map", shmid=0, shm_offset=1 * MiB, len=64 << 10)
    s.request()
    s.answer(BackendReq.SHMEM_MAP, 0)
    assert pending.result(timeout=60)["result"] == "ok"
    # a reset clears what was never confirmed, and its buffer
    s.fe.call(FrontendReq.RESET_DEVICE, need_reply=True)
    assert s.status()["mapped"] == []
    s.settled()
    assert s.status()["buffers"] == []


# ------------------------------------------------------------------ item 6


def test_a_reset_read_before_the_maps_answer_is_settled_with_an_unmap(
    sim: Callable[..., Sim],
) -> None:
    """The front-end resets while a map waits for its answer, then acks the map: it may
    have mapped before its reset (dropped) or after (live). backend_sim unmaps exactly
    that range, and both sides end with nothing there, whatever the answer."""
    s = sim()
    for unmap_answer in (0, (1 << 64) - 2):  # it was mapped after the reset; it was not
        pending = s.start("map", shmid=0, shm_offset=0, len=64 << 10)
        m = s.request()
        assert m.request == BackendReq.SHMEM_MAP
        s.fe.call(FrontendReq.RESET_DEVICE, need_reply=True)  # read by the device first
        s.answer(BackendReq.SHMEM_MAP, 0)
        settle = s.request()
        assert settle.request == BackendReq.SHMEM_UNMAP and settle.need_reply
        assert settle.payload == ShmemMap(0, 0, 64 << 10)
        s.answer(BackendReq.SHMEM_UNMAP, unmap_answer)
        pending.result(timeout=60)
        assert s.status()["mapped"] == []
        s.settled()
        assert s.status()["buffers"] == []


def test_a_map_answered_before_the_reset_is_dropped_without_an_unmap(
    sim: Callable[..., Sim],
) -> None:
    s = sim()
    for _ in range(20):  # the answer is read before or after the reset: both come out right
        pending = s.start("map", shmid=0, shm_offset=0, len=64 << 10)
        s.request()
        s.answer(BackendReq.SHMEM_MAP, 0)
        s.fe.call(FrontendReq.RESET_DEVICE, need_reply=True)
        pending.result(timeout=60)
        assert s.status()["mapped"] == []
        # the next thing on the backend channel is the next map, not an unmap
        pending = s.start("map", shmid=0, shm_offset=1 * MiB, len=4096)
        nxt = s.request()
        assert nxt.request == BackendReq.SHMEM_MAP, nxt.name
        s.answer(BackendReq.SHMEM_MAP, 0)
        pending.result(timeout=60)
        s.fe.call(FrontendReq.RESET_DEVICE, need_reply=True)
    s.settled()
    assert s.status()["buffers"] == []


def test_a_batch_across_a_reset_is_settled_range_by_range(sim: Callable[..., Sim]) -> None:
    s = sim()
    maps = [{"shmid": 0, "shm_offset": k * (64 << 10), "len": 64 << 10} for k in range(3)]
    pending = s.start("batch", maps=maps)
    for _ in maps:
        s.request()
    s.fe.call(FrontendReq.RESET_DEVICE, need_reply=True)
    s.answer(BackendReq.SHMEM_MAP, 0)
    settled = []
    for _ in maps:
        msg = s.request()
        assert msg.request == BackendReq.SHMEM_UNMAP
        settled.append(msg.payload.shm_offset)  # type: ignore[union-attr]
        s.answer(BackendReq.SHMEM_UNMAP, 0)
    assert sorted(settled) == [m["shm_offset"] for m in maps]
    pending.result(timeout=60)
    assert s.status()["mapped"] == []
    s.settled()


def two_map_batch(s: Sim) -> tuple[ShmemMap, ShmemMap, Future[Any]]:
    """A batch of two maps sent, both requests read and neither answered: the first asks
    no answer, the last does."""
    first, last = ShmemMap(0, 0x10000, 0x1000), ShmemMap(0, 0x20000, 0x1000)
    maps = [{"shmid": m.shmid, "shm_offset": m.shm_offset, "len": m.len} for m in (first, last)]
    pending = s.start("batch", maps=maps)
    assert not s.request().need_reply
    assert s.request().need_reply
    return first, last, pending


@pytest.mark.parametrize("then", ["reset", "reconnect"])
def test_a_batch_left_unanswered_is_settled_on_its_own_connection_only(
    sim: Callable[..., Sim], then: str
) -> None:
    """A batch whose last answer made no sense confirms none of its earlier maps. After
    a reset, the next answer on that connection settles them with an UNMAP (§6.13),
    however much later it comes; after a hang-up they went with the connection, and the
    next one is sent no UNMAP of them (§5)."""
    s = sim()
    first, _last, pending = two_map_batch(s)
    s.backend.send(encode_u64_reply(BackendReq.SHMEM_UNMAP, 0))  # the answer to another request
    err = s.error_of(pending)
    assert err.error_class == ErrorClass.GENERIC and "outcome is unknown" in err.desc, err.desc
    if then == "reset":
        s.fe.call(FrontendReq.RESET_DEVICE, need_reply=True)
    else:
        s.reconnect()
    pending = s.start("map", shmid=2, shm_offset=0, len=0x1000)
    assert s.request().request == BackendReq.SHMEM_MAP
    s.answer(BackendReq.SHMEM_MAP, 0)
    if then == "reset":
        settle = s.request()
        assert settle.request == BackendReq.SHMEM_UNMAP and settle.need_reply
        assert settle.payload == ShmemMap(first.shmid, first.shm_offset, first.len)
        s.answer(BackendReq.SHMEM_UNMAP, (1 << 64) - 2)  # ENOENT: the reset had dropped it
    assert pending.result(timeout=60)["result"] == "ok"
    # the settling UNMAP goes out before the map's command returns: nothing else follows
    assert not s.backend.wait_readable(0)
    assert [(m["shmid"], m["shm_offset"]) for m in s.status()["mapped"]] == [(2, 0)]
    s.fe.call(FrontendReq.RESET_DEVICE, need_reply=True)
    s.settled()
    assert s.status()["buffers"] == []


@pytest.mark.parametrize("then", ["hangup-backend", "malformed"])
def test_a_batch_left_unanswered_keeps_its_earlier_maps_unconfirmed(
    sim: Callable[..., Sim], then: str
) -> None:
    """Only the last answer of a batch confirms its earlier maps. When it never comes
    (the front-end hangs up the backend channel, keeping the connection and its
    mappings, then hands over a new one) or makes no sense, whether the front-end even
    read the earlier maps is unknown: the device lists them as unconfirmed, not as
    acknowledged, until a reset."""
    s = sim()
    first, last, pending = two_map_batch(s)
    if then == "hangup-backend":
        s.backend.close()  # unanswered; the main channel goes on
    else:
        s.backend.send(encode_u64_reply(BackendReq.SHMEM_UNMAP, 0))  # another request's answer
    err = s.error_of(pending)
    assert err.error_class == ErrorClass.GENERIC and "outcome is unknown" in err.desc, err.desc
    if then == "hangup-backend":
        s.backend = s.fe.open_backend_channel()
    # the last map went out too: the front-end may hold it, on a connection that lives on
    mapped = {m["shm_offset"]: m["confirmed"] for m in s.status()["mapped"]}
    assert mapped.get(first.shm_offset) is False, mapped
    assert mapped.get(last.shm_offset) is False, mapped
    s.settled()
    s.fe.call(FrontendReq.RESET_DEVICE, need_reply=True)
    assert s.status()["mapped"] == []
    s.settled()
    assert s.status()["buffers"] == []


# ------------------------------------------------------------------ item 10


def test_a_refusal_without_errno_says_so_and_gives_the_devices_own_reading(
    sim: Callable[..., Sim],
) -> None:
    s = sim()
    pending = s.start("map", shmid=0, shm_offset=0, len=64 << 10)
    s.request()
    s.answer(BackendReq.SHMEM_MAP, 1)  # QEMU's answer: no errno
    desc = s.error_of(pending).desc
    assert desc == (
        "refused by the front-end: reply value 1, no reason given; the device sees nothing "
        "wrong with the request; the front-end's log may say why"
    )
    pending = s.start("map", shmid=0, shm_offset=0, len=64 << 10)
    s.request()
    s.answer(BackendReq.SHMEM_MAP, 0)
    pending.result(timeout=60)
    pending = s.start("map", shmid=0, shm_offset=0x8000, len=64 << 10)
    s.request()
    s.answer(BackendReq.SHMEM_MAP, EEXIST)
    desc = s.error_of(pending).desc
    assert desc.startswith("refused by the front-end: EEXIST (reply value -17); ")
    assert "the device's own reading: overlaps 0x0+0x10000" in desc


# ------------------------------------------------------------------ item 4


@pytest.mark.shmem(regions="0=16M")
def test_the_dax_file_is_closed_once_nothing_maps_it(shmem_pair: Pair) -> None:
    """Stopping the dax scenario leaves its windows mapped (stopping is not a reset), so
    the file stays open while they live; the reset that drops them closes it."""
    run, be = shmem_pair.paths, shmem_pair.backend
    with ControlClient(str(run.control("backend"))) as sim_ctl, ControlClient(
        str(run.control("frontend"))
    ) as fe_ctl:
        wait_until(lambda: sim_ctl.execute("query-status")["ready"], what="backend_sim ready")
        for cycle in range(3):
            sim_ctl.execute("scenario-start", name="dax", rate=1000, seed=cycle)
            wait_until(
                lambda: sim_ctl.execute("query-status")["mapped"], what="a dax window mapped"
            )
            sim_ctl.execute("scenario-stop")
            fe_ctl.execute("reset")
            wait_until(lambda: not sim_ctl.execute("query-status")["mapped"], what="the reset")
            assert sim_ctl.execute("query-status")["buffers"] == []
            assert held_files(be.pid) == [], cycle


def test_every_line_sent_before_a_half_close_is_answered(sim: Callable[..., Sim]) -> None:
    """A client that sends its requests and shuts its writing side still reads every
    answer: the daemon flushes them before it closes."""
    s = sim()
    lines = [json.dumps({"execute": "query-status", "id": n}).encode() for n in range(20)]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(60)
        sock.connect(s.ctl.path)
        qmp_negotiate(sock)
        f = sock.makefile("rb")
        sock.sendall(b"\n".join(lines) + b"\n")
        sock.shutdown(socket.SHUT_WR)
        answers = [json.loads(line) for line in f]
    assert [a["id"] for a in answers] == list(range(20))
    assert all("return" in a for a in answers)


def test_a_batch_the_device_could_not_keep_track_of_is_not_sent(sim: Callable[..., Sim]) -> None:
    """Only a batch's last map is answered: an earlier one refused for overlap would be
    refused silently and believed anyway, so such a batch is refused before sending."""
    s = sim()
    twice = [{"shmid": 0, "shm_offset": 0, "len": 0x6000}, {"shmid": 0, "shm_offset": 0x1000,
                                                          "len": 0x1000}]  # fmt: skip
    err = s.error_of(s.start("batch", maps=twice))
    assert err.error_class == ErrorClass.GENERIC and "item 1 overlaps item 0" in err.desc
    pending = s.start("map", shmid=0, shm_offset=0x10000, len=0x1000)
    s.request()
    s.answer(BackendReq.SHMEM_MAP, 0)
    pending.result(timeout=60)
    over = [{"shmid": 0, "shm_offset": 0x10000, "len": 0x1000},
            {"shmid": 0, "shm_offset": 0x20000, "len": 0x1000}]  # fmt: skip
    err = s.error_of(s.start("batch", maps=over))
    assert "batch item 0: the device's own reading: overlaps 0x10000+0x1000" in err.desc
    assert not s.backend.wait_readable(0)
    s.settled()


class _EnteredBy:
    """A device's send lock that tells when a given thread comes to take it."""

    def __init__(self, inner: Any, thread: str) -> None:
        self.inner, self.thread, self.reached = inner, thread, threading.Event()

    def __enter__(self) -> Any:
        if threading.current_thread().name == self.thread:
            self.reached.set()
        return self.inner.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self.inner.__exit__(*exc)


def test_a_batch_checked_while_a_scenarios_map_awaits_its_answer_does_not_replace_it() -> None:
    """A scenario's map waits for its answer; a batch checks its maps against what the
    device believes (nothing there yet) and waits to send. The front-end maps the
    scenario's range, then silently refuses the batch's first map, which starts at the
    same offset. The device must still believe what the front-end holds: a belief
    replaced by the refused map leaves a mapping nobody can unmap (fuzz, control-backend)."""
    held: list[tuple[int, int]] = []
    answer = threading.Event()
    in_flight = threading.Event()

    def shmem_request(req: BackendReq, m: ShmemMap, fd: int | None = None, *,
                      need_reply: bool = True, guard: Any = None,
                      channel: Any = None) -> int | None:  # fmt: skip
        assert req == BackendReq.SHMEM_MAP
        if m.len == 0x10000:  # the scenario's map: answered when the test says
            in_flight.set()
            assert answer.wait(PATIENCE)
        else:  # the batch's maps: only once the scenario's mapping is believed
            wait_until(lambda: (0, 0x4000) in device.mapped, what="the scenario's belief")
        if any(o < m.shm_offset + m.len and m.shm_offset < o + n for o, n in held):
            return EEXIST if need_reply else None
        held.append((m.shm_offset, m.len))
        return 0 if need_reply else None

    endpoint = SimpleNamespace(
        backend_channel=None, shmem_request=shmem_request,
        device=SimpleNamespace(regions={0: 8 * MiB}, faults=frozenset()),
        events=SimpleNamespace(active=False),
    )  # fmt: skip
    device = SimDevice(endpoint)  # type: ignore[arg-type]
    sending = device._sending = _EnteredBy(device._sending, "batch")  # type: ignore[assignment]
    st = BackendState(endpoint, device, "", "test", PRESETS[DEFAULT])  # type: ignore[arg-type]
    outcome: list[object] = []

    def run_batch() -> None:
        maps = [{"shmid": 0, "shm_offset": 0x4000, "len": 0x1000},
                {"shmid": 0, "shm_offset": 0x20000, "len": 0x1000}]  # fmt: skip
        try:
            outcome.append(batch(st, maps))
        except ControlError as exc:
            outcome.append(exc)

    scenario = threading.Thread(target=device.map, args=(ShmemMap(0, 0x4000, 0x10000),))
    scenario.start()
    try:
        assert in_flight.wait(PATIENCE)
        batcher = threading.Thread(target=run_batch, name="batch")
        batcher.start()
        assert sending.reached.wait(PATIENCE)  # checked, and waiting to send
        answer.set()
        scenario.join(PATIENCE)
        batcher.join(PATIENCE)
        believed = {(b.shm_offset, b.len) for b in device.mapped.values()}
        assert set(held) <= believed, f"held {held}, believed {believed}"
        assert isinstance(outcome[0], ControlError), outcome
        assert outcome[0].error_class == ErrorClass.GENERIC
        assert "refused silently" in outcome[0].desc
    finally:
        answer.set()
        device.close()


@pytest.mark.shmem(regions="0=8M")
def test_a_summary_status_counts_what_it_does_not_list(shmem_pair: Pair) -> None:
    """`max_mappings` bounds the lists (what `ls`, metrics and the console ask: a device
    believing 65,536 mappings would answer megabytes), and the counts stay whole."""
    for k in range(3):
        shmem_pair.backend.map(0, k * 0x10000, 4096)
    whole = shmem_pair.backend.execute("query-status")
    brief = shmem_pair.backend.execute("query-status", max_mappings=1)
    assert len(whole["mapped"]) == whole["mapped_count"] == brief["mapped_count"] == 3
    assert len(whole["buffers"]) == whole["buffer_count"] == brief["buffer_count"] == 3
    assert [m["buffer"] for m in brief["mapped"]] == [whole["mapped"][0]["buffer"]]
    assert len(brief["buffers"]) == 1
    assert shmem_pair.backend.execute("query-status", max_mappings=0)["mapped"] == []
