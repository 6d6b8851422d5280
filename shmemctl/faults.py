"""Deliberate protocol faults, so a conformance check can be shown to catch each one.

`shmemctl frontend --fault NAME` and `python -m backend_sim --fault NAME` turn
one of these on; nothing else ever does. Each breaks exactly one rule of the
brief, named beside it.
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
}


def check_faults(names: tuple[str, ...] | list[str], known: dict[str, str]) -> frozenset[str]:
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(
            f"unknown fault {', '.join(unknown)}; there are: {', '.join(sorted(known))}"
        )
    return frozenset(names)
