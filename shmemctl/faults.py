"""Deliberate protocol faults, so a conformance check can be shown to catch each one.

`shmemctl frontend --fault NAME` and `python -m backend_sim --fault NAME` turn
one of these on; nothing else ever does. Each breaks exactly one rule of the
protocol (docs/protocol.md §N, named beside it).
"""

from __future__ import annotations

FRONTEND_FAULTS = {
    "reply-twice": "answers a SHMEM request twice (§5: exactly one reply)",
    "reply-always": "answers SHMEM requests that did not ask (§6.2: only under NEED_REPLY)",
    "no-reply": "never answers a SHMEM request (§5: a reply is owed under NEED_REPLY)",
    "bad-reply-flags": "replies with flags 0xd instead of 0x5 (§2)",
    "stale-reply": "replies with the request's own bytes instead of a u64 (§5, the seeds' bug)",
    "skip-overlap-check": "maps over an existing mapping (§5 step 10)",
    "skip-alignment-check": "accepts a length that is not page aligned (§5 step 9)",
    "ack-gpa": "acks protocol bit 21 (GPA_ADDRESSES) when offered (§6.1)",
    "reply-ok-always": "answers 0 to every SHMEM request, mapping nothing it should refuse (§5)",
    "reply-fail-always": "answers failure to every SHMEM request and maps nothing (§5)",
    "ignore-unasked": "drops SHMEM requests that ask for no reply (§5: in order, all handled)",
    "ask-config-twice": "asks GET_SHMEM_CONFIG twice in one connection (§5)",
    "backend-fd-twice": "sends SET_BACKEND_REQ_FD with two fds (§1)",
    "no-reply-ack": "acks SHMEM without REPLY_ACK (§6.2)",
    "ack-unoffered": "acks protocol bit 14, which the back-end did not offer (§4)",
    "bad-request-flags": "sends SET_OWNER with a reserved flag bit (§2)",
    "backend-channel-first": "sends SET_BACKEND_REQ_FD before SET_PROTOCOL_FEATURES (§4)",
    "exit-mid-handshake": "exits once SET_BACKEND_REQ_FD is acked, before SET_FEATURES: a crash "
    "that leaves the back-end without a peer (§1)",
}

BACKEND_FAULTS = {
    "short-shmem-config": "answers GET_SHMEM_CONFIG with 2048 bytes, not 2056 (§2, §5)",
    "bad-nregions": "answers GET_SHMEM_CONFIG with nregions 300 (§5: at most 256)",
    "unaligned-config": "advertises a region size that is not a page multiple (§5)",
    "unstable-config": "answers GET_SHMEM_CONFIG differently the second time (§5)",
    "offer-bit-21": "offers protocol bit 21 (GPA_ADDRESSES) beside SHMEM (§6.1)",
    "no-ack": "never acks a NEED_REPLY request on the main channel (§3)",
    "ack-twice": "acks a NEED_REPLY request twice (§3, §5: exactly one reply)",
    "bad-reply-flags": "replies on the main channel with flags 0x1 instead of 0x5 (§2)",
    "map-without-shmem": "sends SHMEM_MAP although SHMEM was not negotiated (§6.2)",
    "unmap-after-reset": "sends SHMEM_UNMAP for mappings a reset already dropped (§5)",
    "echo-need-reply": "replies to a getter sent with NEED_REPLY with flags 0xd (§2, §3)",
    "ack-always": "acks main-channel requests that asked for no reply (§3)",
    "nregions-mismatch": "answers GET_SHMEM_CONFIG with nregions one more than in use (§6.3)",
    "shmem-without-reply-ack": "offers SHMEM but not REPLY_ACK (§6.2)",
    "map-two-fds": "sends SHMEM_MAP with two fds (§5 step 2)",
    "map-out-of-bounds": "asks for maps past the end of the region (§5 step 8)",
    "short-protocol-features": "answers GET_PROTOCOL_FEATURES with 4 bytes, not 8 (§2)",
    "fail-backend-channel": "answers SET_BACKEND_REQ_FD with a failure ack (§4)",
}


def check_faults(names: tuple[str, ...] | list[str], known: dict[str, str]) -> frozenset[str]:
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(
            f"unknown fault {', '.join(unknown)}; there are: {', '.join(sorted(known))}"
        )
    return frozenset(names)
