"""The front-end's control commands: status, get-shmem-config, reset, read."""

from __future__ import annotations

import bisect
import os
import threading
import time
from typing import Any

from ..channel import ChannelError
from ..control import Arg, Command, ControlError, shmid_arg, u64
from ..control.protocol import MAX_LISTED
from ..daemon import process_facts
from ..shmem import MappingJSON, libc
from ..shmem.procmaps import MapsLine, disagreements, read_maps
from ..wire import feature_names
from .endpoint import Frontend, HandshakeError

#: A status answer lists at most this many mappings per region unless asked for more.
DEFAULT_LIST = 1000
MAX_READ = 4096


def _file_at(lines: list[MapsLine], starts: list[int], addr: int) -> str:
    i = bisect.bisect_right(starts, addr) - 1
    if i >= 0 and lines[i].start <= addr < lines[i].end:
        return lines[i].path
    return ""


class StatusCache:
    """Status for many clients at once without starving the backend channel: one
    computation at a time (the others wait on a lock, not on the GIL), and a result
    is shared only with requests that arrived before that computation began, so no
    one ever gets a snapshot older than their own request."""

    def __init__(self, fe: Frontend) -> None:
        self.fe = fe
        self.lock = threading.Lock()
        self.last: tuple[float, int, dict[str, Any]] | None = None  # (started, args, answer)

    def get(self, max_mappings: int) -> dict[str, Any]:
        asked = time.monotonic()
        with self.lock:
            if self.last and self.last[1] == max_mappings and self.last[0] >= asked:
                return self.last[2]
            started = time.monotonic()
            answer = status(self.fe, max_mappings)
            self.last = (started, max_mappings, answer)
            return answer


def status(fe: Frontend, max_mappings: int = DEFAULT_LIST) -> dict[str, Any]:
    neg = fe.negotiated
    bit = fe.options.shmem_bit
    answer: dict[str, Any] = {
        "role": "frontend",
        "profile": fe.session.profile.name,
        "state": fe.state,
        "socket": fe.options.connect or fe.options.listen,
        "mode": "connect" if fe.options.connect else "listen",
        #: with --listen: the socket is there and takes a back-end (whatever the state)
        "listening": fe.listening,
        "shmem_bit": bit,
        "reconnect": fe.options.reconnect,
        "negotiated": {
            "features": f"{neg.features:#x}",
            "protocol_features": feature_names(neg.protocol_features, bit),
            "shmem": neg.shmem,
            "reply_ack": neg.reply_ack,
        },
        # in the order they always had: maps, unmaps, refused, resets, connections
        "counters": {"maps": 0, "unmaps": 0, "refused": fe.refusals.total(), **fe.counters},
        "refusals": dict(fe.refusals),
        "ack_latency": fe.ack_latency.to_json(),
        "process": process_facts(),
        "regions": [],
        "disagreements": [],
    }
    table = fe.regions
    if table is None:
        return answer
    now = time.time()
    with table.lock:  # one snapshot: the kernel's view and the table's agree in time
        lines = read_maps()
        starts = [line.start for line in lines]
        for shmid, region in table.regions.items():
            listed: list[MappingJSON] = []
            for start, _end, m in region.mappings:
                if len(listed) >= max_mappings:
                    break
                named = m._replace(file=_file_at(lines, starts, region.base + start))
                listed.append(named.to_json(now))
            answer["regions"].append(
                {
                    "shmid": shmid,
                    "base": region.base,
                    "size": region.size,
                    "count": len(region.mappings),
                    "mapped_bytes": region.mapped_bytes,
                    "mappings": listed,
                    "truncated": len(region.mappings) > len(listed),
                }
            )
            answer["disagreements"] += disagreements(
                lines, shmid, region.base, region.size, [m for _, _, m in region.mappings]
            )
    return answer


def get_shmem_config(fe: Frontend) -> dict[str, Any]:
    try:
        config = fe.get_shmem_config()
    except HandshakeError as exc:
        raise ControlError(str(exc)) from None
    except ChannelError as exc:
        raise ControlError(f"GET_SHMEM_CONFIG failed: {exc}") from None
    reserved = {}
    if fe.regions is not None:
        reserved = {str(s): {"base": r.base, "size": r.size} for s, r in fe.regions.regions.items()}
    return {
        "nregions": config.nregions,
        "sizes": {str(k): v for k, v in config.regions().items()},
        "reserved": reserved,
    }


def reset(fe: Frontend) -> dict[str, Any]:
    if fe.state != "connected":
        raise ControlError(f"the front-end is {fe.state}: there is no device to reset")
    try:
        dropped, via = fe.reset()
    except (ChannelError, HandshakeError) as exc:
        raise ControlError(f"reset failed: {exc}") from None
    return {"dropped": dropped, "via": via}


def read(fe: Frontend, shmid: int, offset: int, length: int = 64) -> dict[str, Any]:
    """A few bytes through the front-end's own mapping (never a fault: see libc.read_memory)."""
    table = fe.regions
    if table is None or shmid not in table.regions:
        known = ", ".join(str(s) for s in table.regions) if table else "none"
        raise ControlError(f"no region {shmid} (regions: {known})")
    region = table.regions[shmid]
    if not 0 < length <= MAX_READ:
        raise ControlError(f"length must be 1-{MAX_READ}")
    if offset < 0 or offset + length > region.size:
        raise ControlError(
            f"{offset:#x}+{length:#x} is outside region {shmid} (size {region.size:#x})",
        )
    try:
        data = libc.read_memory(region.base + offset, length)
    except OSError as exc:
        raise ControlError(
            f"nothing readable at region {shmid} offset {offset:#x} "
            f"({os.strerror(exc.errno or 0)}): no mapping there, or its file is shorter",
        ) from None
    return {"shmid": shmid, "offset": offset, "hex": data.hex(), "text": data.decode("latin-1")}


def commands(fe: Frontend) -> list[Command]:
    cache = StatusCache(fe)
    return [
        Command(
            "query-status",
            lambda max_mappings=DEFAULT_LIST: cache.get(max_mappings),
            {"max_mappings": Arg(int, required=False, low=0, high=MAX_LISTED)},
            help="connection, negotiated features, regions and mappings, the kernel's view",
        ),
        Command(
            "get-shmem-config",
            lambda: get_shmem_config(fe),
            help="send GET_SHMEM_CONFIG now and return the answer",
        ),
        Command("reset", lambda: reset(fe), mutating=True, help="reset the device"),
        Command(
            "read",
            lambda shmid, offset, length=64: read(fe, shmid, offset, length),
            {
                "shmid": shmid_arg(),
                "offset": u64("offset into the region"),
                "length": Arg(int, required=False, low=1, high=MAX_READ),
            },
            help="read bytes through the front-end's mapping",
        ),
    ]
