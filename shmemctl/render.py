"""Text for people: status views and events, as the CLI prints them."""

from __future__ import annotations

import time
from typing import Any

from .events import Event, event_time
from .sizes import hex_range, human_size, mib


def _process(p: dict[str, Any] | None) -> str:
    """pid, RSS and fds of a process; what could not be read is '?' (a tap's peer that is
    not ours to read still has a pid)."""
    if not p:
        return "pid ?"
    rss = mib(p["rss"]) if p.get("rss") is not None else "?"
    fds = p["fds"] if p.get("fds") is not None else "?"
    return f"pid {p.get('pid', '?')}  rss {rss}  fds {fds}"


def mapping_line(m: dict[str, Any]) -> str:
    """One mapping in its JSON form, whoever holds it: where, access, where in the file,
    which file (by name, and by device and inode when known), how old, and if the
    front-end's maps no longer show it, why."""
    line = (
        f"{hex_range(m['shm_offset'], m['len']):<24} {'rw' if m['writable'] else 'ro'}  "
        f"fd_offset {m['fd_offset']:#x}  {m.get('file') or '?'}"
    )
    if "ino" in m:
        line += f"  dev {m['dev']} ino {m['ino']}"
    if "age" in m:
        line += f"  age {m['age']:.1f}s"
    if m.get("gone"):
        line += f"  GONE: {m['gone']}"
    return line


def _region_lines(r: dict[str, Any], where: str) -> list[str]:
    """A region (its size, `where` it sits, its mappings) as both status answers give it."""
    size = human_size(r["size"]) if r.get("size") is not None else "size unknown"
    out = [
        f"  region {r['shmid']}  {size} {where}  "
        f"{r['count']} mappings, {human_size(r['mapped_bytes'])} mapped"
    ]
    out += [f"    {mapping_line(m)}" for m in r["mappings"]]
    if r.get("truncated") or r["count"] > len(r["mappings"]):
        out.append(f"    ... {r['count'] - len(r['mappings'])} more")
    return out


def render_status(views: dict[str, dict[str, Any]]) -> str:
    out: list[str] = []
    fe = views.get("frontend")
    if fe is not None:
        if "error" in fe:
            out.append(f"front-end  not answering: {fe['error']}")
        else:
            neg = fe["negotiated"]
            profile = fe.get("profile", "strict")
            behaves = "" if profile == "strict" else f"  behaving as {profile}"
            out.append(
                f"front-end  {_process(fe.get('process'))}  {fe['state']} "
                f"({fe['mode']} {fe['socket']})  SHMEM bit {fe['shmem_bit']}{behaves}"
            )
            out.append(f"  features: {','.join(neg['protocol_features']) or 'none'}")
            for r in fe["regions"]:
                out += _region_lines(r, f"at {r['base']:#x}")
            if fe["disagreements"]:
                out.append("  DISAGREEMENT between the mapping table and /proc/PID/maps:")
                out += [f"    {d}" for d in fe["disagreements"]]
            elif fe["regions"]:
                out.append("  the mapping table and /proc/PID/maps agree")
    be = views.get("backend")
    if be is not None:
        if "error" in be:
            out.append(f"back-end   not answering: {be['error']}")
        else:
            regions = ", ".join(f"{k}={human_size(v)}" for k, v in be["regions"].items())
            ready = "ready" if be["ready"] else f"not ready: {be['why_not_ready']}"
            device = be.get("device", "generic")
            out.append(
                f"back-end   {_process(be.get('process'))}  {be['state']} "
                f"({be['mode']} {be['socket']})" + ("" if device == "generic" else f"  {device}")
            )
            out.append(f"  regions {regions}; {ready}")
            scenario = be.get("scenario")
            running = (
                f"scenario {scenario['name']} "
                f"{'running' if scenario['running'] else 'stopped'} "
                f"({scenario['maps']} maps, {scenario['unmaps']} unmaps, "
                f"{scenario['refused']} refused)"
                if scenario
                else "no scenario"
            )
            out.append(
                f"  {be['buffer_count']} buffers, {be['mapped_count']} mappings believed; {running}"
            )
    return "\n".join(out)


def _names(features: list[str] | None) -> str:
    if features is None:
        return "not seen"
    return ",".join(features) or "none"


def _side_lines(side: str, view: dict[str, Any]) -> list[str]:
    """One side of a tapped pair: where the tap meets it, and the process there."""
    attached = "attached" if view["attached"] else "not attached"
    out = [f"  {side:<9}  {view['mode']} {view['socket']}  {attached}"]
    peer = view.get("process")
    if peer is not None:
        out.append(f"    {_process(peer)}  uid {peer.get('uid')}")
        if peer.get("cmdline"):
            out.append(f"    {' '.join(peer['cmdline'])}")
        if peer.get("error"):
            out.append(f"    not all of it could be read: {peer['error']}")
    return out


def _truth_lines(truth: dict[str, Any]) -> list[str]:
    """The /proc verdict on the front-end's maps against what the tap saw acknowledged."""
    pid = truth.get("pid")
    whose = f"front-end pid {pid}'s /proc/PID/maps" if pid else "the front-end's maps"
    verdict = truth["verdict"]
    if verdict == "agree":
        out = [f"  /proc: agree: {whose} hold what the pair acknowledged"]
    elif verdict == "disagree":
        out = [f"  /proc: DISAGREE: {whose} against what the pair acknowledged:"]
        out += [f"    {finding}" for finding in truth["findings"]]
    else:
        out = [f"  /proc: {verdict}: {truth.get('why', '')}".rstrip()]
    out += [f"    not checked: {what}" for what in truth.get("unchecked", [])]
    return out


def render_tap_status(view: dict[str, Any]) -> str:
    """A tap's status answer (shmemctl/tap/control.py) for people: the tap, both sides,
    what they negotiated, the layout and mappings, broken rules, the /proc verdict."""
    neg = view["negotiated"]
    out = [
        f"tap        {_process(view.get('process'))}  {view['state']} "
        f"(connection {view['connection']})  SHMEM bit {view['shmem_bit']}"
    ]
    for side, side_view in view["sides"].items():
        out += _side_lines(side, side_view)
    flags = [
        f"SHMEM {'on' if neg['shmem'] else 'off'}",
        f"REPLY_ACK {'on' if neg['reply_ack'] else 'off'}",
        f"backend channel {'open' if neg['backend_channel'] else 'none'}",
    ]
    out.append(f"  negotiated: {_names(neg['protocol_features'])}; {', '.join(flags)}")
    out.append(
        f"    protocol features offered by the back-end: {_names(neg['offered'])}; "
        f"acked by the front-end: {_names(neg['acked'])}"
    )
    out.append(
        f"    virtio features of the device: {neg['device_features'] or 'not seen'}; "
        f"set by the front-end: {neg['features'] or 'not seen'}"
    )
    if view["resets"]:
        out.append(f"  resets: {view['resets']}")
    # the tap does not know where the front-end put a region: truth says where it inferred
    placed = {p["shmid"]: p for p in view.get("truth", {}).get("regions", [])}
    if not view["regions"]:
        out.append("  no layout seen yet (no GET_SHMEM_CONFIG reply has passed)")
    for r in view["regions"]:
        place = placed.get(r["shmid"], {})
        if place.get("base") is not None:
            where = f"at {place['base']:#x} in the front-end (inferred)"
        else:
            where = f"base unknown ({place.get('why', 'not looked for')})"
        out += _region_lines(r, where)
    violations = view["violations"]
    if violations:
        total = sum(violations.values())
        out.append(f"  VIOLATIONS: {total} ({per_rule(violations)})")
    else:
        out.append("  violations: none")
    out += _truth_lines(view["truth"])
    if view["raw"]:
        out.append(f"  relayed raw, its framing lost: {', '.join(view['raw'])}")
    if view["unjudged"]:
        out.append(f"  no longer judged: the {' and '.join(view['unjudged'])} channel")
    waiting = {kind: names for kind, names in view["pending"].items() if names}
    for kind, names in waiting.items():
        out.append(f"  owed an answer on the {kind} channel: {', '.join(names)}")
    return "\n".join(out)


def per_rule(violations: dict[str, int]) -> str:
    """A tap's broken rules with their counts, by rule: `map-valid 2, reply-owed 1`."""
    return ", ".join(f"{rule} {n}" for rule, n in sorted(violations.items()))


def trace_arrow(data: dict[str, Any]) -> str:
    """Which way a traced message went: out of (->) or into (<-) the daemon that traced
    it; for a tap, from which side to which (fe->be, be->fe)."""
    if data.get("role") == "tap":
        # everything the tap traces is what it sends on: which way it went is which
        # side asks on that channel (the front-end on main, the back-end on backend)
        asker_is_front = data.get("channel") == "main"
        from_front = asker_is_front != bool(data.get("reply"))
        return "fe->be" if from_front else "be->fe"
    return "->" if data.get("direction") == "out" else "<-"


def render_event(event: dict[str, Any]) -> str:
    when = event_time(event)
    stamp = time.strftime("%H:%M:%S", time.localtime(when))
    stamp += f".{int(when * 1000) % 1000:03d}"
    data = event.get("data", {})
    source = event.get("source", "")
    name = event["event"]
    if name == Event.MESSAGE:
        arrow = trace_arrow(data)
        flags = "reply" if data.get("reply") else ("need_reply" if data.get("need_reply") else "")
        payload = data.get("payload")
        fds = f" fds={data['fds']}" if data.get("fds") else ""
        # a message the codec refuses (channel.py traces it anyway): its raw payload and why
        undecodable = f" undecodable: {data['undecodable']}" if "undecodable" in data else ""
        return (
            f"{stamp} {source:8} {arrow} {data.get('channel'):7} {data.get('request')} "
            f"{flags} {payload if payload is not None else ''}{fds}{undecodable}"
        ).rstrip()
    if name == Event.VIOLATION:
        # what a watcher is there for: the one line that must not scroll by unnoticed
        return (
            f"{stamp} {source:8} VIOLATION {data.get('by')} broke {data.get('rule')} "
            f"({data.get('passage')}: {data.get('text')}): {data.get('detail')} "
            f"[{data.get('channel')} {data.get('request')}]"
        )
    if name in (Event.ATTACHED, Event.DETACHED):
        why = f": {data['reason']}" if data.get("reason") else ""
        return (
            f"{stamp} {source:8} {name:9} {data.get('side')} ({data.get('mode')} "
            f"{data.get('socket')}), connection {data.get('connection')}{why}"
        )
    if name == Event.RECONNECTING and "side" in data:  # a tap's side that is not there yet
        return (
            f"{stamp} {source:8} {name} the {data.get('side')} is not at {data.get('socket')} "
            f"({data.get('reason')}); trying every {data.get('retry_in')}s"
        )
    if name == Event.UNDECODABLE:
        request = data.get("request")
        lost = "" if data.get("decoding", True) else "; the framing is lost: relayed raw from now"
        return (
            f"{stamp} {source:8} {name} from {data.get('side')} on {data.get('channel')}"
            f"{f' (request {request})' if request is not None else ''}: {data.get('bytes')} "
            f"bytes, {data.get('fds')} fds relayed as they came: {data.get('reason')}{lost}"
        )
    if "shm_offset" in data:
        where = f"region {data['shmid']} {hex_range(data['shm_offset'], data['len'])}"
        extra = ""
        if name == Event.REFUSED:
            why = data.get("explanation") or data.get("detail", "")
            extra = f" {data.get('request', '')}: {data.get('errno', '')} {why}"
        elif "writable" in data:
            extra = " rw" if data["writable"] else " ro"
        return f"{stamp} {source:8} {name:9} {where}{extra}".rstrip()
    details = " ".join(f"{k}={v}" for k, v in data.items())
    return f"{stamp} {source:8} {name:9} {details}".rstrip()
