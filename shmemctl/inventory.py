"""What runs on this host: every pair and tap in the run directory root, a row each,
as `shmemctl ls` prints them and the console lists them."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from . import rundir
from .api import HANDLES
from .control import ControlError, DaemonUnreachable
from .sizes import human_size

T = TypeVar("T")

PAIR_ROLES = ("frontend", "backend")
#: a role as people read it
SIDE = {"frontend": "front-end", "backend": "back-end"}


def kind_of(paths: rundir.PairPaths) -> str | None:
    """What a run directory holds: "pair" (a front-end's or back-end's control socket),
    "tap" (only a tap's), or None (no control socket at all). A pair's sockets win: a
    name that has them is driven as a pair, as before taps existed."""
    if any(paths.control(role).exists() for role in PAIR_ROLES):
        return "pair"
    if paths.control("tap").exists():
        return "tap"
    return None


#: how long `ls` waits for any one daemon: a hung one is listed, not waited for
LS_TIMEOUT = 5.0


def brief(role: str) -> dict[str, int]:
    """The arguments of a summary `status`: without the mapping lists (a front-end's
    regions still count their mappings and bytes; backend_sim counts `mapped_count`)."""
    return {"max_mappings": 0} if role in PAIR_ROLES else {}


def status(path: Path, role: str, *, timeout: float = LS_TIMEOUT) -> dict[str, Any]:
    """A daemon's summary status; DaemonUnreachable or ControlError."""
    with HANDLES[role].attach(control=path, timeout=timeout) as daemon:
        answer: dict[str, Any] = daemon.execute("query-status", **brief(role))
        return answer


def _why_not(exc: Exception) -> str:
    return exc.desc if isinstance(exc, ControlError) else str(exc)


def _pair_row(paths: rundir.PairPaths) -> dict[str, Any]:
    """A pair's row, from its two daemons' status; what one does not answer is None."""
    views: dict[str, Any] = {}
    errors: list[str] = []
    for role in PAIR_ROLES:
        try:
            views[role] = status(paths.control(role), role)
        except (DaemonUnreachable, ControlError) as exc:
            errors.append(f"{SIDE[role]}: {_why_not(exc)}")
    fe, be = views.get("frontend"), views.get("backend")
    out: dict[str, Any] = {
        "kind": "pair",
        "peers": {
            "front-end": fe["process"]["pid"] if fe else None,
            "back-end": be["process"]["pid"] if be else None,
        },
        "state": fe["state"] if fe else (be["state"] if be else "not answering"),
        "mappings": sum(r["count"] for r in fe["regions"]) if fe else None,
        "mapped_bytes": sum(r["mapped_bytes"] for r in fe["regions"]) if fe else None,
        # a pair's daemons judge nobody: only a tap counts broken rules
        "violations": None,
        # the front-end's own check of its table against its /proc/PID/maps
        "verdict": None if fe is None else ("disagree" if fe["disagreements"] else "agree"),
    }
    if errors:
        out["error"] = "; ".join(errors)
        if views:  # half a pair answers: say so where the state is read
            silent = next(role for role in PAIR_ROLES if role not in views)
            out["state"] += f" ({SIDE[silent]} not answering)"
    return out


def _tap_row(paths: rundir.PairPaths) -> dict[str, Any]:
    try:
        view = status(paths.control("tap"), "tap")
    except (DaemonUnreachable, ControlError) as exc:
        return {"kind": "tap", "peers": {"front-end": None, "back-end": None},
                "state": "not answering", "mappings": None, "mapped_bytes": None,
                "violations": None, "verdict": None, "error": _why_not(exc)}  # fmt: skip
    sides = view["sides"]
    return {
        "kind": "tap",
        "peers": {side: (v.get("process") or {}).get("pid") for side, v in sides.items()},
        "state": view["state"],
        "mappings": sum(r["count"] for r in view["regions"]),
        "mapped_bytes": sum(r["mapped_bytes"] for r in view["regions"]),
        "violations": sum(view["violations"].values()),
        "verdict": view["truth"]["verdict"],
    }


def row(name: str) -> dict[str, Any] | None:
    paths = rundir.pair(name)
    kind = kind_of(paths)
    if kind is None:
        return None  # a directory a downed pair left: nothing runs there
    return {"name": name, **(_tap_row(paths) if kind == "tap" else _pair_row(paths))}


HEADER = ("NAME", "KIND", "PEERS", "STATE", "MAPPINGS", "MAPPED", "VIOLATIONS", "/PROC")


def row_cells(row: dict[str, Any]) -> tuple[str, ...]:
    """A row as text, one cell per HEADER column; "-" for what is not known."""

    def cell(value: Any) -> str:
        return "-" if value is None else str(value)

    peers = ",".join(cell(pid) for pid in row["peers"].values())
    mapped = None if row["mapped_bytes"] is None else human_size(row["mapped_bytes"])
    return (row["name"], row["kind"], peers, row["state"], cell(row["mappings"]), cell(mapped),
            cell(row["violations"]), cell(row["verdict"]))  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    lines = [HEADER, *(row_cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _is_name(text: str) -> bool:
    """Whether a directory in the root could be a pair's or a tap's (anything else there
    is not ours to list)."""
    try:
        rundir.check_name(text)
    except ValueError:
        return False
    return True


def names() -> list[str]:
    """The names in the run directory root that may be a pair's or a tap's, sorted."""
    root = rundir.root()
    return sorted(d.name for d in (root.iterdir() if root.is_dir() else ())
                  if d.is_dir() and _is_name(d.name))  # fmt: skip


def each_name(ask: Callable[[str], T]) -> list[tuple[str, T]]:
    """`ask(name)` for every name in the run directory root, sorted by name: all at once,
    so that a daemon that hangs costs one timeout, not one per name."""
    found = names()
    with ThreadPoolExecutor(max_workers=min(16, len(found) or 1)) as pool:
        return list(zip(found, pool.map(ask, found), strict=True))


def inventory() -> list[dict[str, Any]]:
    """A row for each pair and tap that has a control socket, sorted by name."""
    return [r for _, r in each_name(row) if r is not None]
