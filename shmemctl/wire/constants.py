"""Message ids, header flags and feature bits of vhost-user (docs/protocol.md §2-§4).

The two channels have separate id spaces, hence two enums: 9 is
SET_VRING_ADDR on the main channel and SHMEM_MAP on the backend channel.
"""

from __future__ import annotations

import enum
import sys

if sys.byteorder != "little":  # the wire is host order; every codec here uses "<"
    raise ImportError("shmemctl speaks vhost-user in little-endian only; this host is big-endian")

HEADER_SIZE = 12
#: rust-vmm's MAX_MSG_SIZE; a larger announced payload is a protocol error.
MAX_PAYLOAD = 4096
#: room reserved for SCM_RIGHTS on every receive; a rust-vmm front-end sends up to 32.
MAX_FDS = 32
#: the backend channel carries at most this many fds in one message.
MAX_BACKEND_FDS = 8
#: GET_SHMEM_CONFIG always carries this many sizes; the index is the shmid.
SHMEM_SLOTS = 256

VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

#: virtio feature bit 30: the back-end speaks protocol features.
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
VIRTIO_F_VERSION_1 = 1 << 32
#: Bits of the virtio device status: DRIVER_OK, and a driver that is up (ACKNOWLEDGE |
#: DRIVER | FEATURES_OK | DRIVER_OK)
STATUS_DRIVER_OK = 0x4
STATUS_UP = 0x1 | 0x2 | 0x8 | 0x4
#: SET_VRING_KICK/CALL/ERR's u64: the ring index, and bit 8 for "no fd: the ring is polled"
VRING_INDEX_MASK = 0xFF
VRING_NOFD = 1 << 8

#: The one place the SHMEM protocol feature bit is named (docs/protocol.md §6.1).
SHMEM_BIT = 22
#: rust-vmm `vhost` 0.16 shipped SHMEM at 21; reachable only through --shmem-bit 21.
LEGACY_SHMEM_BIT = 21
ACCEPTED_SHMEM_BITS = (SHMEM_BIT, LEGACY_SHMEM_BIT)


class ChannelKind(enum.Enum):
    MAIN = "main"
    BACKEND = "backend"

    # Members are singletons compared by identity, so identity is an exact hash; Enum's
    # own hashes the name in Python, and messages are keyed by their channel.
    __hash__ = object.__hash__


class FrontendReq(enum.IntEnum):
    """Requests the front-end sends on the main channel."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44


class BackendReq(enum.IntEnum):
    """Requests the back-end sends on the backend channel."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


class ProtocolFeature(enum.IntFlag):
    """Protocol feature bits (GET/SET_PROTOCOL_FEATURES), SHMEM at its merged bit."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19
    GET_VRING_BASE_INFLIGHT = 1 << 20
    GPA_ADDRESSES = 1 << 21
    SHMEM = 1 << SHMEM_BIT


def check_shmem_bit(bit: int) -> int:
    """Return `bit` if it may carry SHMEM; 20 and anything else are refused."""
    if bit not in ACCEPTED_SHMEM_BITS:
        raise ValueError(
            f"SHMEM is protocol feature bit {SHMEM_BIT} (or {LEGACY_SHMEM_BIT} for rust-vmm "
            f"vhost 0.16 peers only); {bit} is not accepted"
        )
    return bit


def feature_names(mask: int, shmem_bit: int = SHMEM_BIT) -> list[str]:
    """Names of the protocol feature bits set in `mask`, SHMEM wherever `shmem_bit` puts it."""
    names = []
    for bit in range(64):
        if not mask & (1 << bit):
            continue
        if bit == shmem_bit:
            names.append("SHMEM" if bit == SHMEM_BIT else f"SHMEM@{bit}")
            continue
        try:
            name = ProtocolFeature(1 << bit).name
        except ValueError:
            name = None
        names.append(name if name and bit != SHMEM_BIT else f"BIT{bit}")
    return names


def request_name(channel: ChannelKind, request: int) -> str:
    enum_type = FrontendReq if channel is ChannelKind.MAIN else BackendReq
    try:
        return enum_type(request).name
    except ValueError:
        return f"UNKNOWN_{request}"
