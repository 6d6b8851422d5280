"""The tap's control commands: status and the last layout. It is an observer: no
command changes the pair. Status also holds the pair to /proc (`truth`): the peers'
processes, and the front-end's maps against the picture, read when it is asked."""

from __future__ import annotations

import copy
from typing import Any

from ..control import Command, ControlError
from ..daemon import process_facts
from ..session.observer import FRONTEND
from ..shmem.mapping import FileFacts, Mapping
from ..wire import BackendReq, ChannelKind, feature_names
from .tap import SIDES, Tap
from .truth import check, peer_facts


def _hex(value: int | None) -> str | None:
    return None if value is None else f"{value:#x}"


def _features(mask: int | None, bit: int) -> list[str] | None:
    return None if mask is None else feature_names(mask, bit)


def _mapping(
    m: Mapping, files: dict[tuple[int, int], FileFacts], gone: dict[tuple[int, int], str]
) -> dict[str, Any]:
    """The one JSON form, and beside it what the tap knows of the file (device as
    /proc/PID/maps prints it, inode, size) and, if the front-end's maps no longer show
    the mapping, why: the picture does not claim it."""
    out: dict[str, Any] = dict(m.to_json())
    facts = files.get((m.dev, m.ino)) if m.ino else None
    if facts is not None:
        out["size"] = facts.size
    why = gone.get((m.shmid, m.shm_offset))
    if why:
        out["gone"] = why
    return out


def _regions(
    sizes: dict[int, int],
    mappings: list[Mapping],
    files: dict[tuple[int, int], FileFacts],
    gone: dict[tuple[int, int], str],
) -> list[dict[str, Any]]:
    """Per region, its size and the mappings in it."""
    by_region: dict[int, list[Mapping]] = {}
    for m in mappings:
        by_region.setdefault(m.shmid, []).append(m)
    return [
        {
            "shmid": shmid,
            "size": sizes.get(shmid),
            "count": len(by_region.get(shmid, [])),
            "mapped_bytes": sum(m.len for m in by_region.get(shmid, [])),
            "mappings": [_mapping(m, files, gone) for m in by_region.get(shmid, [])],
        }
        for shmid in sorted(set(sizes) | set(by_region))
    ]


def status(tap: Tap) -> dict[str, Any]:
    bit = tap.options.shmem_bit
    with tap.lock:
        watch = tap.watch
        observer = watch.observer
        state = observer.state
        offered, acked = state.offered, state.acked
        negotiated = None if acked is None else acked & (offered if offered is not None else acked)
        sizes = state.config.regions() if state.config else {}
        mappings = observer.mappings()
        peers = dict(tap.peers)
        # under the lock, so that the maps are read against one picture: no answer can
        # change it meanwhile (the front-end acts before it answers)
        truth = check(peers[FRONTEND], sizes, mappings, set(watch.files),
                      unsure=_unsure(tap))  # fmt: skip
        answer: dict[str, Any] = {
            "role": "tap",
            "state": tap.state,
            "connection": watch.connections,
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
            "regions": _regions(sizes, mappings, watch.files, truth.comparison.gone),
            "resets": state.resets,
            "pending": {
                kind.value: [m.name for m in observer.pending(kind)] for kind in ChannelKind
            },
            "violations": dict(watch.violations),
            "counters": copy.deepcopy(tap.counters),
            "raw": sorted(watch.raw),
            #: channels whose rules are no longer judged, one direction's framing lost
            "unjudged": sorted(kind.value for kind in observer.blind),
        }
    answer["process"] = process_facts()
    for side in SIDES:
        answer["sides"][side]["process"] = peer_facts(peers[side])
    answer["truth"] = truth.to_json()
    return answer


def _unsure(tap: Tap) -> str:
    """Why the picture cannot be held to the front-end's maps right now; "" when it can.
    Under the tap's lock."""
    observer = tap.watch.observer
    if observer.blind:
        lost = " and ".join(sorted(kind.value for kind in observer.blind))
        return f"the picture no longer follows the {lost} channel (its framing was lost)"
    shmem = (BackendReq.SHMEM_MAP, BackendReq.SHMEM_UNMAP)
    waiting = sum(m.request in shmem for m in observer.pending(ChannelKind.BACKEND))
    if waiting:
        return (f"{waiting} SHMEM request(s) not answered yet: the front-end may have acted "
                "on them already")  # fmt: skip
    return ""


def shmem_config(tap: Tap) -> dict[str, Any]:
    last = tap.watch.last_config
    if last is None:
        raise ControlError("no GET_SHMEM_CONFIG reply has passed the tap yet")
    config, connection = last
    return {
        "nregions": config.nregions,
        "sizes": {str(k): v for k, v in config.regions().items()},
        "connection": connection,
    }


def commands(tap: Tap) -> list[Command]:
    return [
        Command(
            "query-status",
            lambda: status(tap),
            help="both sides, what they negotiated, the layout, mappings, violations, counts",
        ),
        Command(
            "query-shmem-config",
            lambda: shmem_config(tap),
            help="the layout the last GET_SHMEM_CONFIG reply carried (nothing is sent)",
        ),
    ]
