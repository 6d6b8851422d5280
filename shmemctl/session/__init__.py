"""The protocol's sessions, without I/O: fed decoded messages, they say what to send
and what to do (docs/protocol.md §3-§5).

* `FrontendSession`: the VMM's side: the handshake, resets, and the judgement of each
  SHMEM request before the engine maps it.
* `BackendSession`: the device's side: the answer to every main-channel request, and
  whether a SHMEM request may be sent.
* `Observer`: both directions of one pair, from the side: state and rule violations.

Daemons drive them (`shmemctl.frontend.endpoint`, `shmemctl.backend`); tests feed them
messages in memory.
"""

from .backend import BackendSession, Forget, NotReady, OpenBackendChannel, ProtocolViolation
from .common import Hangup, Note, Outgoing, Owed, Rule, owed, owed_by
from .frontend import FrontendSession, HandshakeError, NeedBackendChannel, Negotiated
from .observer import Observer, Violation

__all__ = [
    "BackendSession",
    "Forget",
    "FrontendSession",
    "HandshakeError",
    "Hangup",
    "NeedBackendChannel",
    "Negotiated",
    "NotReady",
    "Note",
    "Observer",
    "OpenBackendChannel",
    "Outgoing",
    "Owed",
    "ProtocolViolation",
    "Rule",
    "Violation",
    "owed",
    "owed_by",
]
