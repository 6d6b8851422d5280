"""Text for people: status views and events, as the CLI prints them."""

from __future__ import annotations

import time
from typing import Any

from .events import Event
from .sizes import hex_range, human_size, mib


def _process(view: dict[str, Any]) -> str:
    p = view.get("process", {})
    return f"pid {p.get('pid')}  rss {mib(p.get('rss', 0))}  fds {p.get('fds')}"


def render_status(views: dict[str, dict[str, Any]]) -> str:
    out: list[str] = []
    fe = views.get("frontend")
    if fe is not None:
        if "error" in fe:
            out.append(f"front-end  not answering: {fe['error']}")
        else:
            neg = fe["negotiated"]
            out.append(
                f"front-end  {_process(fe)}  {fe['state']} ({fe['mode']} {fe['socket']})  "
                f"SHMEM bit {fe['shmem_bit']}"
            )
            out.append(f"  features: {','.join(neg['protocol_features']) or 'none'}")
            for r in fe["regions"]:
                out.append(
                    f"  region {r['shmid']}  {human_size(r['size'])} at {r['base']:#x}  "
                    f"{r['count']} mappings, {human_size(r['mapped_bytes'])} mapped"
                )
                for m in r["mappings"]:
                    out.append(
                        f"    {hex_range(m['shm_offset'], m['len']):<24} "
                        f"{'rw' if m['writable'] else 'ro'}  fd_offset {m['fd_offset']:#x}  "
                        f"{m.get('file') or '?'}  age {m['age']:.1f}s"
                    )
                if r["truncated"]:
                    out.append(f"    ... {r['count'] - len(r['mappings'])} more")
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
            out.append(f"back-end   {_process(be)}  {be['state']} ({be['mode']} {be['socket']})")
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
                f"  {len(be['buffers'])} buffers, {len(be['mapped'])} mappings believed; {running}"
            )
    return "\n".join(out)


def render_event(event: dict[str, Any]) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(event["timestamp"]))
    stamp += f".{int(event['timestamp'] * 1000) % 1000:03d}"
    data = event.get("data", {})
    source = event.get("source", "")
    name = event["event"]
    if name == Event.MESSAGE:
        arrow = "->" if data.get("direction") == "out" else "<-"
        flags = "reply" if data.get("reply") else ("need_reply" if data.get("need_reply") else "")
        payload = data.get("payload")
        fds = f" fds={data['fds']}" if data.get("fds") else ""
        # a message the codec refuses (channel.py traces it anyway): its raw payload and why
        undecodable = f" undecodable: {data['undecodable']}" if "undecodable" in data else ""
        return (
            f"{stamp} {source:8} {arrow} {data.get('channel'):7} {data.get('request')} "
            f"{flags} {payload if payload is not None else ''}{fds}{undecodable}"
        ).rstrip()
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
