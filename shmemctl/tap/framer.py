"""Message boundaries of one direction of one channel, for a relay that must forward
exactly what arrived: sans-I/O, on top of the codec's `MessageReader`.

The relay reads what `wanted` asks for (so that a read never spans two messages and
fds stay with the message they came with, as SCM_RIGHTS attaches them to its first
byte) and feeds it here. Each `Unit` that comes out is the exact bytes and fds to
send on, in one piece, with the decoded message when there is one. Nothing is ever
dropped: a message the codec refuses is still a unit; when a header cannot be trusted
the framing is lost and every later chunk is a unit of its own, as it came.

The framer owns the fds it was fed until it hands them out in a unit; `close` closes
those of a message that never completed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from ..channel import close_fds
from ..session.observer import BACKEND, FRONTEND
from ..wire.constants import HEADER_SIZE, BackendReq, ChannelKind, FrontendReq
from ..wire.messages import (
    Header,
    Message,
    MessageReader,
    Raw,
    WireError,
    WireFault,
    decode_body,
    decode_header,
)

#: How much a relay reads at once once the framing is lost (no boundary to respect).
RAW_CHUNK = 64 * 1024

#: Header faults after which the header's size can still be believed: the version is 1,
#: no reserved bit is set and the size is within the ceiling, only the REPLY/NEED_REPLY
#: bits are wrong for the stream (libvhost-user's 0xd replies are one). The message
#: still ends where its header says.
_FRAMED_FAULTS = frozenset(
    {WireFault.UNEXPECTED_REPLY, WireFault.UNEXPECTED_REQUEST, WireFault.NEED_REPLY_ON_REPLY}
)

#: Faults of a payload under a sound header: the message was consumed whole.
_PAYLOAD_FAULTS = frozenset({WireFault.BAD_PAYLOAD_SIZE, WireFault.BAD_FIELD})


class Unit(NamedTuple):
    """What to send on, in one piece: exactly these bytes with exactly these fds."""

    data: bytes
    fds: tuple[int, ...]
    #: the message as an observer should see it; None for bytes that are not one (or
    #: that it must not see: a request on a reply stream is nobody's request)
    message: Message | None = None
    #: why the codec could not take it as it is ("" when it could)
    problem: str = ""
    #: the id its header names, when there was a header to read
    request: int | None = None
    #: False for raw bytes past a lost framing, or the start of a message cut short
    framed: bool = True


def replies_from(kind: ChannelKind, sender: str) -> bool:
    """Whether `sender` is the side that answers on a channel of `kind` (the back-end on
    the main channel, the front-end on a backend channel): what a framer of that
    direction reads is replies."""
    return sender == (BACKEND if kind is ChannelKind.MAIN else FRONTEND)


#: the request ids the protocol defines on each channel (asked of every unit: a set
#: lookup, where building the enum member and catching its ValueError cost microseconds)
_KNOWN_IDS = {
    ChannelKind.MAIN: frozenset(int(r) for r in FrontendReq),
    ChannelKind.BACKEND: frozenset(int(r) for r in BackendReq),
}


def known_request(channel: ChannelKind, request: int) -> bool:
    """Whether the protocol defines this request id on this channel."""
    return request in _KNOWN_IDS[channel]


class Framer:
    """Feed chunks of `wanted` bytes with the fds that came with them; take `Unit`s."""

    def __init__(self, channel: ChannelKind, *, replies: bool) -> None:
        self.channel = channel
        self.replies = replies
        #: False once the framing was lost: from then on every chunk is a unit as it came
        self.decoding = True
        self._reader = MessageReader(channel, replies=replies)
        self._data = bytearray()
        self._fds: list[int] = []
        #: a refused header whose message is still arriving (its size was believable)
        self._refused: WireError | None = None

    @property
    def wanted(self) -> int:
        return self._reader.wanted if self.decoding else RAW_CHUNK

    @property
    def holding(self) -> bool:
        """Whether part of a message has arrived and waits for the rest."""
        return bool(self._data or self._fds)

    @property
    def held_fds(self) -> tuple[int, ...]:
        """fds of a message not complete yet (still this framer's)."""
        return tuple(self._fds)

    def payload_after(self, data: bytes) -> int:
        """What a relay may read at once after `data`, the chunk it just read: when that
        is exactly a sound header at a message's start, the payload it announces (the
        two reads are of one message, so the fds of both belong to it, and fed as one
        chunk the message is decoded as it came); otherwise 0, and `wanted` says what
        comes next."""
        if len(data) != HEADER_SIZE or self.holding or not self.decoding:
            return 0
        try:
            return decode_header(data, replies=self.replies).size
        except WireError:
            return 0  # fed as it is: the framer judges it and says what follows

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> Unit | None:
        """One chunk as read; the unit it completed, if any."""
        if not self.decoding:
            return Unit(bytes(data), tuple(fds), framed=False)
        self._data += data
        self._fds.extend(fds)
        reader = self._reader
        try:
            message = reader.receive(data, fds)
        except WireError as exc:
            if exc.fault in _PAYLOAD_FAULTS:  # a sound header, a payload the codec refuses
                request, flags = self._header_fields()
                payload = Raw(bytes(self._data[HEADER_SIZE:]))
                raw = Message(self.channel, request, flags, payload, tuple(self._fds))
                return self._take(raw, str(exc), request)
            if exc.fault not in _FRAMED_FAULTS:
                self.decoding = False
                return self._take(None, f"{exc}: the framing is lost", self._header_id(), False)
            self._refused = exc
            message = None
        finally:
            # the same fd numbers as self._fds: this framer owns them, the reader's copy
            # of the list must not be closed by anyone
            reader.discarded.clear()
        if self._refused is not None:
            return None if reader.discarding else self._take_refused()
        if message is None:
            return None
        problem = ""
        if not message.is_reply and not known_request(self.channel, message.request):
            problem = f"unknown {self.channel.value}-channel request id {message.request}"
        return self._take(message, problem, message.request)

    def end(self) -> Unit | None:
        """The stream ended: the start of a message cut short, if one was arriving."""
        if not self._data and not self._fds:
            return None
        return self._take(
            None,
            f"the stream ended inside a message ({len(self._data)} bytes of it arrived)",
            self._header_id(),
            False,
        )

    def close(self) -> None:
        """Close the fds of a message that will never be forwarded."""
        fds, self._fds = self._fds, []
        close_fds(fds)
        self._data.clear()

    # ------------------------------------------------------------ inside

    def _header_id(self) -> int | None:
        if len(self._data) < 4:
            return None
        return int.from_bytes(self._data[:4], "little")

    def _header_fields(self) -> tuple[int, int]:
        """The request id and flags of the header at the start of what is held."""
        return int.from_bytes(self._data[0:4], "little"), int.from_bytes(self._data[4:8], "little")

    def _take_refused(self) -> Unit:
        exc, self._refused = self._refused, None
        assert exc is not None
        request, flags = self._header_fields()
        message = None
        if exc.fault is WireFault.NEED_REPLY_ON_REPLY:
            # a reply all the same: whoever keeps count of what is owed must see it
            payload = bytes(self._data[HEADER_SIZE:])
            message = _reply(self.channel, request, flags, payload, tuple(self._fds))
        return self._take(message, str(exc), request)

    def _take(
        self, message: Message | None, problem: str, request: int | None, framed: bool = True
    ) -> Unit:
        unit = Unit(bytes(self._data), tuple(self._fds), message, problem, request, framed)
        self._data.clear()
        self._fds = []
        return unit


def _reply(
    channel: ChannelKind, request: int, flags: int, payload: bytes, fds: tuple[int, ...]
) -> Message:
    """A reply whose flags the codec refuses, decoded as if they were right."""
    try:
        return decode_body(channel, Header(request, flags, len(payload)), payload, fds)
    except WireError:
        return Message(channel, request, flags, Raw(payload), fds)
