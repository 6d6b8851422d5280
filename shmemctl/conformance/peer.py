"""Telling a peer that went away from one that declined something: a hang-up is seen on
the socket itself, and the suite remembers what the peer did last, for the report."""

from __future__ import annotations

import select
import socket

_GONE = select.POLLHUP | select.POLLRDHUP | select.POLLERR


def hung_up(sock: socket.socket) -> bool:
    """The peer closed its end (or reset it): nothing more will come from it."""
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    return any(events & _GONE for _, events in poller.poll(0))


class Stopped(Exception):
    """The suite cannot go on with this peer; the message says why, for the checks left."""


class PeerGone(Stopped):
    """The peer hung up mid-suite."""


class Peer:
    """What the peer did last, and which check was waiting on it when it went away."""

    def __init__(self) -> None:
        self.last = "before it sent anything"
        self.waiting = ""
        #: how it went, once it has: "hung up after it sent SET_BACKEND_REQ_FD"
        self.gone: str | None = None

    def did(self, what: str) -> None:
        self.last = what

    def hang_up(self) -> PeerGone:
        """Note that the peer went away (the first sighting tells); the exception to raise."""
        if self.gone is None:
            during = f", during {self.waiting}" if self.waiting else ""
            self.gone = f"hung up {self.last}{during}"
        return PeerGone(self.gone)
