"""What one console frame costs with a crowded region: the map bar, the table, a burst.

    python bench/tui_render.py [MAPPINGS]

Prints milliseconds per operation for a region of 1 GiB holding MAPPINGS (default 65,536)
4 KiB mappings, a third of them read-only.
"""

from __future__ import annotations

import sys
import time

from shmemctl.events import Event, qmp_timestamp
from shmemctl.shmem.mapping import Mapping
from tui.model import EventLog, PairModel, RegionView
from tui.widgets import bar_cells, entry_lines


def ms(fn, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def main(count: int = 65_536) -> None:
    region = RegionView(0, 1 << 30)
    for i in range(count):
        region.mappings[i * 8192] = Mapping(0, i * 8192, 4096, 0, i % 3 != 0, "memfd:x")
    region.changed()
    model = PairModel()
    model.regions[0] = region
    print(f"{count} mappings in a 1 GiB region")

    def reindex() -> None:
        region.changed()
        region.by_access  # noqa: B018 - building it is what is measured

    print(f"{ms(reindex, 3):8.1f} ms  re-index after a change (once per frame at most)")
    print(
        f"{ms(lambda: bar_cells(region, 0, region.size, 96)):8.1f} ms  bar, whole region, 96 cells"
    )
    print(f"{ms(lambda: bar_cells(region, 1 << 29, 1 << 20, 96)):8.1f} ms  bar, zoomed to 1 MiB")
    print(f"{ms(lambda: region.rows(around=count // 2 * 8192)):8.1f} ms  "
          "the table's 2,000 rows around the cursor, offset order")  # fmt: skip
    print(f"{ms(lambda: region.rows(sort='length', reverse=True)):8.1f} ms  "
          "the same, sorted by length")  # fmt: skip
    events = [
        {"event": Event.MAPPED.value, "timestamp": qmp_timestamp(0.0),
         "data": {"shmid": 0, "shm_offset": (count + i) * 8192, "len": 4096, "fd_offset": 0,
                  "writable": True}}
        for i in range(10_000)
    ]  # fmt: skip
    print(f"{ms(lambda: [model.apply('frontend', e) for e in events], 1):8.1f} ms  "
          "apply a burst of 10,000 events")  # fmt: skip

    # the event log: each map reported by both daemons, paired into one entry
    reports = [(side, event) for event in events[:5000] for side in ("backend", "frontend")]

    def log_burst() -> EventLog:
        log = EventLog()
        for side, event in reports:
            log.add(side, event)
        return log

    log = log_burst()
    print(f"{ms(log_burst, 3):8.1f} ms  log a burst of 10,000 reports (5,000 maps, both sides) "
          f"as {len(log.entries)} entries")  # fmt: skip
    print(f"{ms(lambda: [entry_lines(e, 28) for e in log.entries], 3):8.1f}"
          f" ms  wrap the log's {len(log.entries)} entries to 28 columns (a resize; a new entry "
          "costs one)")  # fmt: skip


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 65_536)
