"""A latency histogram a daemon keeps as it works, for its status and for Prometheus.

Fixed buckets, counted as observations come (one bisect and an addition each), so
keeping it costs the hot path next to nothing and its size never grows; the JSON form
is Prometheus' own shape (cumulative counts per upper bound, a sum and a count), so
`shmemctl metrics` hands it on as a histogram without reinterpreting it.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TypedDict

#: Upper bounds in seconds: from the few microseconds an answer takes on a quiet
#: machine to the second a stalled one takes.
BOUNDS = (
    5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 1.0,
)  # fmt: skip


class HistogramJSON(TypedDict):
    #: [upper bound in seconds, observations at or under it]; the last bound is "+Inf"
    buckets: list[tuple[float | str, int]]
    sum: float
    count: int


class LatencyHistogram:
    """Observations of a duration. One thread observes; readers may see a bucket a step
    behind the sum, never a torn value (each field is one Python object)."""

    def __init__(self) -> None:
        self._counts = [0] * (len(BOUNDS) + 1)  # the last one: over every bound
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        self._counts[bisect_left(BOUNDS, seconds)] += 1
        self._sum += seconds

    def to_json(self) -> HistogramJSON:
        cumulative, buckets = 0, []
        bounds: tuple[float | str, ...] = (*BOUNDS, "+Inf")
        for bound, count in zip(bounds, self._counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        return {"buckets": buckets, "sum": self._sum, "count": cumulative}
