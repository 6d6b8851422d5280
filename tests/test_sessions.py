"""The protocol's rules against the sans-I/O sessions, in memory: no socket, no
process, no thread. Every message still goes through the real codec (encode, then the
incremental reader), so what is tested here is what travels.

The process-level tests (test_pair, test_real_peers, test_frontend_validation, ...)
keep covering what needs the kernel: fds, mmap, /proc."""

from __future__ import annotations

import errno
import os
from collections.abc import Generator, Iterator
from typing import TypeVar

import pytest

from backend_sim.presets import PRESETS
from shmemctl.session import (
    BackendSession,
    Forget,
    FrontendSession,
    GuestMemory,
    HandshakeError,
    Hangup,
    NeedBackendChannel,
    Note,
    Observer,
    OpenBackendChannel,
    Outgoing,
    Owed,
    ProtocolViolation,
    Rule,
    owed,
)
from shmemctl.session import observer as observer_module
from shmemctl.shmem.libc import PAGE_SIZE
from shmemctl.shmem.mapping import FileFacts, Mapping
from shmemctl.shmem.rules import Refusal, ShmemRefused
from shmemctl.wire import BackendReq, ChannelKind, FrontendReq, MessageReader, ShmemMap
from shmemctl.wire.constants import (
    SHMEM_BIT,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    ProtocolFeature,
)
from shmemctl.wire.messages import (
    DeviceConfig,
    MemoryRegion,
    Message,
    Raw,
    ShmemConfig,
    SingleMemoryRegion,
    VringState,
)

PF = ProtocolFeature
MAIN, BACKEND = ChannelKind.MAIN, ChannelKind.BACKEND
REGIONS = {0: 8 << 20, 2: 64 << 10}
FAKE_FD = 1000  # an fd number as the codec carries it; nothing here opens or closes it
GUEST_RAM_ADDR = 0x7F00_0000_0000  # where a driver would have mapped guest RAM
T = TypeVar("T")


def travel(out: Outgoing) -> Message:
    """`out` as the receiving end decodes it: encoded, then framed by the reader."""
    reader = MessageReader(out.channel, replies=out.reply)
    reader.feed(out.encode(), out.fds)
    (msg,) = list(reader)
    reader.close()
    return msg


def request(
    channel: ChannelKind,
    req: int,
    payload: object = None,
    *,
    need_reply: bool = False,
    fds: tuple[int, ...] = (),
) -> Message:
    return travel(Outgoing(channel, req, payload, need_reply=need_reply, fds=fds))  # type: ignore[arg-type]


def sent(effects: list) -> list[Message]:
    """The messages among a session's effects, as the peer receives them."""
    return [travel(e) for e in effects if isinstance(e, Outgoing)]


def device(**kwargs: object) -> BackendSession:
    return BackendSession(REGIONS, shmem_bit=SHMEM_BIT, **kwargs)  # type: ignore[arg-type]


class Pair:
    """A FrontendSession driven against a BackendSession in memory, with an Observer
    fed both directions as a tap would see them."""

    def __init__(self, front: FrontendSession | None = None, back: BackendSession | None = None):
        self.front = front or FrontendSession(shmem_bit=SHMEM_BIT)
        self.back = back or device()
        self.observer = Observer()
        self.requests: list[str] = []
        self.sent: list[Message] = []  # the front-end's requests as the device read them
        self.effects: list = []

    def exchange(self, out: Outgoing) -> Message | None:
        msg = travel(out)
        self.observer.message(msg)
        self.requests.append(msg.name)
        self.sent.append(msg)
        effects = self.back.receive(msg)
        self.effects += effects
        replies = sent(effects)
        for reply in replies:
            self.observer.message(reply)
        assert len(replies) <= 1
        return replies[0] if replies else None

    def handshake(self) -> None:
        self.run(self.front.handshake())

    def run(self, steps: Generator[object, object, T]) -> T:
        """Carry out a sequence of the front-end's steps as a driver would: every
        request to the device, FAKE_FD for a channel, fake guest RAM; its result."""
        fed: object = None
        while True:
            try:
                step = steps.send(fed)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            if isinstance(step, NeedBackendChannel):
                fed = FAKE_FD
            elif isinstance(step, GuestMemory):
                fed = (FAKE_FD + 50, GUEST_RAM_ADDR)
            elif isinstance(step, Outgoing):
                fed = self.exchange(step)
            else:
                self.effects.append(step)
                fed = None


# ---------------------------------------------------------------- what is owed


@pytest.mark.parametrize(
    ("channel", "req", "need_reply", "reply_ack", "expected"),
    [
        (MAIN, FrontendReq.GET_FEATURES, False, False, Owed.OWN_REPLY),
        (MAIN, FrontendReq.GET_FEATURES, True, True, Owed.OWN_REPLY),  # never an extra ack
        (MAIN, FrontendReq.GET_SHMEM_CONFIG, False, True, Owed.OWN_REPLY),
        (MAIN, FrontendReq.SET_OWNER, True, True, Owed.ACK),
        (MAIN, FrontendReq.SET_OWNER, True, False, Owed.NOTHING),  # NEED_REPLY without REPLY_ACK
        (MAIN, FrontendReq.SET_OWNER, False, True, Owed.NOTHING),
        (BACKEND, BackendReq.SHMEM_MAP, True, True, Owed.ACK),
        (BACKEND, BackendReq.SHMEM_MAP, False, True, Owed.NOTHING),  # batching
        (BACKEND, BackendReq.SHMEM_UNMAP, True, False, Owed.NOTHING),  # §6.2
    ],
)
def test_what_a_request_is_owed(channel, req, need_reply, reply_ack, expected) -> None:
    assert owed(channel, req, need_reply, reply_ack) is expected


# ---------------------------------------------------------------- handshakes


def test_our_handshake_against_our_device() -> None:
    pair = Pair()
    pair.handshake()
    assert pair.requests == [
        "GET_FEATURES",
        "GET_PROTOCOL_FEATURES",
        "SET_PROTOCOL_FEATURES",
        "GET_QUEUE_NUM",
        "SET_OWNER",
        "GET_SHMEM_CONFIG",
        "SET_BACKEND_REQ_FD",
        "SET_FEATURES",
    ]
    neg = pair.front.negotiated
    assert neg.shmem and neg.reply_ack and neg.config is not None
    assert neg.config.regions() == REGIONS
    assert pair.back.shmem and pair.back.reply_ack and pair.back.backend_channel
    assert OpenBackendChannel(FAKE_FD) in pair.effects
    assert pair.back.why_not_ready() is None
    assert pair.observer.violations == []
    assert pair.observer.pending(MAIN) == []
    assert pair.observer.state.config == ShmemConfig.from_regions(REGIONS)


def test_a_device_without_shmem_gets_no_layout_request() -> None:
    pair = Pair(back=device(offered=PF.MQ | PF.REPLY_ACK | PF.BACKEND_REQ))
    pair.back.offered &= ~pair.back.shmem_mask
    pair.handshake()
    assert "GET_SHMEM_CONFIG" not in pair.requests
    assert not pair.front.negotiated.shmem
    assert pair.back.why_not_ready() == "SHMEM (protocol feature bit 22) was not negotiated"


def test_without_reply_ack_nothing_is_acked_and_nothing_is_awaited() -> None:
    front = FrontendSession(shmem_bit=SHMEM_BIT, implemented=PF.BACKEND_REQ)
    pair = Pair(front=front)
    pair.handshake()
    assert not pair.front.negotiated.reply_ack
    answered = [e.name for e in pair.effects if isinstance(e, Outgoing)]
    assert answered == ["GET_FEATURES", "GET_PROTOCOL_FEATURES", "GET_SHMEM_CONFIG"]
    assert "REPLY_ACK" in pair.back.why_not_ready()  # type: ignore[operator]


def qemu_72_realize(
    back: BackendSession, read_config: bool = True
) -> list[tuple[str, Message | None]]:
    """QEMU 7.2's realize (docs/protocol.md §4 steps 1-5): it does not know SHMEM, so it
    masks the bit out, and it asks SET_BACKEND_REQ_FD to be acked; a device type with a
    config space of its own (`read_config`) reads it last."""
    answers: list[tuple[str, Message | None]] = []

    def send(req: FrontendReq, payload: object = None, **kw: object) -> Message | None:
        effects = back.receive(request(MAIN, req, payload, **kw))  # type: ignore[arg-type]
        replies = sent(effects)
        answers.append((req.name, replies[0] if replies else None))
        return replies[0] if replies else None

    send(FrontendReq.GET_FEATURES)
    offered = send(FrontendReq.GET_PROTOCOL_FEATURES)
    assert offered is not None and isinstance(offered.payload, int)
    qemu_knows = PF.MQ | PF.REPLY_ACK | PF.BACKEND_REQ | PF.BACKEND_SEND_FD | PF.CONFIG | PF.STATUS
    send(FrontendReq.SET_PROTOCOL_FEATURES, offered.payload & qemu_knows)
    send(FrontendReq.GET_QUEUE_NUM)
    send(FrontendReq.SET_BACKEND_REQ_FD, need_reply=True, fds=(FAKE_FD,))
    send(FrontendReq.SET_OWNER)
    send(FrontendReq.GET_FEATURES)
    send(FrontendReq.SET_VRING_CALL, 0, fds=(FAKE_FD + 1,))
    send(FrontendReq.SET_VRING_ERR, 0, fds=(FAKE_FD + 2,))
    if read_config:
        send(FrontendReq.GET_CONFIG, DeviceConfig(0, 8, 0, bytes(8)))
    return answers


def test_qemu_72_realize_order() -> None:
    back = device()
    answers = dict(qemu_72_realize(back))
    assert answers["SET_BACKEND_REQ_FD"] is not None and answers["SET_BACKEND_REQ_FD"].payload == 0
    assert answers["SET_OWNER"] is None  # no NEED_REPLY: no ack
    assert answers["SET_VRING_CALL"] is None and answers["SET_VRING_ERR"] is None
    config = answers["GET_CONFIG"]
    assert config is not None and config.payload == DeviceConfig(0, 8, 0, bytes(8))
    assert back.backend_channel and not back.shmem  # QEMU 7.2 never acks SHMEM
    assert back.why_not_ready() == "SHMEM (protocol feature bit 22) was not negotiated"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_device_preset_answers_realize_as_its_device_type_expects(name: str) -> None:
    preset = PRESETS[name]
    back = device(queues=preset.queues, config_space=preset.config, features=preset.features)
    answers = dict(qemu_72_realize(back, read_config=bool(preset.config)))
    features = answers["GET_FEATURES"]
    assert features is not None
    assert features.payload == VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | preset.features
    queues = answers["GET_QUEUE_NUM"]
    assert queues is not None and queues.payload == preset.queues
    offered = answers["GET_PROTOCOL_FEATURES"]
    assert offered is not None and isinstance(offered.payload, int)
    # CONFIG only where the device type has its config space read through the back-end
    assert bool(offered.payload & PF.CONFIG) == bool(preset.config)
    if preset.config:
        config = answers["GET_CONFIG"]
        assert config is not None and config.payload == DeviceConfig(0, 8, 0, preset.config[:8])


def test_cloud_hypervisor_order_layout_before_backend_channel() -> None:
    """rust-vmm VMMs: SET_OWNER first, GET_SHMEM_CONFIG before SET_BACKEND_REQ_FD (§4)."""
    back = device()
    observer = Observer()

    def send(req: FrontendReq, payload: object = None, **kw: object) -> Message | None:
        msg = request(MAIN, req, payload, **kw)  # type: ignore[arg-type]
        observer.message(msg)
        replies = sent(back.receive(msg))
        for reply in replies:
            observer.message(reply)
        return replies[0] if replies else None

    send(FrontendReq.SET_OWNER)
    send(FrontendReq.GET_FEATURES)
    offered = send(FrontendReq.GET_PROTOCOL_FEATURES)
    assert offered is not None and isinstance(offered.payload, int)
    send(
        FrontendReq.SET_PROTOCOL_FEATURES,
        offered.payload & (PF.REPLY_ACK | PF.BACKEND_REQ | PF.SHMEM),
    )
    layout = send(FrontendReq.GET_SHMEM_CONFIG)
    assert layout is not None and layout.payload == ShmemConfig.from_regions(REGIONS)
    ack = send(FrontendReq.SET_BACKEND_REQ_FD, need_reply=True, fds=(FAKE_FD,))
    assert ack is not None and ack.payload == 0
    assert back.why_not_ready() is None
    assert observer.violations == []


def test_a_front_end_that_opens_the_backend_channel_first_is_flagged() -> None:
    observer = Observer()
    observer.message(request(MAIN, FrontendReq.SET_BACKEND_REQ_FD, fds=(FAKE_FD,)))
    assert [v.rule for v in observer.violations] == [Rule.PROTOCOL_FEATURES_FIRST]
    assert observer.violations[0].by == "front-end"


def test_the_handshake_ends_on_a_reply_to_another_request() -> None:
    front = FrontendSession(shmem_bit=SHMEM_BIT)
    steps = front.handshake()
    first = next(steps)
    assert isinstance(first, Outgoing) and first.name == "GET_FEATURES"
    wrong = travel(Outgoing(MAIN, FrontendReq.GET_PROTOCOL_FEATURES, 0, reply=True))
    with pytest.raises(
        HandshakeError, match="asked GET_FEATURES, the back-end answered GET_PROTOCOL"
    ):
        steps.send(wrong)


def test_a_failed_ack_ends_the_handshake() -> None:
    front = FrontendSession(shmem_bit=SHMEM_BIT)
    front.negotiated.reply_ack = True
    out = front.request(FrontendReq.SET_OWNER, ack=True)
    assert out.need_reply
    with pytest.raises(HandshakeError, match="SET_OWNER failed: the back-end replied 1"):
        front.check_reply(out, travel(Outgoing(MAIN, FrontendReq.SET_OWNER, 1, reply=True)))


def test_no_protocol_features_means_no_shmem_and_a_note() -> None:
    front = FrontendSession(shmem_bit=SHMEM_BIT)
    steps = front.handshake()
    next(steps)
    note = steps.send(travel(Outgoing(MAIN, FrontendReq.GET_FEATURES, 1 << 32, reply=True)))
    assert isinstance(note, Note) and "virtio bit 30" in note.text
    out = steps.send(None)
    assert isinstance(out, Outgoing) and out.name == "SET_OWNER" and not out.need_reply


# ---------------------------------------------------------------- the device's answers


def handshaken_device(**kwargs: object) -> BackendSession:
    back = device(**kwargs)
    back.receive(request(MAIN, FrontendReq.SET_PROTOCOL_FEATURES, int(back.offered)))
    back.receive(request(MAIN, FrontendReq.SET_BACKEND_REQ_FD, fds=(FAKE_FD,)))
    return back


def test_set_backend_req_fd_without_its_fd_is_failed_not_opened() -> None:
    back = device()
    back.receive(request(MAIN, FrontendReq.SET_PROTOCOL_FEATURES, int(PF.REPLY_ACK)))
    effects = back.receive(request(MAIN, FrontendReq.SET_BACKEND_REQ_FD, need_reply=True))
    assert [m.payload for m in sent(effects)] == [1]
    assert not any(isinstance(e, OpenBackendChannel) for e in effects)
    assert not back.backend_channel


@pytest.mark.parametrize(
    ("req", "payload"),
    [
        (FrontendReq.RESET_DEVICE, None),
        (FrontendReq.RESET_OWNER, None),
        (FrontendReq.SET_STATUS, 0),
    ],
)
def test_a_reset_makes_the_device_forget_then_ack(req, payload) -> None:
    back = handshaken_device()
    effects = back.receive(request(MAIN, req, payload, need_reply=True))
    assert isinstance(effects[0], Forget)
    assert [m.payload for m in sent(effects)] == [0]


def test_set_status_not_zero_is_no_reset() -> None:
    back = handshaken_device()
    effects = back.receive(request(MAIN, FrontendReq.SET_STATUS, 0xF, need_reply=True))
    assert not any(isinstance(e, Forget) for e in effects)
    assert sent(back.receive(request(MAIN, FrontendReq.GET_STATUS)))[0].payload == 0xF


def test_a_request_with_a_reply_the_device_cannot_give_ends_the_connection() -> None:
    back = handshaken_device()
    effects = back.receive(request(MAIN, FrontendReq.GET_INFLIGHT_FD, Raw(bytes(8))))
    assert effects == [Hangup("GET_INFLIGHT_FD needs a reply this device cannot give")]


def test_an_unsupported_request_is_failed_when_asked() -> None:
    back = handshaken_device()
    effects = back.receive(request(MAIN, FrontendReq.SET_LOG_BASE, Raw(bytes(8)), need_reply=True))
    assert [e.payload for e in effects if isinstance(e, Outgoing)] == [1]
    assert any(isinstance(e, Note) and "not supported" in e.text for e in effects)


def test_get_config_past_the_end_is_the_error_reply() -> None:
    back = handshaken_device(config_space=bytes(16))
    asked = request(MAIN, FrontendReq.GET_CONFIG, DeviceConfig(8, 16, 0, bytes(16)))
    replies = [e for e in back.receive(asked) if isinstance(e, Outgoing)]
    # no payload at all: the protocol's error reply, which a front-end's codec refuses
    assert replies == [Outgoing(MAIN, FrontendReq.GET_CONFIG, None, reply=True)]


def test_acked_features_the_device_never_offered_are_ignored() -> None:
    back = device()
    effects = back.receive(
        request(
            MAIN, FrontendReq.SET_PROTOCOL_FEATURES, int(PF.REPLY_ACK | PF.INBAND_NOTIFICATIONS)
        )
    )
    assert back.protocol_features == PF.REPLY_ACK
    assert any(isinstance(e, Note) and "never offered" in e.text for e in effects)


def test_get_vring_base_and_surplus_fds() -> None:
    back = handshaken_device()
    (reply,) = sent(back.receive(request(MAIN, FrontendReq.GET_VRING_BASE, VringState(1, 7))))
    assert reply.payload == VringState(1, 0)
    effects = back.receive(request(MAIN, FrontendReq.SET_OWNER, fds=(FAKE_FD,)))
    assert effects and isinstance(effects[0], Note) and "may not carry" in effects[0].text


# ---------------------------------------------------------------- SHMEM requests


def test_a_shmem_request_is_refused_until_the_connection_allows_it() -> None:
    back = device()
    with pytest.raises(Exception, match="no backend channel"):
        back.shmem_request(BackendReq.SHMEM_MAP, ShmemMap(0, 0, PAGE_SIZE), FAKE_FD)
    back = handshaken_device()
    out = back.shmem_request(BackendReq.SHMEM_MAP, ShmemMap(0, 0, PAGE_SIZE), FAKE_FD)
    msg = travel(out)
    assert msg.name == "SHMEM_MAP" and msg.need_reply and msg.fds == (FAKE_FD,)


def test_the_device_checks_the_answer_matches() -> None:
    ok = travel(Outgoing(BACKEND, BackendReq.SHMEM_MAP, 0, reply=True))
    assert BackendSession.shmem_answer(BackendReq.SHMEM_MAP, ok) == 0
    with pytest.raises(ProtocolViolation) as caught:
        BackendSession.shmem_answer(BackendReq.SHMEM_UNMAP, ok)
    assert caught.value.rule is Rule.REPLY_MATCHES_REQUEST


def front_with_shmem(reply_ack: bool = True) -> FrontendSession:
    front = FrontendSession(shmem_bit=SHMEM_BIT)
    front.negotiated.shmem = True
    front.negotiated.reply_ack = reply_ack
    return front


@pytest.mark.parametrize(
    ("front", "msg", "reason"),
    [
        (
            FrontendSession(shmem_bit=SHMEM_BIT),
            request(BACKEND, BackendReq.SHMEM_MAP, ShmemMap(0, 0, PAGE_SIZE), fds=(FAKE_FD,)),
            Refusal.NOT_NEGOTIATED,
        ),
        (
            front_with_shmem(),
            request(BACKEND, BackendReq.SHMEM_MAP, ShmemMap(0, 0, PAGE_SIZE)),
            Refusal.BAD_FD_COUNT,
        ),
        (
            front_with_shmem(),
            request(
                BACKEND, BackendReq.SHMEM_MAP, ShmemMap(0, 0, PAGE_SIZE), fds=(FAKE_FD, FAKE_FD + 1)
            ),
            Refusal.BAD_FD_COUNT,
        ),
        (
            front_with_shmem(),
            request(BACKEND, BackendReq.VRING_CALL, Raw(bytes(8))),
            Refusal.NOT_NEGOTIATED,
        ),
    ],
)
def test_steps_1_and_2_before_the_engine(front, msg, reason) -> None:
    with pytest.raises(ShmemRefused) as caught:
        front.admit_shmem(msg)
    assert caught.value.reason is reason


def test_the_front_end_answers_only_when_owed() -> None:
    m = ShmemMap(0, 0, PAGE_SIZE)
    asked = request(BACKEND, BackendReq.SHMEM_MAP, m, need_reply=True, fds=(FAKE_FD,))
    unasked = request(BACKEND, BackendReq.SHMEM_MAP, m, fds=(FAKE_FD,))
    front = front_with_shmem()
    assert front.admit_shmem(asked) == m
    reply = front.answer(asked, -errno.EEXIST & (2**64 - 1))
    assert reply is not None and travel(reply).payload == 2**64 - errno.EEXIST
    assert front.answer(unasked, 0) is None
    assert front_with_shmem(reply_ack=False).answer(asked, 0) is None  # §6.2


def test_reset_request_follows_what_was_negotiated() -> None:
    front = FrontendSession(shmem_bit=SHMEM_BIT)
    assert front.reset_request().name == "RESET_OWNER"
    front.negotiated.protocol_features = PF.STATUS
    assert front.reset_request().name == "SET_STATUS" and front.reset_request().payload == 0
    front.negotiated.protocol_features = PF.STATUS | PF.RESET_DEVICE
    assert front.reset_request().name == "RESET_DEVICE"


# ---------------------------------------------------------------- the observer


def observed_pair() -> Pair:
    pair = Pair()
    pair.handshake()
    return pair


def shmem(pair: Pair, req: BackendReq, m: ShmemMap, answer: int | None, *, need_reply: bool = True):
    """The back-end sends `req`; the front-end answers `answer` (None: it does not)."""
    fds = (FAKE_FD,) if req == BackendReq.SHMEM_MAP else ()
    found = pair.observer.message(request(BACKEND, req, m, need_reply=need_reply, fds=fds))
    if answer is not None:
        found += pair.observer.message(travel(Outgoing(BACKEND, req, answer, reply=True)))
    return [v.rule for v in found]


EEXIST = 2**64 - errno.EEXIST


def test_observer_keeps_the_mappings_the_answers_make() -> None:
    pair = observed_pair()
    a, b = ShmemMap(0, 0, 2 * PAGE_SIZE), ShmemMap(0, 4 * PAGE_SIZE, PAGE_SIZE)
    assert shmem(pair, BackendReq.SHMEM_MAP, a, 0) == []
    assert shmem(pair, BackendReq.SHMEM_MAP, b, None, need_reply=False) == []  # batched
    assert pair.observer.mappings() == [Mapping.granted(a), Mapping.granted(b)]
    assert shmem(pair, BackendReq.SHMEM_UNMAP, a, 0) == []
    assert pair.observer.mappings() == [Mapping.granted(b)]
    assert pair.observer.pending(BACKEND) == []


def test_observer_answers_settle_requests_that_crossed_unanswered_ones() -> None:
    """Requests that ask for an answer settle when it comes, those that do not at once:
    a batched map over the range of one still awaiting its answer is taken for done,
    then the answer says the first was made. The answered one is the mapping, the
    picture stays one of ranges that do not overlap, and an unmap that a later unmap
    already settled is not settled twice."""
    pair = observed_pair()
    a, b = ShmemMap(0, 0, 2 * PAGE_SIZE), ShmemMap(0, PAGE_SIZE, 2 * PAGE_SIZE)
    observer = pair.observer
    observer.message(request(BACKEND, BackendReq.SHMEM_MAP, a, need_reply=True, fds=(FAKE_FD,)))
    assert shmem(pair, BackendReq.SHMEM_MAP, b, None, need_reply=False) == []
    assert observer.mappings() == [Mapping.granted(b)]
    observer.message(travel(Outgoing(BACKEND, BackendReq.SHMEM_MAP, 0, reply=True)))
    assert observer.mappings() == [Mapping.granted(a)]
    observer.message(request(BACKEND, BackendReq.SHMEM_UNMAP, a, need_reply=True))
    shmem(pair, BackendReq.SHMEM_UNMAP, a, None, need_reply=False)
    assert observer.mappings() == []
    observer.message(travel(Outgoing(BACKEND, BackendReq.SHMEM_UNMAP, 0, reply=True)))
    assert observer.mappings() == [] and observer.pending(BACKEND) == []


def test_observer_without_a_layout_keeps_one_mapping_a_range() -> None:
    """Without the layout nothing is judged, and a front-end may ack maps of any length
    over one another (zero included): each answered map replaces what it covers."""
    pair = Pair()
    maps = [ShmemMap(0, 0, n * PAGE_SIZE) for n in range(4)] + [ShmemMap(0, PAGE_SIZE, 0)]
    for m in maps:
        shmem(pair, BackendReq.SHMEM_MAP, m, 0)
        assert pair.observer.mappings() == [Mapping.granted(m)]


def test_observer_mappings_keep_the_file_their_fd_named() -> None:
    """Whoever holds the fd says what it was; the mapping the request makes keeps it,
    whether the answer comes later or none is asked."""
    pair = observed_pair()
    files = [FileFacts(1, 10 + i, f"/memfd:buf-{i} (deleted)", PAGE_SIZE) for i in range(3)]
    maps = [ShmemMap(0, i * PAGE_SIZE, PAGE_SIZE) for i in range(3)]
    asked = request(BACKEND, BackendReq.SHMEM_MAP, maps[0], need_reply=True, fds=(FAKE_FD,))
    pair.observer.message(asked, files[0])
    unasked = request(BACKEND, BackendReq.SHMEM_MAP, maps[1], need_reply=False, fds=(FAKE_FD,))
    pair.observer.message(unasked, files[1])
    refused = request(BACKEND, BackendReq.SHMEM_MAP, maps[2], need_reply=True, fds=(FAKE_FD,))
    pair.observer.message(refused, files[2])
    pair.observer.message(travel(Outgoing(BACKEND, BackendReq.SHMEM_MAP, 0, reply=True)))
    pair.observer.message(travel(Outgoing(BACKEND, BackendReq.SHMEM_MAP, EEXIST, reply=True)))
    assert pair.observer.mappings() == [
        Mapping.granted(m, file=f.file, dev=f.dev, ino=f.ino)
        for m, f in zip(maps[:2], files[:2], strict=True)
    ]


def each_step_of_section_5() -> Iterator[tuple[str, ShmemMap, BackendReq]]:
    size = REGIONS[0]
    yield "step 4: unknown flag bits", ShmemMap(0, 0, PAGE_SIZE, 0, 0x2), BackendReq.SHMEM_MAP
    yield "step 5: no such region", ShmemMap(1, 0, PAGE_SIZE), BackendReq.SHMEM_MAP
    yield "step 6: zero length", ShmemMap(0, 0, 0), BackendReq.SHMEM_MAP
    yield "step 7: overflow", ShmemMap(0, 2**64 - PAGE_SIZE, 2 * PAGE_SIZE), BackendReq.SHMEM_MAP
    yield (
        "step 8: out of bounds",
        ShmemMap(0, size - PAGE_SIZE, 2 * PAGE_SIZE),
        BackendReq.SHMEM_MAP,
    )
    yield "step 9: not aligned", ShmemMap(0, 0, PAGE_SIZE + 1), BackendReq.SHMEM_MAP
    yield "step 10: overlap", ShmemMap(0, PAGE_SIZE, PAGE_SIZE), BackendReq.SHMEM_MAP
    yield "step 11: not a whole mapping", ShmemMap(0, 0, PAGE_SIZE), BackendReq.SHMEM_UNMAP


@pytest.mark.parametrize(
    ("step", "m", "req"),
    list(each_step_of_section_5()),
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_observer_judges_every_section_5_step(step, m, req) -> None:
    pair = observed_pair()
    assert shmem(pair, BackendReq.SHMEM_MAP, ShmemMap(0, 0, 2 * PAGE_SIZE), 0) == []
    # the back-end sent what a front-end must refuse; a front-end that refuses is right
    assert shmem(pair, req, m, EEXIST) == [Rule.MAP_VALID], step
    # a front-end that answers ok to it is wrong too
    assert shmem(pair, req, m, 0) == [Rule.MAP_VALID, Rule.REFUSES_INVALID], step
    assert pair.observer.mappings() == [Mapping(0, 0, 2 * PAGE_SIZE)]


def test_observer_a_refusal_of_a_valid_map_changes_nothing() -> None:
    pair = observed_pair()
    assert shmem(pair, BackendReq.SHMEM_MAP, ShmemMap(0, 0, PAGE_SIZE), EEXIST) == []
    assert pair.observer.mappings() == []


def test_observer_replies_that_break_the_order() -> None:
    pair = observed_pair()
    m = ShmemMap(0, 0, PAGE_SIZE)
    # a reply to a request that asked for none
    assert shmem(pair, BackendReq.SHMEM_MAP, m, 0, need_reply=False) == [
        Rule.REPLY_ONLY_UNDER_REPLY_ACK
    ]
    # an answer of the other kind
    observer = pair.observer
    observer.message(request(BACKEND, BackendReq.SHMEM_UNMAP, m, need_reply=True))
    found = observer.message(travel(Outgoing(BACKEND, BackendReq.SHMEM_MAP, 0, reply=True)))
    assert [v.rule for v in found] == [Rule.REPLY_MATCHES_REQUEST]
    # the main channel: an ack nobody asked for
    found = observer.message(travel(Outgoing(MAIN, FrontendReq.SET_OWNER, 0, reply=True)))
    assert [(v.rule, v.by) for v in found] == [(Rule.REPLY_OWED, "back-end")]


def test_observer_a_reset_drops_every_mapping_and_an_unmap_after_it_is_flagged() -> None:
    pair = observed_pair()
    m = ShmemMap(0, 0, PAGE_SIZE)
    assert shmem(pair, BackendReq.SHMEM_MAP, m, 0) == []
    assert pair.exchange(pair.front.reset_request()) is not None
    assert pair.observer.mappings() == [] and pair.observer.state.resets == 1
    assert Forget("RESET_DEVICE from the front-end") in pair.effects
    assert shmem(pair, BackendReq.SHMEM_UNMAP, m, 2**64 - errno.ENOENT) == [
        Rule.MAP_VALID,
        Rule.NO_UNMAP_AFTER_RESET,
    ]


def announce(observer: Observer, *, need_reply: bool = True, in_flight: bool = False) -> list:
    """The front-end tells the back-end of new guest memory (QEMU's ADD_MEM_REG after a
    map); the rules it broke."""
    region = SingleMemoryRegion(MemoryRegion(0x1_0000_0000, PAGE_SIZE, 0x7F00_0000_0000, 0))
    msg = request(MAIN, FrontendReq.ADD_MEM_REG, region, need_reply=need_reply, fds=(FAKE_FD,))
    return [v.rule for v in observer.message(msg, answers_in_flight=in_flight)]


def test_observer_a_question_before_the_answer_to_a_map_is_the_front_ends_violation() -> None:
    pair = observed_pair()
    observer = pair.observer
    m = ShmemMap(0, 0, PAGE_SIZE)
    observer.message(request(BACKEND, BackendReq.SHMEM_MAP, m, need_reply=True, fds=(FAKE_FD,)))
    assert announce(observer) == [Rule.REPLY_BEFORE_FOLLOW_UP]
    detail = observer.violations[-1].detail
    assert detail == (
        "ADD_MEM_REG asks for an answer while the front-end owes one to SHMEM_MAP "
        "shmid 0 [0x0, 0x1000)"
    )
    assert observer.violations[-1].by == "front-end"
    # the answer may be on its way on the other channel: not held against it
    assert announce(observer, in_flight=True) == []
    # a notice that asks for nothing cannot wait on the back-end
    assert announce(observer, need_reply=False) == []
    # nor is the rest of a handshake a consequence of the map (the device maps as soon as
    # the backend channel is open, while the front-end still sets its features)
    ask = request(MAIN, FrontendReq.SET_FEATURES, 1 << 32, need_reply=True)
    assert observer.message(ask) == []


def test_observer_counts_every_fd_a_message_carried() -> None:
    pair = observed_pair()
    observer = pair.observer
    two = (FAKE_FD, FAKE_FD + 1)
    found = observer.message(request(MAIN, FrontendReq.SET_BACKEND_REQ_FD, fds=two))
    assert [v.rule for v in found] == [Rule.BACKEND_CHANNEL_FD]
    m = ShmemMap(0, 0, PAGE_SIZE)
    found = observer.message(request(BACKEND, BackendReq.SHMEM_MAP, m, need_reply=True, fds=two))
    assert [(v.rule, v.detail) for v in found] == [
        (Rule.MAP_VALID, "SHMEM_MAP shmid 0 [0x0, 0x1000): SHMEM_MAP carries 2 fds; it needs "
                         "exactly one")]  # fmt: skip
    ok = travel(Outgoing(BACKEND, BackendReq.SHMEM_MAP, 0, reply=True))
    assert [v.rule for v in observer.message(ok)] == [Rule.REFUSES_INVALID]
    assert observer.mappings() == []
    # §6.5: an UNMAP that brings an fd is still served (the fd is closed as surplus)
    assert shmem(pair, BackendReq.SHMEM_MAP, m, 0) == []
    found = observer.message(request(BACKEND, BackendReq.SHMEM_UNMAP, m, need_reply=True,
                                     fds=(FAKE_FD,)))  # fmt: skip
    found += observer.message(travel(Outgoing(BACKEND, BackendReq.SHMEM_UNMAP, 0, reply=True)))
    assert found == [] and observer.mappings() == []


def test_observer_answer_first_then_ask_is_the_order_qemu_keeps() -> None:
    pair = observed_pair()
    m = ShmemMap(0, 0, PAGE_SIZE)
    assert shmem(pair, BackendReq.SHMEM_MAP, m, 0) == []
    assert announce(pair.observer) == []
    # a map sent without NEED_REPLY (a batch) is owed nothing: nothing to wait for
    pair.observer.message(request(BACKEND, BackendReq.SHMEM_MAP, m._replace(shm_offset=PAGE_SIZE),
                                  fds=(FAKE_FD,)))  # fmt: skip
    assert announce(pair.observer) == []


def test_observer_flags_shmem_before_it_was_negotiated() -> None:
    observer = Observer()
    found = observer.message(
        request(BACKEND, BackendReq.SHMEM_MAP, ShmemMap(0, 0, PAGE_SIZE), fds=(FAKE_FD,))
    )
    assert [v.rule for v in found] == [Rule.SHMEM_NEGOTIATED]


@pytest.mark.parametrize(
    ("config", "rules"),
    [
        (
            ShmemConfig.from_regions({**REGIONS, 0: REGIONS[0] + 512}),
            [Rule.CONFIG_PAGE_MULTIPLES, Rule.CONFIG_STABLE],
        ),
        (ShmemConfig(ShmemConfig.from_regions(REGIONS).sizes, 3), [Rule.CONFIG_NREGIONS]),
        (ShmemConfig.from_regions({0: 16 << 20}), [Rule.CONFIG_STABLE]),
        (ShmemConfig.from_regions(REGIONS), []),
    ],
)
def test_observer_judges_the_layout(config, rules) -> None:
    pair = observed_pair()  # the layout has been answered once already
    observer = pair.observer
    observer.message(request(MAIN, FrontendReq.GET_SHMEM_CONFIG))
    found = observer.message(
        travel(Outgoing(MAIN, FrontendReq.GET_SHMEM_CONFIG, config, reply=True))
    )
    assert [v.rule for v in found] == rules


def test_observer_feature_rules() -> None:
    observer = Observer()
    observer.message(request(MAIN, FrontendReq.GET_PROTOCOL_FEATURES))
    found = observer.message(
        travel(
            Outgoing(
                MAIN,
                FrontendReq.GET_PROTOCOL_FEATURES,
                int(PF.REPLY_ACK | PF.SHMEM | PF.GPA_ADDRESSES),
                reply=True,
            )
        )
    )
    assert [(v.rule, v.by) for v in found] == [(Rule.SHMEM_AT_BIT_22, "back-end")]
    found = observer.message(
        request(MAIN, FrontendReq.SET_PROTOCOL_FEATURES, int(PF.REPLY_ACK | PF.MQ))
    )
    assert [(v.rule, v.by) for v in found] == [(Rule.ACKS_ONLY_OFFERED, "front-end")]


def test_observer_keeps_both_sides_features() -> None:
    pair = observed_pair()
    state, negotiated = pair.observer.state, pair.front.negotiated
    offered = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES  # what GET_FEATURES answers
    assert state.device_features == offered and state.features == negotiated.features
    assert state.offered == negotiated.offered and state.acked == negotiated.protocol_features


def test_observer_judges_nothing_on_a_channel_it_lost() -> None:
    pair = observed_pair()
    unasked = travel(Outgoing(MAIN, FrontendReq.GET_FEATURES, 1, reply=True))
    assert [v.rule for v in pair.observer.message(unasked)] == [Rule.REPLY_OWED]
    pair.observer.lost(MAIN)  # one direction's framing gone: who asked what is unknown
    assert pair.observer.message(unasked) == [] and pair.observer.pending(MAIN) == []
    # the backend channel is still followed, and a new connection is followed again
    assert shmem(pair, BackendReq.SHMEM_MAP, ShmemMap(0, 0, PAGE_SIZE), 0) == []
    pair.observer.disconnected()
    assert [v.rule for v in pair.observer.message(unasked)] == [Rule.REPLY_OWED]


def test_observer_forgets_at_disconnect() -> None:
    pair = observed_pair()
    assert shmem(pair, BackendReq.SHMEM_MAP, ShmemMap(0, 0, PAGE_SIZE), None, need_reply=True) == []
    assert len(pair.observer.pending(BACKEND)) == 1
    pair.observer.disconnected()
    assert pair.observer.pending(BACKEND) == [] and pair.observer.mappings() == []
    assert pair.observer.state.config is None


def test_nothing_here_opened_an_fd() -> None:
    """The sessions are pure: FAKE_FD stays a number, never a descriptor of ours."""
    assert not os.path.exists(f"/proc/self/fd/{FAKE_FD}")


def test_an_observer_keeps_the_latest_violations_not_all_of_them() -> None:
    """A pair that breaks a rule with every message is watched for days: what each
    message broke is returned (the tap counts it), and only the latest are kept."""
    pair = Pair()  # no handshake: every SHMEM request is one without SHMEM negotiated
    m = ShmemMap(0, 0, PAGE_SIZE)
    returned = 0
    for _ in range(observer_module.KEPT_VIOLATIONS + 10):
        unmap = request(BACKEND, BackendReq.SHMEM_UNMAP, m, need_reply=False)
        found = pair.observer.message(unmap)
        assert [v.rule for v in found].count(Rule.SHMEM_NEGOTIATED) == 1
        returned += len(found)
    assert returned > observer_module.KEPT_VIOLATIONS
    assert len(pair.observer.violations) <= observer_module.KEPT_VIOLATIONS
    assert pair.observer.violations[-len(found):] == found


def test_a_watch_remembers_the_pictures_files_and_the_latest_others(monkeypatch) -> None:
    """A device that makes a file for every blob is watched for days: the watch keeps
    the files of the mappings it holds, and of the others the latest ones only."""
    from shmemctl.tap import watch as watch_module
    from shmemctl.tap.framer import Unit

    monkeypatch.setattr(watch_module, "KEPT_FILES", 8)
    watch = watch_module.Watch()

    def judge(msg, facts=None) -> None:
        watch.unit(BACKEND, "x", Unit(b"", msg.fds, msg), decoding=True, now=0.0, facts=facts)

    files = [FileFacts(1, 100 + i, f"/memfd:blob-{i} (deleted)", PAGE_SIZE) for i in range(40)]
    kept = ShmemMap(0, 0, PAGE_SIZE)
    judge(request(BACKEND, BackendReq.SHMEM_MAP, kept, need_reply=False, fds=(FAKE_FD,)),
          files[0])  # fmt: skip
    for i, facts in enumerate(files[1:], 1):
        m = ShmemMap(0, i * PAGE_SIZE, PAGE_SIZE)
        judge(request(BACKEND, BackendReq.SHMEM_MAP, m, need_reply=False, fds=(FAKE_FD,)), facts)
        judge(request(BACKEND, BackendReq.SHMEM_UNMAP, m, need_reply=False))
    assert watch.observer.mappings() == [Mapping.granted(kept, file=files[0].file, dev=1, ino=100)]
    assert (1, 100) in watch.files  # the picture's, however old
    assert len(watch.files) <= 8 + 1
    assert list(watch.files)[-4:] == [(1, 100 + i) for i in range(36, 40)]  # the latest
    assert (1, 101) not in watch.files  # the oldest of the others went
