"""How each front-end a device meets in the field behaves on the wire, as data the
`FrontendSession` follows (docs/protocol.md §8 says where each trait is in that
front-end's public code).

`strict` is the reference: every rule of docs/protocol.md checked, refusals answered
with the negated errno. The others reproduce what a back-end meets under QEMU (11.1,
the first with SHMEM), crosvm and Cloud Hypervisor (with the public SHMEM patches),
including where they depart from the strict reading; each trait is one field here
and one place in the session that reads it.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..shmem.rules import Refusal


class Step(enum.Enum):
    """The parts of a connection's set-up, in the order a profile does them."""

    #: GET_MAX_MEM_SLOTS, when CONFIGURE_MEM_SLOTS was acked
    MEM_SLOTS = "mem-slots"
    #: SET_OWNER
    OWNER = "owner"
    #: GET_SHMEM_CONFIG, and the regions reserved
    LAYOUT = "layout"
    #: SET_BACKEND_REQ_FD with a fresh socket pair
    BACKEND_CHANNEL = "backend-channel"
    #: SET_VRING_CALL and SET_VRING_ERR for each queue (QEMU's realize)
    VRING_NOTIFIERS = "vring-notifiers"
    #: SET_FEATURES
    FEATURES = "features"
    #: what a booted guest makes its VMM do: the status, guest RAM as a memory table,
    #: each ring set up and enabled
    START = "start"


class Reset(enum.Enum):
    """What a reset of the device is, on the wire and for the mappings."""

    #: RESET_DEVICE (or SET_STATUS 0, or RESET_OWNER); every mapping dropped
    DEVICE = "device"
    #: a guest reset under QEMU's vhost-user-base devices: the rings stop
    #: (SET_VRING_ENABLE 0, GET_VRING_BASE each) and every mapping is dropped without a
    #: word to the back-end; the guest then starts the device again
    RINGS = "rings"
    #: RESET_DEVICE, but the mappings stay (crosvm: not done yet in its code)
    KEEP_MAPPINGS = "keep-mappings"


@dataclass(frozen=True)
class Profile:
    name: str
    #: what it stands in for, in a line
    what: str
    order: tuple[Step, ...]
    #: the value every refusal is answered with; None: the negated errno
    refusal_value: int | None = None
    #: errnos of its own for some refusals (beside `Refusal.errno`)
    errnos: Mapping[Refusal, int] = field(default_factory=lambda: MappingProxyType({}))
    #: whether a SHMEM request is refused when SHMEM was not negotiated
    requires_shmem: bool = True
    #: how many shmids it serves, from the lowest of the layout (None: all)
    shmids: int | None = None
    #: each acked MAP (UNMAP) is announced to the back-end as guest memory: ADD_MEM_REG
    #: with the mapped fd (REM_MEM_REG) on the main channel, whose ack it waits for
    #: before it reads the backend channel again
    announces_mappings: bool = False
    reset: Reset = Reset.DEVICE
    #: a fresh backend channel at every activation (after each reset)
    fresh_channel: bool = False
    #: every region packed into one BAR, whose size must be a power of two, of page
    #: multiples (QEMU aborts realize otherwise)
    one_bar: bool = False

    def reply(self, err: int, reason: Refusal | None = None) -> int:
        """What a refusal for `err` (a `reason`) is answered with."""
        if self.refusal_value is not None:
            return self.refusal_value
        return -self.errnos.get(reason, err) if reason is not None else -err


#: Where guest RAM sits (guest-physical) and how big it is, for profiles that start
#: the device; the shared memory BAR is placed above it.
GUEST_RAM_GPA = 0
GUEST_RAM_SIZE = 16 << 20
SHMEM_BAR_GPA = 1 << 36

STRICT = Profile(
    "strict",
    "every rule checked; refusals answered with the negated errno (the reference)",
    (Step.OWNER, Step.LAYOUT, Step.BACKEND_CHANNEL, Step.FEATURES),
)

PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        STRICT,
        Profile(
            "qemu",
            "QEMU 11.1: replies 0 or 1, announces each mapping as guest memory, starts "
            "the device as a booted guest does, resets by stopping the rings",
            (
                Step.MEM_SLOTS,
                Step.BACKEND_CHANNEL,
                Step.OWNER,
                Step.VRING_NOTIFIERS,
                Step.LAYOUT,
                Step.FEATURES,
                Step.START,
            ),
            refusal_value=1,
            requires_shmem=False,
            announces_mappings=True,
            reset=Reset.RINGS,
            one_bar=True,
        ),
        Profile(
            "crosvm",
            "crosvm: one shmid only; a reset leaves the mappings in place",
            (Step.OWNER, Step.LAYOUT, Step.BACKEND_CHANNEL, Step.FEATURES),
            shmids=1,
            reset=Reset.KEEP_MAPPINGS,
        ),
        Profile(
            "cloud-hypervisor",
            "Cloud Hypervisor (SHMEM patches): the layout at creation, a fresh backend "
            "channel at every activation, EBUSY on overlap",
            (Step.OWNER, Step.LAYOUT, Step.FEATURES, Step.BACKEND_CHANNEL),
            errnos=MappingProxyType({Refusal.OVERLAP: errno.EBUSY}),
            fresh_channel=True,
        ),
    )
}
