"""The mmap engine in this process: real reservations, real MAP_FIXED, checked in
/proc/self/maps; the interval index against a brute-force model."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmemctl.shmem import Refusal, RegionTable, ShmemRefused, ShmemSetupError
from shmemctl.shmem.index import IntervalIndex
from shmemctl.shmem.mapping import Mapping
from shmemctl.shmem.procmaps import disagreements, read_maps
from shmemctl.wire import ShmemMap

PAGE = os.sysconf("SC_PAGE_SIZE")

# ------------------------------------------------------------------ the index

ops = st.lists(
    st.tuples(st.sampled_from(["add", "pop"]), st.integers(0, 64), st.integers(1, 8)),
    max_size=80,
)


@settings(max_examples=300)
@given(
    ops=ops,
    probes=st.lists(st.tuples(st.integers(0, 72), st.integers(1, 10)), max_size=20),
    load=st.sampled_from([1, 2, 4, 512]),
)
def test_index_matches_a_brute_force_model(ops, probes, load: int) -> None:
    # tiny block sizes make blocks split and empty out all the time
    index: IntervalIndex[str] = IntervalIndex(load)
    model: dict[int, int] = {}  # start -> end

    def model_conflict(a: int, b: int) -> tuple[int, int] | None:
        hits = sorted((s, e) for s, e in model.items() if a < e and s < b)
        return hits[0] if hits else None

    for op, start, length in ops:
        end = start + length
        if op == "add":
            hit = index.conflict(start, end)
            expected = model_conflict(start, end)
            assert (hit is None) == (expected is None)
            if hit is None:
                index.add(start, end, f"{start}")
                model[start] = end
            else:
                # whatever the index names must really overlap
                assert hit[0] < end and start < hit[1]
        elif start in model:
            assert index.pop(start) == f"{start}"
            del model[start]
        assert len(index) == len(model)
        assert [(s, e) for s, e, _ in index] == sorted(model.items())
    for start, length in probes:
        hit = index.conflict(start, start + length)
        assert (hit is None) == (model_conflict(start, start + length) is None)


# ------------------------------------------------------------------ the regions


@pytest.fixture
def buf():
    fd = os.memfd_create("engine-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, 64 * PAGE)
    yield fd
    os.close(fd)


@pytest.fixture
def table():
    t = RegionTable({0: 64 * PAGE, 3: 16 * PAGE})
    yield t
    t.close()


def truth(t: RegionTable) -> list[str]:
    lines = read_maps()
    out = []
    for shmid, region in t.regions.items():
        mine = [m for m in t.mappings() if m.shmid == shmid]
        out += disagreements(lines, shmid, region.base, region.size, mine)
    return out


@settings(max_examples=40, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.booleans(),
            st.sampled_from([0, 3]),
            st.integers(0, 20),
            st.integers(1, 6),
            st.booleans(),
        ),
        max_size=40,
    )
)
def test_random_maps_and_unmaps_match_the_model_and_the_kernel(steps) -> None:
    fd = os.memfd_create("engine-prop", os.MFD_CLOEXEC)
    os.ftruncate(fd, 64 * PAGE)
    t = RegionTable({0: 64 * PAGE, 3: 16 * PAGE})
    model: dict[tuple[int, int], int] = {}
    try:
        for is_map, shmid, page, pages, writable in steps:
            m = ShmemMap(shmid, page * PAGE, pages * PAGE, page * PAGE, int(writable))
            size = t.regions[shmid].size
            end = m.shm_offset + m.len
            if is_map:
                clash = any(
                    s == shmid and o < end and m.shm_offset < o + ln for (s, o), ln in model.items()
                )
                ok = end <= size and not clash
                try:
                    t.map(m, fd)
                    assert ok
                    model[(shmid, m.shm_offset)] = m.len
                except ShmemRefused as exc:
                    assert not ok, exc
            else:
                ok = model.get((shmid, m.shm_offset)) == m.len and end <= size
                try:
                    t.unmap(m)
                    assert ok
                    del model[(shmid, m.shm_offset)]
                except ShmemRefused as exc:
                    assert not ok, exc
            assert t.count == len(model)
        assert truth(t) == []
        assert t.reset() == len(model)
        assert truth(t) == []
    finally:
        t.close()
        os.close(fd)


def test_limits_refuse_cleanly(buf) -> None:
    t = RegionTable({0: 64 * PAGE, 1: 64 * PAGE}, max_per_region=2, max_total=3)
    try:
        t.map(ShmemMap(0, 0, PAGE, 0), buf)
        t.map(ShmemMap(0, PAGE, PAGE, 0), buf)
        with pytest.raises(ShmemRefused) as info:
            t.map(ShmemMap(0, 2 * PAGE, PAGE, 0), buf)
        assert info.value.reason is Refusal.LIMIT_REACHED and info.value.errno_name == "ENOSPC"
        t.map(ShmemMap(1, 0, PAGE, 0), buf)
        with pytest.raises(ShmemRefused) as info:
            t.map(ShmemMap(1, PAGE, PAGE, 0), buf)
        assert "limits are 2 and 3" in info.value.detail
        assert t.count == 3 and truth(t) == []
    finally:
        t.close()


def test_a_failed_mmap_leaves_the_reservation(table, tmp_path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(ShmemRefused) as info:
            table.map(ShmemMap(0, 0, PAGE, 0, flags=0), fd)
    finally:
        os.close(fd)
    assert info.value.reason is Refusal.MMAP_FAILED and info.value.errno_name == "ENODEV"
    assert table.count == 0 and truth(table) == []


def test_each_refusal_names_what_would_be_right(table, buf) -> None:
    table.map(ShmemMap(0, 0, 4 * PAGE, 0), buf)
    cases = {
        ShmemMap(0, 0, PAGE, 0): "overlaps 0x0+0x4000; unmap it first",
        ShmemMap(0, 64 * PAGE, PAGE, 0): "ends past region 0's size 0x40000",
        ShmemMap(0, 8 * PAGE, 100, 0): "must be multiples of the page size 0x1000",
        ShmemMap(7, 0, PAGE, 0): "shmid 7 is not a region of this device (regions: 0, 3)",
        ShmemMap(0, 8 * PAGE, PAGE, 64 * PAGE): "the file is 0x40000 bytes",
        ShmemMap(0, 8 * PAGE, PAGE, 0, flags=4): "only bit 0 (read-write) is defined",
    }
    for m, words in cases.items():
        with pytest.raises(ShmemRefused) as info:
            table.map(m, buf)
        assert words in info.value.detail
    with pytest.raises(ShmemRefused) as info:
        table.unmap(ShmemMap(0, PAGE, PAGE))
    assert "is not one whole mapping; the mapping there is 0x0+0x4000" in info.value.detail


@pytest.mark.parametrize(
    ("sizes", "words"),
    [
        ({0: PAGE + 1}, "not a multiple of the page size"),
        ({0: 1 << 63}, "the limit is"),
        ({i: 1 << 40 for i in range(256)}, "the limit is"),
    ],
)
def test_layouts_that_cannot_be_set_up(sizes: dict[int, int], words: str) -> None:
    with pytest.raises(ShmemSetupError, match=words):
        RegionTable(sizes)


def test_close_gives_the_address_space_back(buf) -> None:
    t = RegionTable({0: 64 * PAGE})
    base = t.regions[0].base
    t.map(ShmemMap(0, 0, PAGE, 0), buf)
    t.close()
    assert not any(line.start <= base < line.end for line in read_maps())


# ---------------------------------------------------------------- the one mapping record


@given(
    st.builds(
        Mapping,
        shmid=st.integers(0, 255),
        shm_offset=st.integers(0, 2**64 - 1),
        len=st.integers(1, 2**64 - 1),
        fd_offset=st.integers(0, 2**64 - 1),
        writable=st.booleans(),
        file=st.text(max_size=20),
        dev=st.builds(os.makedev, st.integers(0, 4095), st.integers(0, 2**20 - 1)),
        ino=st.integers(0, 2**63),
        created=st.floats(1.0, 2e9),
        buffer=st.integers(0, 1000),
        confirmed=st.booleans(),
    )
)
def test_a_mapping_reads_back_from_its_json_form(m: Mapping) -> None:
    now = 2.5e9
    back = Mapping.from_json(json.loads(json.dumps(m.to_json(now))), now)
    # what the form leaves out when it is not known comes back as "not known"
    expected = m._replace(
        dev=m.dev if m.ino else 0,
        confirmed=m.confirmed if m.buffer else True,
        created=pytest.approx(m.created, abs=1e-3),  # ages are kept to the millisecond
    )
    assert back == expected


def test_a_mapping_is_granted_as_its_request_asks() -> None:
    request = ShmemMap(2, 0x4000, 0x2000, 0x1000, 0)
    m = Mapping.granted(request, dev=os.makedev(0, 1), ino=7, created=1.0)
    assert (m.end, m.writable, m.ino, m.request()) == (0x6000, False, 7, request)
    assert m.to_json() == {"shmid": 2, "shm_offset": 0x4000, "len": 0x2000, "fd_offset": 0x1000,
                           "writable": False, "dev": "00:01", "ino": 7}  # fmt: skip
