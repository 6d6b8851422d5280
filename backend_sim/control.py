"""backend_sim's control commands: status, map, unmap, batch, scenarios."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from shmemctl.backend import AnswerLost, BackendEndpoint, NotReady, PeerProtocolError
from shmemctl.channel import ChannelError, ChannelTimeout
from shmemctl.control import Arg, Command, ControlError, shmid_arg, u64
from shmemctl.control.protocol import MAX_LISTED
from shmemctl.daemon import process_facts
from shmemctl.sizes import hex_range, human_size
from shmemctl.wire import ShmemMap, feature_names
from shmemctl.wire.messages import MMAP_FLAG_WRITE, describe_reply

from .device import RequestRefused, SimDevice
from .presets import Preset
from .scenarios import SCENARIOS, Scenario


@dataclass
class BackendState:
    """What the daemon knows of itself, for status."""

    endpoint: BackendEndpoint
    device: SimDevice
    socket: str
    mode: str
    #: the device type it stands in for (`--device`)
    preset: Preset
    state: str = "starting"
    scenario: Scenario | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


UNKNOWN_OUTCOME = (
    "its outcome is unknown, so the device counts the range as possibly mapped "
    "(unconfirmed in status) until a reset or disconnect"
)


@contextlib.contextmanager
def _sending(st: BackendState, what: str) -> Iterator[None]:
    """What could go wrong before the front-end answered, as a control error."""
    try:
        yield
    except RequestRefused as exc:
        raise ControlError(f"{what} not sent: {exc}") from None
    except NotReady as exc:
        raise ControlError(f"cannot send {what}: {exc}") from None
    except ChannelTimeout:
        raise ControlError(
            f"the front-end did not answer the {what} within "
            f"{st.endpoint.reply_timeout:g}s: {UNKNOWN_OUTCOME}",
        ) from None
    except (PeerProtocolError, AnswerLost) as exc:
        raise ControlError(
            f"{exc}; {UNKNOWN_OUTCOME}",
        ) from None
    except ChannelError as exc:
        raise ControlError(f"{what} failed: {exc}") from None


def _send(st: BackendState, verb: str, m: ShmemMap, *, buffer: int | None = None) -> dict:
    """One map or unmap with NEED_REPLY; the front-end's answer, decoded and explained."""
    with _sending(st, verb):
        if verb == "map":
            buf = None
            if buffer is not None:
                buf = st.device.buffers.get(buffer)
                if buf is None:
                    raise ControlError(f"no buffer {buffer}")
            st.device.check_map(m, buf)
            result = st.device.map(m, buffer=buf)
        else:
            result = st.device.unmap(m)
    if result:
        raise ControlError(st.device.refusal(m, result, is_map=verb == "map"))
    return {"result": describe_reply(result), **m._asdict()}


def status(st: BackendState, max_mappings: int | None = None) -> dict[str, Any]:
    """What the device is and believes; `max_mappings` lists at most that many of its
    mappings and buffers (a summary, as `shmemctl ls` and metrics ask, takes 0)."""
    ep = st.endpoint
    with st.device.lock:
        buffers = [
            {"id": b.id, "size": b.size, "file": b.path or f"memfd:shmemctl-buffer-{b.id}"}
            for b in itertools.islice(st.device.buffers.values(), max_mappings)
        ]
        now = time.time()
        believed = sorted(st.device.mapped.values())
        mapped = [b.to_json(now) for b in believed[:max_mappings]]
    bit = ep.device.shmem_bit
    return {
        "role": "backend",
        "device": st.preset.name,
        "state": st.state,
        "socket": st.socket,
        "mode": st.mode,
        "shmem_bit": bit,
        "regions": {str(k): v for k, v in sorted(ep.device.regions.items())},
        "negotiated": {
            "protocol_features": feature_names(ep.session.protocol_features, bit),
            "shmem": ep.shmem,
            "reply_ack": ep.reply_ack,
        },
        "ready": ep.why_not_ready() is None,
        "why_not_ready": ep.why_not_ready(),
        "buffers": buffers,
        "mapped": mapped,
        "buffer_count": len(st.device.buffers),
        "mapped_count": len(believed),
        "scenario": st.scenario.describe() if st.scenario else None,
        "process": process_facts(),
    }


def batch(st: BackendState, maps: list) -> dict[str, Any]:
    """Several maps, NEED_REPLY on the last only: one ack confirms them all."""
    if not maps:
        raise ControlError("batch needs at least one map")
    requests = []
    for n, item in enumerate(maps):
        if not isinstance(item, dict):
            raise ControlError(f"batch item {n} is not an object")
        try:
            args = MAP_ARGS.check(item)
        except ControlError as exc:
            raise ControlError(f"batch item {n}: {exc.desc}", exc.error_class) from None
        m = _map_request(**args)
        try:
            st.device.check_map(m)
        except RequestRefused as exc:
            raise ControlError(f"batch item {n}: {exc}") from None
        requests.append(m)
    _check_batch_overlaps(st, requests)
    cost = sum(m.fd_offset + m.len for m in requests)
    if cost > st.device.max_buffer:
        raise ControlError(
            f"the batch's buffers need {cost:#x} bytes in all, more than --max-buffer "
            f"({human_size(st.device.max_buffer)}) allows; send fewer or smaller maps",
        )
    last = len(requests) - 1
    sent = 0
    try:
        for n, m in enumerate(requests):  # only the last asks for the answer
            with _sending(st, f"batch item {n}"):
                result = st.device.map(m, need_reply=n == last)
            sent += 1
    except ControlError as exc:
        if not sent:
            raise
        # A batch can stop part way (another request got in first, the channel went):
        # what went out before it is the front-end's now.
        before = "item 0 was" if sent == 1 else f"items 0-{sent - 1} were"
        raise ControlError(
            f"{exc.desc}; {before} sent before it without NEED_REPLY, and the device keeps "
            "them in its table (status says which it cannot know to be mapped)",
            exc.error_class,
        ) from None
    if result:
        why = st.device.refusal(requests[-1], result, is_map=True)
        raise ControlError(
            f"the batch's last map was {why}; earlier failures in a "
            "batch are silent",
        )
    return {"result": "ok", "count": len(requests)}


def _check_batch_overlaps(st: BackendState, requests: list[ShmemMap]) -> None:
    """Only the last map of a batch is answered; a refusal of an earlier one is silent,
    and the device would go on believing a mapping that does not exist. So a batch is
    sent only if the device's own reading finds no overlap in it: not between its maps,
    and not of an earlier one with a mapping the device believes."""
    seen: list[tuple[int, ShmemMap]] = []
    for n, m in enumerate(requests):
        for k, other in seen:
            if other.shmid == m.shmid and (
                other.shm_offset < m.shm_offset + m.len
                and m.shm_offset < other.shm_offset + other.len
            ):
                raise ControlError(
                    f"batch item {n} overlaps item {k} "
                    f"({hex_range(other.shm_offset, other.len)} of region {m.shmid}): a "
                    "front-end refuses one of them, silently if it is not the last",
                )
        seen.append((n, m))
        own = st.device.explain(m, is_map=True) if n < len(requests) - 1 else ""
        if own:
            raise ControlError(
                f"batch item {n}: the device's own reading: {own}; only the last map of a "
                "batch is answered, so its refusal would be silent",
            )


def _map_request(
    shmid: int, shm_offset: int, len: int, fd_offset: int = 0, ro: bool = False, **_: Any
) -> ShmemMap:
    return ShmemMap(shmid, shm_offset, len, fd_offset, 0 if ro else MMAP_FLAG_WRITE)


def scenario_start(
    st: BackendState,
    name: str | None = None,
    rate: float = 10.0,
    shmid: int | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    name = name or st.preset.scenario  # the one that fits the device
    if name not in SCENARIOS:
        raise ControlError(f"no scenario {name!r}; there are: {', '.join(SCENARIOS)}")
    regions = st.endpoint.device.regions
    if shmid is None:
        shmid = min((s for s, z in regions.items() if z), default=-1)
    if not regions.get(shmid):
        raise ControlError(f"this device has no region {shmid}")
    with st.lock:
        if st.scenario is not None and st.scenario.running:
            raise ControlError(
                f"scenario {st.scenario.name} is running; stop it first (scenario-stop)",
            )
        try:
            st.scenario = SCENARIOS[name](st.device, shmid, rate, seed)
        except ValueError as exc:
            raise ControlError(str(exc)) from None
        st.scenario.start()
        return st.scenario.describe()


def scenario_stop(st: BackendState) -> dict[str, Any]:
    with st.lock:
        if st.scenario is None or not st.scenario.running:
            raise ControlError("no scenario is running")
        st.scenario.stop()
        return st.scenario.describe()


MAP_ARGS = Command(
    "map",
    None,
    {
        "shmid": shmid_arg(),
        "shm_offset": u64("offset into the region"),
        "len": u64("bytes to map"),
        "fd_offset": u64("offset into the buffer", required=False),
        "ro": Arg(bool, required=False),
        "buffer": Arg(int, required=False, help="an existing buffer's id", low=1),
    },
)
UNMAP_ARGS = {
    "shmid": shmid_arg(),
    "shm_offset": u64("offset into the region"),
    "len": u64("bytes to unmap"),
}


def commands(st: BackendState) -> list[Command]:
    def do_map(buffer: int | None = None, **args: Any) -> dict:
        return _send(st, "map", _map_request(**args), buffer=buffer)

    def do_unmap(shmid: int, shm_offset: int, len: int) -> dict:
        return _send(st, "unmap", ShmemMap(shmid, shm_offset, len))

    return [
        Command(
            "query-status",
            lambda max_mappings=None: status(st, max_mappings),
            {"max_mappings": Arg(int, required=False, low=0, high=MAX_LISTED)},
            help="regions, negotiation, buffers, believed mappings",
        ),
        Command(
            "map", do_map, MAP_ARGS.args, mutating=True, help="send SHMEM_MAP, return the answer"
        ),
        Command(
            "unmap",
            do_unmap,
            UNMAP_ARGS,
            mutating=True,
            help="send SHMEM_UNMAP, return the answer",
        ),
        Command(
            "batch",
            lambda maps: batch(st, maps),
            {"maps": Arg(list)},
            mutating=True,
            help="several maps, one ack",
        ),
        Command(
            "scenario-start",
            lambda **a: scenario_start(st, **a),
            {
                "name": Arg(str, required=False),
                "rate": Arg((int, float), required=False, low=0.001, high=10_000),
                "shmid": Arg(int, required=False, low=0, high=255),
                "seed": Arg(int, required=False, low=-(1 << 63), high=(1 << 64) - 1),
            },
            mutating=True,
            help="start a scenario: " + ", ".join(SCENARIOS),
        ),
        Command("scenario-stop", lambda: scenario_stop(st), mutating=True, help="stop it"),
    ]
