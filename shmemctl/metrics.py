"""`shmemctl metrics`: every pair and tap on this host in Prometheus' exposition format.

Nothing is kept between scrapes: each scrape asks every control socket in the run
directory for its status (the front-end without its mapping lists) and turns the
answers into metric families, so what a scrape says is what the daemons said at that
moment. A daemon that does not answer within two seconds is `shmemctl_up 0`, never an
error of the endpoint. Counters are the daemons' own counts since they started.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from . import rundir
from .inventory import PAIR_ROLES, each_name, kind_of
from .pair import daemon_status

#: the front-end's counters, as counter families (name, help)
_FRONTEND_COUNTERS = {
    "maps": "SHMEM_MAPs the front-end mapped",
    "unmaps": "SHMEM_UNMAPs the front-end carried out",
    "refused": "SHMEM requests the front-end refused",
    "resets": "device resets (every mapping dropped)",
    "connections": "connections to a back-end (a reconnect is one more)",
}
#: a state in which the daemon has its peer
_CONNECTED = frozenset({"connected", "relaying"})


def _ask(name: str) -> list[tuple[str, dict[str, Any] | None]]:
    """(role, status or None) of each daemon under `name`: a pair's two, or a tap."""
    paths = rundir.pair(name)
    kind = kind_of(paths)
    if kind is None:
        return []
    roles = PAIR_ROLES if kind == "pair" else ("tap",)
    return [(role, daemon_status(paths, role)) for role in roles]


class _Families:
    """The metric families of one scrape, filled daemon by daemon."""

    def __init__(self) -> None:
        g, c = GaugeMetricFamily, CounterMetricFamily
        self.up = g("shmemctl_up", "1 when the daemon's control socket answered this scrape",
                    labels=["pair", "role"])  # fmt: skip
        self.connected = g("shmemctl_connected", "1 when the daemon has its peer",
                           labels=["pair", "role"])  # fmt: skip
        self.state = g("shmemctl_state", "the daemon's state, as a label set to 1",
                       labels=["pair", "role", "state"])  # fmt: skip
        region = ["pair", "role", "shmid"]
        self.size = g("shmemctl_region_size_bytes", "a shared memory region's size",
                      labels=region)  # fmt: skip
        self.mappings = g("shmemctl_region_mappings", "mappings in place in a region",
                          labels=region)  # fmt: skip
        self.mapped = g("shmemctl_region_mapped_bytes", "bytes mapped in a region",
                        labels=region)  # fmt: skip
        self.counters = {
            key: c(f"shmemctl_frontend_{key}", text, labels=["pair"])
            for key, text in _FRONTEND_COUNTERS.items()
        }
        self.refusals = c("shmemctl_frontend_refusals",
                          "SHMEM requests the front-end refused, by the errno it answered",
                          labels=["pair", "errno"])  # fmt: skip
        self.ack_latency = HistogramMetricFamily(
            "shmemctl_frontend_ack_seconds",
            "from a SHMEM request read by the front-end to its answer sent",
            labels=["pair"],
        )
        self.violations = c("shmemctl_tap_violations",
                            "rules of the protocol a side of a tapped pair broke",
                            labels=["pair", "rule"])  # fmt: skip
        self.verdict = g("shmemctl_proc_verdict",
                         "the /proc check of the front-end's maps: agree, disagree or unknown "
                         "as a label set to 1", labels=["pair", "role", "verdict"])  # fmt: skip
        process = ["pair", "role", "process"]
        self.rss = g("shmemctl_process_resident_memory_bytes", "a process's resident memory",
                     labels=process)  # fmt: skip
        self.fds = g("shmemctl_process_open_fds", "a process's open file descriptors",
                     labels=process)  # fmt: skip

    def all(self) -> Iterator[Metric]:
        yield from (self.up, self.connected, self.state, self.size, self.mappings, self.mapped)
        yield from self.counters.values()
        yield from (self.refusals, self.ack_latency)
        yield from (self.violations, self.verdict, self.rss, self.fds)

    def daemon(self, name: str, role: str, status: dict[str, Any] | None) -> None:
        self.up.add_metric([name, role], 0 if status is None else 1)
        if status is None:
            return
        state = str(status.get("state", ""))
        self.connected.add_metric([name, role], 1 if state in _CONNECTED else 0)
        self.state.add_metric([name, role, state], 1)
        self.process(name, role, "self", status.get("process"))
        if role == "frontend":
            self.frontend(name, status)
        elif role == "backend":
            for shmid, size in status.get("regions", {}).items():
                self.size.add_metric([name, role, str(shmid)], size)
        else:
            self.tap(name, status)

    def process(self, name: str, role: str, which: str, facts: dict[str, Any] | None) -> None:
        if not facts:
            return
        if facts.get("rss") is not None:
            self.rss.add_metric([name, role, which], facts["rss"])
        if facts.get("fds") is not None:
            self.fds.add_metric([name, role, which], facts["fds"])

    def regions(self, name: str, role: str, regions: list[dict[str, Any]]) -> None:
        for r in regions:
            labels = [name, role, str(r["shmid"])]
            if r.get("size") is not None:
                self.size.add_metric(labels, r["size"])
            self.mappings.add_metric(labels, r["count"])
            self.mapped.add_metric(labels, r["mapped_bytes"])

    def frontend(self, name: str, status: dict[str, Any]) -> None:
        self.regions(name, "frontend", status.get("regions", []))
        for key, family in self.counters.items():
            family.add_metric([name], status.get("counters", {}).get(key, 0))
        for errno, count in status.get("refusals", {}).items():
            self.refusals.add_metric([name, errno], count)
        latency = status.get("ack_latency")
        if latency is not None:
            buckets = [(str(bound), count) for bound, count in latency["buckets"]]
            self.ack_latency.add_metric([name], buckets, latency["sum"])
        # the front-end's own check of its table against its maps
        verdict = "disagree" if status.get("disagreements") else "agree"
        self.verdict.add_metric([name, "frontend", verdict], 1)

    def tap(self, name: str, status: dict[str, Any]) -> None:
        self.regions(name, "tap", status.get("regions", []))
        for rule, count in status.get("violations", {}).items():
            self.violations.add_metric([name, rule], count)
        self.verdict.add_metric([name, "tap", status["truth"]["verdict"]], 1)
        for side, view in status.get("sides", {}).items():
            self.process(name, "tap", side, view.get("process"))


class HostCollector(Collector):
    """Every pair and tap in the run directory root, asked at each scrape."""

    def collect(self) -> Iterator[Metric]:
        families = _Families()
        for name, daemons in each_name(_ask):
            for role, status in daemons:
                families.daemon(name, role, status)
        yield from families.all()


def registry() -> CollectorRegistry:
    """A registry holding only this host's pairs and taps (not the exporter's own
    process metrics, which say nothing about them)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(HostCollector())
    return reg
