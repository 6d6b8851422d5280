"""Where `shmemctl bench` lays its mappings in region 0: shared by the bench, which
sizes the region, and backend_sim, which maps there. A module of its own so that
backend_sim does not import the bench (and the launcher, click, psutil) to start."""

from __future__ import annotations

from .shmem.libc import PAGE_SIZE

#: backend_sim's bench maps and unmaps inside a window of this size (room for 64 mappings of
#: 2 MiB), with the existing 4 KiB mappings alternating below and above it
CHURN = 128 << 20


def churn_base(most: int) -> int:
    """Where the churn window starts for a script whose largest EXISTING is `most`: at
    128 MiB, or higher so that the lower half of the existing mappings fits below it."""
    below = (most + 1) // 2 * PAGE_SIZE
    return max(CHURN, -(-below // CHURN) * CHURN)


def bench_span(base: int, existing: int) -> int:
    """The bytes of region 0 a bench with its window at `base` and `existing` mappings
    in place uses: below the window, the window, and the upper half above it."""
    return base + CHURN + (existing + 1) // 2 * PAGE_SIZE
