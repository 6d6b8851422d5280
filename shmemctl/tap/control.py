"""The tap's control commands: status and the last layout. It is an observer: no
command changes the pair."""

from __future__ import annotations

import copy
from typing import Any

from ..control import Command, ControlError, ErrorClass
from ..daemon import process_facts
from ..shmem.mapping import Mapping
from ..wire import ChannelKind, feature_names
from .tap import SIDES, Tap


def _hex(value: int | None) -> str | None:
    return None if value is None else f"{value:#x}"


def _features(mask: int | None, bit: int) -> list[str] | None:
    return None if mask is None else feature_names(mask, bit)


def _regions(sizes: dict[int, int], mappings: list[Mapping]) -> list[dict[str, Any]]:
    """Per region, its size and the mappings in it, each in the one JSON form."""
    by_region: dict[int, list[Mapping]] = {}
    for m in mappings:
        by_region.setdefault(m.shmid, []).append(m)
    return [
        {
            "shmid": shmid,
            "size": sizes.get(shmid),
            "count": len(by_region.get(shmid, [])),
            "mapped_bytes": sum(m.len for m in by_region.get(shmid, [])),
            "mappings": [m.to_json() for m in by_region.get(shmid, [])],
        }
        for shmid in sorted(set(sizes) | set(by_region))
    ]


def status(tap: Tap) -> dict[str, Any]:
    bit = tap.options.shmem_bit
    with tap.lock:
        observer = tap.observer
        state = observer.state
        offered, acked = state.offered, state.acked
        negotiated = None if acked is None else acked & (offered if offered is not None else acked)
        answer: dict[str, Any] = {
            "role": "tap",
            "state": tap.state,
            "connection": tap.connections,
            "sides": {
                side: {
                    "socket": tap.endpoints[side].path,
                    "mode": tap.endpoints[side].mode,
                    "attached": tap.attached[side],
                }
                for side in SIDES
            },
            "shmem_bit": bit,
            "negotiated": {
                "offered": _features(offered, bit),
                "acked": _features(acked, bit),
                "protocol_features": _features(negotiated, bit),
                "device_features": _hex(state.device_features),
                "features": _hex(state.features),
                "shmem": observer.shmem,
                "reply_ack": observer.reply_ack,
                "backend_channel": state.backend_channel,
            },
            "regions": _regions(
                state.config.regions() if state.config else {}, observer.mappings()
            ),
            "resets": state.resets,
            "pending": {
                kind.value: [m.name for m in observer.pending(kind)] for kind in ChannelKind
            },
            "violations": dict(tap.violations),
            "counters": copy.deepcopy(tap.counters),
            "raw": sorted(tap.raw),
            #: channels whose rules are no longer judged, one direction's framing lost
            "unjudged": sorted(kind.value for kind in observer.blind),
        }
    answer["process"] = process_facts()
    return answer


def shmem_config(tap: Tap) -> dict[str, Any]:
    last = tap.last_config
    if last is None:
        raise ControlError(ErrorClass.REFUSED, "no GET_SHMEM_CONFIG reply has passed the tap yet")
    config, connection = last
    return {
        "nregions": config.nregions,
        "sizes": {str(k): v for k, v in config.regions().items()},
        "connection": connection,
    }


def commands(tap: Tap) -> list[Command]:
    return [
        Command(
            "status",
            lambda: status(tap),
            help="both sides, what they negotiated, the layout, mappings, violations, counts",
        ),
        Command(
            "shmem-config",
            lambda: shmem_config(tap),
            help="the layout the last GET_SHMEM_CONFIG reply carried (nothing is sent)",
        ),
    ]
