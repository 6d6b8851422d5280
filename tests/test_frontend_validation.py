"""Every SHMEM_MAP/UNMAP rule of docs/protocol.md §5, sent to a real front-end process over a real
backend channel; after each refusal the kernel must show nothing new and no fd kept."""

from __future__ import annotations

import errno
import os
import socket

import pytest

from shmemctl.shmem.libc import read_memory
from shmemctl.shmem.procmaps import Segment
from shmemctl.wire import BackendReq, ShmemMap, encode_shmem_request

from .conftest import PAGE, MiB, fd_count, memfd, read_mem, region_bases, segments, write_mem

U64 = (1 << 64) - 1


@pytest.fixture
def pair(driven):
    backend, fe = driven()
    backend.wait_ready()
    bases = region_bases(fe)
    buf = memfd(4 * MiB, b"hello from the back-end")
    # One mapping every refusal must leave exactly as it is.
    assert backend.map(ShmemMap(0, 0, MiB, 0), (buf,)) == "ok"
    st = os.fstat(buf)
    before = segments(fe.pid, bases[0], 8 * MiB)
    assert before == [
        Segment(0, MiB, "rw", st.st_ino, 0, st.st_dev),
        Segment(MiB, 8 * MiB, "none"),
    ]
    baseline = fd_count(fe.pid)
    yield backend, fe, bases, buf, before, baseline
    os.close(buf)


REFUSED_MAPS = [
    pytest.param(ShmemMap(0, 0x80000, MiB, 0), "EEXIST", id="overlap-start"),
    pytest.param(ShmemMap(0, 0, PAGE, 0), "EEXIST", id="overlap-same-start"),
    pytest.param(ShmemMap(0, 7 * MiB, 2 * MiB, 0), "EINVAL", id="out-of-bounds"),
    pytest.param(ShmemMap(0, 8 * MiB, PAGE, 0), "EINVAL", id="starts-at-end"),
    pytest.param(ShmemMap(0, 2 * MiB, 0, 0), "EINVAL", id="zero-length"),
    pytest.param(ShmemMap(0, 2 * MiB + 1, PAGE, 0), "EINVAL", id="misaligned-shm-offset"),
    pytest.param(ShmemMap(0, 2 * MiB, PAGE, 1), "EINVAL", id="misaligned-fd-offset"),
    pytest.param(ShmemMap(0, 2 * MiB, PAGE + 1, 0), "EINVAL", id="misaligned-len"),
    pytest.param(ShmemMap(0, U64 - PAGE + 1, 2 * PAGE, 0), "EOVERFLOW", id="overflow-shm"),
    pytest.param(ShmemMap(0, 2 * MiB, 2 * PAGE, U64 - PAGE + 1), "EOVERFLOW", id="overflow-fd"),
    pytest.param(ShmemMap(5, 0, PAGE, 0), "ENODEV", id="unknown-shmid"),
    pytest.param(ShmemMap(1, 0, PAGE, 0), "ENODEV", id="zero-size-shmid"),
    pytest.param(ShmemMap(0, 2 * MiB, PAGE, 0, flags=0x2), "EINVAL", id="unknown-flag-bit1"),
    pytest.param(ShmemMap(0, 2 * MiB, PAGE, 0, flags=1 << 63), "EINVAL", id="unknown-flag-bit63"),
    pytest.param(ShmemMap(0, 2 * MiB, 2 * MiB, 3 * MiB), "ENXIO", id="file-too-short"),
]


@pytest.mark.parametrize(("request_", "expected"), REFUSED_MAPS)
def test_refused_map_changes_nothing(pair, request_: ShmemMap, expected: str) -> None:
    backend, fe, bases, buf, before, baseline = pair
    assert backend.map(request_, (buf,)) == expected
    assert segments(fe.pid, bases[0], 8 * MiB) == before
    assert fd_count(fe.pid) == baseline
    assert fe.alive()


def test_map_needs_exactly_one_fd(pair) -> None:
    backend, fe, bases, buf, before, baseline = pair
    m = ShmemMap(0, 2 * MiB, PAGE, 0)
    assert backend.map(m, ()) == "EBADF"
    two = memfd(PAGE)
    try:
        assert backend.map(m, (buf, two)) == "EBADF"
        assert backend.map(m, (buf,) * 8) == "EBADF"
    finally:
        os.close(two)
    assert segments(fe.pid, bases[0], 8 * MiB) == before
    assert fd_count(fe.pid) == baseline


def test_unmappable_fds_are_refused_by_the_kernel_cleanly(pair, tmp_path) -> None:
    backend, fe, bases, _buf, before, baseline = pair
    a, b = socket.socketpair()
    directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert backend.map(ShmemMap(0, 2 * MiB, PAGE, 0), (a.fileno(),)) == "ENODEV"
        # read-only, so the kernel gets past the access check to the file type
        assert backend.map(ShmemMap(0, 2 * MiB, PAGE, 0, flags=0), (directory,)) == "ENODEV"
    finally:
        a.close()
        b.close()
        os.close(directory)
    assert segments(fe.pid, bases[0], 8 * MiB) == before
    assert fd_count(fe.pid) == baseline


def test_read_write_map_of_read_only_fd_is_refused(pair, tmp_path) -> None:
    backend, fe, _bases, _buf, _before, baseline = pair
    path = tmp_path / "file"
    path.write_bytes(b"x" * PAGE)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert backend.map(ShmemMap(0, 2 * MiB, PAGE, 0), (fd,)) == "EACCES"
        assert backend.map(ShmemMap(0, 2 * MiB, PAGE, 0, flags=0), (fd,)) == "ok"
    finally:
        os.close(fd)
    assert fd_count(fe.pid) == baseline


REFUSED_UNMAPS = [
    pytest.param(ShmemMap(0, 0, MiB // 2), "ENOENT", id="partial"),
    pytest.param(ShmemMap(0, 0x80000, MiB // 2), "ENOENT", id="inside"),
    pytest.param(ShmemMap(0, 0, 2 * MiB), "ENOENT", id="spanning-into-a-hole"),
    pytest.param(ShmemMap(0, 4 * MiB, PAGE), "ENOENT", id="a-hole"),
    pytest.param(ShmemMap(0, 0, 9 * MiB), "EINVAL", id="out-of-bounds"),
    pytest.param(ShmemMap(0, 0, 0), "EINVAL", id="zero-length"),
    pytest.param(ShmemMap(9, 0, PAGE), "ENODEV", id="unknown-shmid"),
    pytest.param(ShmemMap(0, U64 - PAGE + 1, 2 * PAGE), "EOVERFLOW", id="overflow"),
]


@pytest.mark.parametrize(("request_", "expected"), REFUSED_UNMAPS)
def test_refused_unmap_changes_nothing(pair, request_: ShmemMap, expected: str) -> None:
    backend, fe, bases, _buf, before, baseline = pair
    assert backend.unmap(request_) == expected
    assert segments(fe.pid, bases[0], 8 * MiB) == before
    assert fd_count(fe.pid) == baseline


def test_unmap_spanning_two_mappings_is_refused(pair) -> None:
    backend, fe, bases, buf, _before, baseline = pair
    assert backend.map(ShmemMap(0, MiB, MiB, MiB), (buf,)) == "ok"
    two = segments(fe.pid, bases[0], 8 * MiB)
    assert backend.unmap(ShmemMap(0, 0, 2 * MiB)) == "ENOENT"
    assert segments(fe.pid, bases[0], 8 * MiB) == two
    assert fd_count(fe.pid) == baseline


def test_unmap_restores_the_reservation_and_a_stray_fd_is_closed(pair) -> None:
    backend, fe, bases, buf, _before, baseline = pair
    stray = memfd(PAGE)
    try:
        assert backend.unmap(ShmemMap(0, 0, MiB), (stray,)) == "ok"
    finally:
        os.close(stray)
    assert segments(fe.pid, bases[0], 8 * MiB) == [Segment(0, 8 * MiB, "none")]
    assert fd_count(fe.pid) == baseline
    # and the range can be mapped again
    assert backend.map(ShmemMap(0, 0, MiB, 0), (buf,)) == "ok"


def test_content_flows_both_ways_and_read_only_is_enforced(pair) -> None:
    backend, fe, bases, buf, _before, _baseline = pair
    base = bases[0]
    assert read_mem(fe.pid, base, 23) == b"hello from the back-end"
    os.pwrite(buf, b"written later by the back-end", PAGE)
    assert read_mem(fe.pid, base + PAGE, 29) == b"written later by the back-end"
    write_mem(fe.pid, base + 2 * PAGE, b"guest write")
    assert os.pread(buf, 11, 2 * PAGE) == b"guest write"

    assert backend.map(ShmemMap(2, 0, 64 << 10, 0, flags=0), (buf,)) == "ok"
    ro = bases[2]
    assert [s.access for s in segments(fe.pid, ro, 64 << 10)] == ["ro"]
    assert read_mem(fe.pid, ro, 23) == b"hello from the back-end"
    # The kernel refuses even a forced write into a read-only shared mapping.
    with pytest.raises(OSError):
        write_mem(fe.pid, ro, b"nope")
    # A reserved range is not readable (process_vm_readv honours protections).
    assert read_memory(base, 5, fe.pid) == b"hello"
    with pytest.raises(OSError):
        read_memory(base + 4 * MiB, 1, fe.pid)


def test_map_without_shmem_negotiated_is_refused(driven) -> None:
    backend, fe = driven(None, "--shmem-bit", "21")
    assert "does not offer SHMEM" in fe.log()
    buf = memfd(PAGE)
    try:
        # SHMEM is off, but the backend channel exists: a MAP must still be answered, failed.
        assert backend.endpoint.backend_channel is not None
        # EOPNOTSUPP; Linux gives it the same number as ENOTSUP, Python's name for it
        assert backend.map(ShmemMap(0, 0, PAGE, 0), (buf,)) == errno.errorcode[errno.EOPNOTSUPP]
    finally:
        os.close(buf)
    assert "refused SHMEM_MAP" in fe.log()


def test_batch_one_ack_confirms_all_and_earlier_failures_stay_silent(pair) -> None:
    backend, fe, bases, buf, _before, baseline = pair
    send = backend.send_raw
    req = BackendReq.SHMEM_MAP
    send(encode_shmem_request(req, ShmemMap(0, 2 * MiB, PAGE, 0), need_reply=False), (buf,))
    # overlaps the first mapping: fails, silently
    send(encode_shmem_request(req, ShmemMap(0, 0, PAGE, 0), need_reply=False), (buf,))
    send(encode_shmem_request(req, ShmemMap(0, 3 * MiB, PAGE, 0), need_reply=True), (buf,))
    assert backend.reply() == 0
    # exactly one reply for the batch: replies come in order, so the next one is the next
    # request's (an unmap of nothing), not a late answer to a map of the batch
    assert backend.unmap(ShmemMap(0, 5 * MiB, PAGE)) == "ENOENT", "one reply for the batch"
    accesses = [(s.start, s.access) for s in segments(fe.pid, bases[0], 8 * MiB)]
    assert (2 * MiB, "rw") in accesses and (3 * MiB, "rw") in accesses
    assert fd_count(fe.pid) == baseline
