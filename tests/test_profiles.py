"""The front-end profiles in memory: each one's behaviour on the wire, against our
device session, without a socket (docs/protocol.md §8)."""

from __future__ import annotations

import contextlib
import errno

import pytest

from shmemctl.session import (
    PROFILES,
    BackendSession,
    DropMappings,
    Forget,
    FrontendSession,
    HandshakeError,
    OpenBackendChannel,
    Outgoing,
)
from shmemctl.session.profiles import GUEST_RAM_SIZE, SHMEM_BAR_GPA
from shmemctl.shmem.rules import Refusal, ShmemRefused
from shmemctl.wire import BackendReq, FrontendReq, ShmemMap
from shmemctl.wire.constants import SHMEM_BIT
from shmemctl.wire.messages import MemoryRegion, SingleMemoryRegion, VringState

from .test_sessions import BACKEND, FAKE_FD, GUEST_RAM_ADDR, MAIN, Pair, request

#: A layout QEMU takes: page multiples adding up to a power of two (one BAR).
LAYOUT = {0: 4 << 20, 2: 4 << 20}


def device_with(regions: dict[int, int]) -> BackendSession:
    return BackendSession(regions, shmem_bit=SHMEM_BIT)


def pair(profile: str) -> Pair:
    p = Pair(front=FrontendSession(shmem_bit=SHMEM_BIT, profile=PROFILES[profile]),
             back=device_with(LAYOUT))  # fmt: skip
    p.handshake()
    return p


def shmem(req: BackendReq, shmid: int = 0, offset: int = 0, length: int = 0x10000):
    m = ShmemMap(shmid, offset, length, 0, 1)
    fds = (FAKE_FD + 7,) if req == BackendReq.SHMEM_MAP else ()
    return request(BACKEND, req, m, need_reply=True, fds=fds)


def test_strict_is_the_handshake_it_always_was() -> None:
    p = pair("strict")
    assert p.requests == ["GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES",
                          "GET_QUEUE_NUM", "SET_OWNER", "GET_SHMEM_CONFIG",
                          "SET_BACKEND_REQ_FD", "SET_FEATURES"]  # fmt: skip
    refused = ShmemRefused(Refusal.OVERLAP, "overlaps")
    assert p.front.result(refused) == -errno.EEXIST and p.front.result(None) == 0
    assert p.front.announcement(shmem(BackendReq.SHMEM_MAP), 0x1000) is None


def test_qemu_realizes_then_starts_the_device_as_a_booted_guest() -> None:
    p = pair("qemu")
    # realize (hw/virtio/vhost-user.c), then the guest's DRIVER_OK (vhost_dev_start)
    assert p.requests == [
        "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM",
        "GET_MAX_MEM_SLOTS", "SET_BACKEND_REQ_FD", "SET_OWNER", "SET_VRING_CALL",
        "SET_VRING_ERR", "GET_SHMEM_CONFIG", "SET_FEATURES", "ADD_MEM_REG", "SET_VRING_NUM",
        "SET_VRING_ADDR", "SET_VRING_BASE", "SET_VRING_KICK", "SET_VRING_CALL",
        "SET_VRING_ENABLE", "GET_STATUS", "SET_STATUS",
    ]  # fmt: skip
    neg = p.front.negotiated
    assert neg.started and neg.mem_slots is not None and neg.mem_slots > 0
    assert p.observer.violations == []
    # guest RAM went over as one slot, with the driver's fd and address
    (ram,) = [m for m in p.sent if m.request == FrontendReq.ADD_MEM_REG]
    assert ram.payload == SingleMemoryRegion(MemoryRegion(0, GUEST_RAM_SIZE, GUEST_RAM_ADDR, 0))
    assert ram.fds == (FAKE_FD + 50,) and ram.need_reply
    (enabled,) = [m for m in p.sent if m.request == FrontendReq.SET_VRING_ENABLE]
    assert enabled.payload == VringState(0, 1)
    (status,) = [m for m in p.sent if m.request == FrontendReq.SET_STATUS]
    assert status.payload == 0xF  # ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK


def test_qemu_answers_1_for_any_refusal_and_announces_each_mapping() -> None:
    p = pair("qemu")
    for reason in (Refusal.OVERLAP, Refusal.OUT_OF_BOUNDS, Refusal.NOT_STARTED):
        assert p.front.result(ShmemRefused(reason, "no")) == 1  # never an errno
    mapped = shmem(BackendReq.SHMEM_MAP, shmid=2, offset=0x2000, length=0x1000)
    out = p.front.announcement(mapped, userspace_addr=0x5000)
    assert out is not None and out.request == FrontendReq.ADD_MEM_REG
    assert out.need_reply and out.fds == (FAKE_FD + 7,)  # the mapped fd, and it waits
    # region 2 sits after region 0 in the one BAR: BAR base + 4M + its offset
    assert out.payload == SingleMemoryRegion(
        MemoryRegion(SHMEM_BAR_GPA + LAYOUT[0] + 0x2000, 0x1000, 0x5000, 0)
    )
    assert p.exchange(out) is not None  # our device acks it: it serves its main channel
    gone = p.front.announcement(shmem(BackendReq.SHMEM_UNMAP, 2, 0x2000, 0x1000), 0x5000)
    assert gone is not None and gone.request == FrontendReq.REM_MEM_REG and gone.fds == ()


def test_qemu_refuses_a_layout_that_does_not_pack_into_one_power_of_two_bar() -> None:
    p = Pair(front=FrontendSession(shmem_bit=SHMEM_BIT, profile=PROFILES["qemu"]),
             back=device_with({0: 8 << 20, 2: 64 << 10}))  # fmt: skip
    with pytest.raises(HandshakeError, match="not a power of two"):
        p.handshake()
    fits = Pair(front=FrontendSession(shmem_bit=SHMEM_BIT, profile=PROFILES["qemu"]),
                back=device_with({0: 4 << 20, 2: 4 << 20}))  # fmt: skip
    fits.handshake()
    assert fits.front.negotiated.started
    # the strict front-end takes the first layout: nothing in the protocol forbids it
    strict = Pair(front=FrontendSession(shmem_bit=SHMEM_BIT),
                  back=device_with({0: 8 << 20, 2: 64 << 10}))  # fmt: skip
    strict.handshake()
    config = strict.front.negotiated.config
    assert config is not None and config.regions() == {0: 8 << 20, 2: 64 << 10}


def test_qemu_maps_only_into_a_started_device_and_does_not_ask_for_shmem() -> None:
    front = FrontendSession(shmem_bit=SHMEM_BIT, profile=PROFILES["qemu"])
    with pytest.raises(ShmemRefused) as refused:  # the guest has not started it yet
        front.negotiated.shmem = False
        front.admit_shmem(shmem(BackendReq.SHMEM_MAP))
    assert refused.value.reason is Refusal.NOT_STARTED
    front.negotiated.started = True  # no SHMEM negotiated: QEMU does not look
    assert front.admit_shmem(shmem(BackendReq.SHMEM_MAP)).len == 0x10000


def test_a_qemu_guest_reset_stops_the_rings_drops_everything_and_starts_again() -> None:
    p = pair("qemu")
    mapped = shmem(BackendReq.SHMEM_MAP, shmid=0, offset=0x10000, length=0x1000)
    announced = p.front.announcement(mapped, userspace_addr=0x9000)
    assert announced is not None and p.exchange(announced) is not None
    p.requests.clear()
    p.sent.clear()
    p.effects.clear()
    via = p.run(p.front.reset())
    assert via == "SET_VRING_ENABLE"
    assert DropMappings() in p.effects  # every mapping, without a word to the device...
    assert p.requests[:2] == ["SET_VRING_ENABLE", "GET_VRING_BASE"]
    assert p.sent[0].payload == VringState(0, 0)  # the ring stops
    assert "RESET_DEVICE" not in p.requests and "SET_STATUS" in p.requests[2:]  # booted again
    # ... until the guest starts it again: the table then loses the mapping, and guest
    # RAM, which the device holds already, is not added twice
    assert p.requests[2] == "REM_MEM_REG" and p.sent[2].payload == announced.payload
    assert "ADD_MEM_REG" not in p.requests
    assert p.front.negotiated.started


def test_a_qemu_device_start_and_unmaps_answered_meanwhile_tell_each_mapping_gone_once() -> None:
    """A device start after a guest reset takes back the mappings the reset dropped, one
    REM_MEM_REG each, waiting for each ack; a driver that serves the backend channel
    meanwhile may announce an unmap of one of them. Whichever comes first tells the
    device; the other has nothing left to tell (and the start does not trip over it)."""
    p = pair("qemu")
    where = {0x10000: 0x9000, 0x20000: 0xA000}  # shm_offset: userspace address
    for offset, addr in where.items():
        out = p.front.announcement(shmem(BackendReq.SHMEM_MAP, 0, offset, 0x1000), addr)
        assert out is not None and p.exchange(out) is not None
    p.sent.clear()
    start = p.front.start_device()
    step = next(start)
    assert isinstance(step, Outgoing) and step.request == FrontendReq.REM_MEM_REG
    # while the first REM_MEM_REG waits for its ack, both mappings' unmaps are answered
    unmaps = [p.front.announcement(shmem(BackendReq.SHMEM_UNMAP, 0, offset, 0x1000), addr)
              for offset, addr in where.items()]  # fmt: skip
    fed = p.exchange(step)
    with contextlib.suppress(StopIteration):
        while True:
            step = start.send(fed)
            fed = p.exchange(step) if isinstance(step, Outgoing) else None
    rem = FrontendReq.REM_MEM_REG
    told = [m.payload.region.guest_phys_addr for m in p.sent if m.request == rem]
    told += [u.payload.region.guest_phys_addr for u in unmaps if u is not None]
    assert sorted(told) == [SHMEM_BAR_GPA + offset for offset in where]
    assert unmaps[0] is None  # the start was telling it already
    assert p.front.negotiated.started


def test_crosvm_serves_one_shmid_and_keeps_mappings_across_a_reset() -> None:
    p = pair("crosvm")
    assert p.front.admit_shmem(shmem(BackendReq.SHMEM_MAP, shmid=0)).shmid == 0
    with pytest.raises(ShmemRefused) as refused:
        p.front.admit_shmem(shmem(BackendReq.SHMEM_MAP, shmid=2))
    assert "serves only shmid 0" in str(refused.value)
    p.effects.clear()
    assert p.run(p.front.reset()) == "RESET_DEVICE"
    assert DropMappings() not in p.effects  # crosvm does not unmap at a reset (yet): they stay


def test_cloud_hypervisor_answers_ebusy_and_opens_a_fresh_channel_at_activation() -> None:
    p = pair("cloud-hypervisor")
    # the layout at creation, the backend channel only at activation
    assert p.requests.index("GET_SHMEM_CONFIG") < p.requests.index("SET_FEATURES")
    assert p.requests[-1] == "SET_BACKEND_REQ_FD"
    assert p.front.result(ShmemRefused(Refusal.OVERLAP, "overlaps")) == -errno.EBUSY
    assert p.front.result(ShmemRefused(Refusal.OUT_OF_BOUNDS, "out")) == -errno.EINVAL
    p.requests.clear()
    p.effects.clear()
    p.run(p.front.reset())
    assert p.requests == ["RESET_DEVICE", "SET_BACKEND_REQ_FD"]
    assert OpenBackendChannel(FAKE_FD) in p.effects  # the device got a new channel


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_handshakes_with_our_device_without_a_violation(name: str) -> None:
    p = pair(name)
    assert p.back.why_not_ready() is None, name
    assert p.observer.violations == [], name
    assert p.observer.pending(MAIN) == [], name  # every request owed an answer got one


def test_our_device_waits_for_a_managed_start_and_forgets_at_the_last_ring_stop() -> None:
    p = pair("qemu")
    assert p.back.running and p.back.why_not_ready() is None  # started by the guest
    p.exchange(p.front.request(FrontendReq.SET_VRING_ENABLE, VringState(0, 0)))
    assert not p.back.running
    assert "has not started the device" in (p.back.why_not_ready() or "")
    p.effects.clear()
    p.exchange(p.front.request(FrontendReq.GET_VRING_BASE, VringState(0, 0)))
    (forget,) = [e for e in p.effects if isinstance(e, Forget)]
    assert "every ring stopped" in forget.why
    # a front-end that never manages the device's state never has to start it
    strict = pair("strict")
    assert not strict.back.managed and strict.back.running
    # one that asks for memory slots (QEMU, at realize, before the backend channel) will
    # start the device: until it has, the device asks for nothing
    early = device_with(LAYOUT)
    for req in (FrontendReq.GET_MAX_MEM_SLOTS, FrontendReq.SET_BACKEND_REQ_FD):
        early.receive(request(MAIN, req, fds=(FAKE_FD,) if req.name.startswith("SET") else ()))
    early.protocol_features = int(early.offered)
    assert early.managed and "has not started the device" in (early.why_not_ready() or "")
