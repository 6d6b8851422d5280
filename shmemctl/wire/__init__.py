"""Sans-I/O vhost-user codec: header, payloads, typed messages. No sockets here."""

from .constants import (
    SHMEM_BIT,
    BackendReq,
    ChannelKind,
    FrontendReq,
    ProtocolFeature,
    feature_names,
)
from .messages import (
    Message,
    MessageReader,
    ShmemConfig,
    ShmemMap,
    WireError,
    WireFault,
    decode_body,
    decode_header,
    describe_result,
    encode,
    encode_shmem_request,
    encode_u64_reply,
    result_from_errno,
)

__all__ = [
    "SHMEM_BIT",
    "BackendReq",
    "ChannelKind",
    "FrontendReq",
    "Message",
    "MessageReader",
    "ProtocolFeature",
    "ShmemConfig",
    "ShmemMap",
    "WireError",
    "WireFault",
    "decode_body",
    "decode_header",
    "describe_result",
    "encode",
    "encode_shmem_request",
    "encode_u64_reply",
    "feature_names",
    "result_from_errno",
]
