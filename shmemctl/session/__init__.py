"""The protocol's sessions, without I/O: fed decoded messages, they say what to send
and what to do (docs/protocol.md §3-§5).

* `FrontendSession`: the VMM's side: the handshake, resets, and the judgement of each
  SHMEM request before the engine maps it.
* `BackendSession`: the device's side: the answer to every main-channel request, and
  whether a SHMEM request may be sent.
* `Observer`: both directions of one pair, from the side: state and rule violations.
* `PROFILES`: how the front-ends in the field behave, as options of `FrontendSession`.

Daemons drive them (`shmemctl.frontend.endpoint`, `shmemctl.backend`); tests feed them
messages in memory.
"""

from .backend import BackendSession, Forget, NotReady, OpenBackendChannel, ProtocolViolation
from .common import Hangup, Note, Outgoing, Owed, Rule, owed, owed_by
from .frontend import (
    DropMappings,
    FrontendSession,
    GuestMemory,
    HandshakeError,
    NeedBackendChannel,
    Negotiated,
)
from .observer import Observer, Violation
from .profiles import PROFILES, Profile

__all__ = [
    "PROFILES",
    "BackendSession",
    "DropMappings",
    "Forget",
    "FrontendSession",
    "GuestMemory",
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
    "Profile",
    "ProtocolViolation",
    "Rule",
    "Violation",
    "owed",
    "owed_by",
]
