"""What both sessions and the observer share: what a request is owed, what a session
asks its driver to do, and the rules a peer can break (each named once, with its passage
in docs/protocol.md)."""

from __future__ import annotations

import enum
import functools
from typing import NamedTuple

from ..wire.constants import ChannelKind, request_name
from ..wire.messages import (
    Message,
    Payload,
    ShmemMap,
    encode,
    encode_shmem_request,
    encode_u64_reply,
    spec_of,
)


class Owed(enum.Enum):
    """What the receiver of a request owes its sender (docs/protocol.md §3, §6.2)."""

    NOTHING = "nothing"
    #: a u64 ack: 0 for success, non-zero for failure
    ACK = "an ack"
    #: the request's own reply (GET_FEATURES, GET_SHMEM_CONFIG, ...), NEED_REPLY or not
    OWN_REPLY = "its own reply"


@functools.lru_cache(maxsize=512)  # pure, asked once a message; bounded: ids come off the wire
def owed(channel: ChannelKind, request: int, need_reply: bool, reply_ack: bool) -> Owed:
    """The one place that decides whether a reply is owed. A request with a reply of its
    own always gets that reply and nothing more; any other gets an ack only when it asked
    (NEED_REPLY) and REPLY_ACK was negotiated."""
    if spec_of(channel, request).own_reply:
        return Owed.OWN_REPLY
    return Owed.ACK if need_reply and reply_ack else Owed.NOTHING


def owed_by(msg: Message, reply_ack: bool) -> Owed:
    return owed(msg.channel, msg.request, msg.need_reply, reply_ack)


class Outgoing(NamedTuple):
    """A message a session wants sent: the driver encodes it and sends it with its fds."""

    channel: ChannelKind
    request: int
    payload: Payload = None
    reply: bool = False
    need_reply: bool = False
    fds: tuple[int, ...] = ()
    #: bytes to send in place of the encoding, for a message that must differ from it
    raw: bytes | None = None

    @property
    def name(self) -> str:
        return request_name(self.channel, self.request)

    def encode(self) -> bytes:
        if self.raw is not None:
            return self.raw
        payload = self.payload
        if self.reply and type(payload) is int:
            return encode_u64_reply(self.request, payload)  # the common ack: one pack
        if not self.reply and type(payload) is ShmemMap:
            return encode_shmem_request(self.request, payload, need_reply=self.need_reply)
        return encode(
            self.channel, self.request, payload, reply=self.reply, need_reply=self.need_reply
        )


def ack(msg: Message, value: int) -> Outgoing:
    return Outgoing(msg.channel, msg.request, value, reply=True)


class Note(NamedTuple):
    """Something the driver should tell its operator: a warning, or, if `routine`, a
    line of the normal course of things."""

    text: str
    routine: bool = False


class Hangup(NamedTuple):
    """The connection must end: the peer asked for what this end cannot give."""

    reason: str


class Rule(enum.Enum):
    """Rules of the session layer a peer can break, with where docs/protocol.md states them.
    The SHMEM_MAP/UNMAP validation steps are `shmem.rules.Refusal`."""

    REPLY_MATCHES_REQUEST = ("§3", "a reply answers the oldest request still owed one, with its id")
    REPLY_OWED = ("§3", "a reply only where one is owed (own reply, or an ack under NEED_REPLY)")
    REPLY_ONLY_UNDER_REPLY_ACK = ("§6.2", "SHMEM replies only when REPLY_ACK was negotiated")
    PROTOCOL_FEATURES_FIRST = ("§4", "SET_PROTOCOL_FEATURES must precede SET_BACKEND_REQ_FD")
    ACKS_ONLY_OFFERED = ("§4", "the front-end acks a subset of what the back-end offered")
    BACKEND_CHANNEL_FD = ("§1", "SET_BACKEND_REQ_FD carries exactly one fd")
    SHMEM_AT_BIT_22 = ("§6.1", "SHMEM is protocol feature bit 22; bit 21 is GPA_ADDRESSES")
    SHMEM_NEGOTIATED = ("§6.2", "SHMEM requests only once SHMEM and REPLY_ACK are negotiated")
    CONFIG_PAGE_MULTIPLES = ("§5", "every region size is a multiple of the page size")
    CONFIG_NREGIONS = ("§6.3", "nregions counts the non-zero sizes")
    CONFIG_STABLE = ("§5", "GET_SHMEM_CONFIG answers the same layout within a connection")
    MAP_VALID = ("§5", "a back-end sends only SHMEM requests a front-end can honour")
    REFUSES_INVALID = ("§5", "a front-end refuses a SHMEM request the rules refuse")
    NO_UNMAP_AFTER_RESET = ("§5", "a reset drops every mapping; none is unmapped after it")
    REPLY_BEFORE_FOLLOW_UP = (
        "§5",
        "the front-end answers a SHMEM request before it sends the memory table update the "
        "mapping causes, asking for an answer (a back-end waiting would never read it)",
    )
    #: judged by a watcher with a clock (the tap), never by the sans-I/O sessions
    ANSWERED_IN_TIME = ("§5", "a request owed a reply gets it, within the watcher's deadline")

    def __init__(self, passage: str, text: str) -> None:
        self.passage = passage
        self.text = text

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")
