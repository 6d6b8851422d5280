"""The truth from /proc: who the two peers are, and whether the front-end's address space
holds what the picture (the observer's mappings) says it acknowledged.

The tap learns each peer's pid from SO_PEERCRED on its main-channel socket, and what
each fd a SHMEM_MAP carried is (device, inode, name, size) from fstat while the fd
passes through it. Asked for status, it reads the front-end's /proc/PID/maps. It does
not know where the front-end put each region, so it infers each region's base from
where the acknowledged files sit there, then runs the front-end's own comparison
(`shmem.procmaps`) at that base.

`compare` is pure (maps lines in, findings out); `check`, `fd_facts`, `peer_of` and
`peer_facts` do the I/O.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Collection, Iterable
from collections.abc import Mapping as MappingOf
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import psutil

from ..daemon import peer_credentials
from ..shmem.mapping import FileFacts, Mapping, dev_text
from ..shmem.procmaps import MapsLine, disagreements, read_maps
from ..sizes import hex_range

AGREE, DISAGREE, UNKNOWN = "agree", "disagree", "unknown"



# ------------------------------------------------------------------ what an fd is


def fd_facts(fd: int) -> FileFacts | None:
    """What `fd` is, without keeping it open; None when it cannot be told."""
    described = describe_fd(fd)
    return None if described is None else described[0]


def describe_fd(fd: int) -> tuple[FileFacts, str] | None:
    """What `fd` is and its kind (`memfd`, `file`, `socket`, `eventfd`, `pipe`,
    `device`, `other`: what a recording says of each fd that passed); None when it
    cannot be told."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    try:
        name = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc: the file is still known by device and inode
        name = ""
    return FileFacts(st.st_dev, st.st_ino, name, st.st_size), _kind(st.st_mode, name)


def _kind(mode: int, name: str) -> str:
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISFIFO(mode):
        return "pipe"
    if name.startswith("/memfd:"):
        return "memfd"
    if name.startswith("anon_inode:"):  # anon_inode:[eventfd], anon_inode:[timerfd] ...
        return name.removeprefix("anon_inode:").strip("[]") or "other"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "other"


# ------------------------------------------------------------------ who a peer is


class Peer(NamedTuple):
    """The process on the other end of a socket when it attached."""

    pid: int
    uid: int
    gid: int
    #: its start time (psutil), so that a later process given the same pid is not taken
    #: for it; None when it could not be read
    started: float | None


def peer_of(sock: socket.socket) -> Peer | None:
    """SO_PEERCRED of a connected Unix socket; None when the kernel gives none."""
    try:
        pid, uid, gid = peer_credentials(sock)
    except OSError:
        return None
    started = None
    if pid > 0:  # gone already, or not ours to read: `absent` says which later
        with contextlib.suppress(psutil.Error):
            started = psutil.Process(pid).create_time()
    return Peer(pid, uid, gid, started)


def absent(peer: Peer) -> str:
    """Why the process `peer` named is not there to look at; "" when it is."""
    if peer.pid <= 0:  # SO_PEERCRED gives 0 for a peer in a pid namespace we cannot see
        return "its pid is not visible from the tap's pid namespace"
    try:
        proc = psutil.Process(peer.pid)
        if peer.started is not None and proc.create_time() != peer.started:
            return f"process {peer.pid} is gone (the pid now names another process)"
        if proc.status() == psutil.STATUS_ZOMBIE:
            return f"process {peer.pid} has exited"
    except psutil.NoSuchProcess:
        return f"process {peer.pid} is gone"
    except psutil.AccessDenied:
        pass  # it is there; whether its maps can be read is for the reader to find out
    return ""


def peer_facts(peer: Peer | None) -> dict[str, Any] | None:
    """A peer for status: pid, uid, gid, command line, RSS and fd count, each as psutil
    reads it; what could not be read is null and `error` says why."""
    if peer is None:
        return None
    out: dict[str, Any] = {"pid": peer.pid, "uid": peer.uid, "gid": peer.gid,
                           "cmdline": None, "rss": None, "fds": None}  # fmt: skip
    why = absent(peer)
    if why:
        out["error"] = why
        return out
    denied = []
    try:
        proc = psutil.Process(peer.pid)
        with proc.oneshot():
            # one by one: another user's fds are closed to us while its cmdline is not
            for key, read in (("cmdline", proc.cmdline), ("rss", lambda: proc.memory_info().rss),
                              ("fds", proc.num_fds)):  # fmt: skip
                try:
                    out[key] = read()
                except psutil.AccessDenied:
                    denied.append(key)
    except psutil.NoSuchProcess:
        out["error"] = f"process {peer.pid} is gone"
        return out
    if denied:
        out["error"] = f"permission denied reading its {', '.join(denied)}"
    return out


# ------------------------------------------------------------------ the comparison


@dataclass(frozen=True)
class Placement:
    """Where a region was found in the front-end's address space."""

    shmid: int
    base: int | None
    #: why there is no base ("" when there is one)
    why: str = ""


@dataclass
class Comparison:
    findings: list[str] = field(default_factory=list)
    placements: list[Placement] = field(default_factory=list)
    #: (shmid, shm_offset) -> why the front-end's maps no longer show that mapping
    gone: dict[tuple[int, int], str] = field(default_factory=dict)
    #: mappings whose file the tap never learnt: they cannot be looked for
    unchecked: list[str] = field(default_factory=list)


def _where(m: Mapping) -> str:
    return f"region {m.shmid} {hex_range(m.shm_offset, m.len)}"


def base_of(line: MapsLine, m: Mapping) -> int | None:
    """The region base at which `line` would hold (part of) `m`: where `m`'s fd_offset
    sits in the line's linear view of the file, less `m`'s shm_offset. None when the
    line holds another file, or none of the part of it `m` maps."""
    if (line.dev, line.inode) != (m.dev, m.ino):
        return None
    length = line.end - line.start
    if line.offset >= m.fd_offset + m.len or m.fd_offset >= line.offset + length:
        return None
    base = line.start + (m.fd_offset - line.offset) - m.shm_offset
    return base if base >= 0 else None


def compare(
    lines: list[MapsLine],
    sizes: MappingOf[int, int],
    mappings: Iterable[Mapping],
    seen: Collection[tuple[int, int]],
) -> Comparison:
    """The front-end's maps (`lines`) against the picture: the layout (`sizes`), the
    mappings it acknowledged, and the (device, inode) of every file that came through
    the backend channel on this connection (`seen`).

    Each region's base is the one address at which every acknowledged mapping of it
    lies over its own file; the comparison then is `procmaps.disagreements` at that
    base. Files are matched by device and inode."""
    out = Comparison()
    by_region: dict[int, list[Mapping]] = {}
    for m in mappings:
        by_region.setdefault(m.shmid, []).append(m)
    by_file: dict[tuple[int, int], list[MapsLine]] = {}
    for line in lines:
        if line.inode:
            by_file.setdefault((line.dev, line.inode), []).append(line)
    placed: list[tuple[int, int]] = []
    unplaced: set[tuple[int, int]] = set()  # files of mappings in regions with no base
    for shmid in sorted(set(sizes) | set(by_region)):
        held = sorted(by_region.get(shmid, []), key=lambda m: m.shm_offset)
        if not held:
            out.placements.append(Placement(shmid, None, "no mapping in the picture to infer it"))
            continue
        present: list[Mapping] = []
        common: set[int] | None = None
        candidates: dict[int, set[int]] = {}
        for m in held:
            if not m.ino:
                out.unchecked.append(f"{_where(m)}: the tap never learnt its file")
                continue
            lines_of = by_file.get((m.dev, m.ino), [])
            found = {b for line in lines_of if (b := base_of(line, m)) is not None}
            if not found:
                file = f"file {dev_text(m.dev)} inode {m.ino}"
                why = (f"the front-end's maps show {file} nowhere at file offsets "
                       f"{hex_range(m.fd_offset, m.len)}")  # fmt: skip
                out.gone[(shmid, m.shm_offset)] = why
                out.findings.append(f"{_where(m)}: the picture has {file} mapped; {why}")
                continue
            present.append(m)
            candidates[m.shm_offset] = found
            common = found if common is None else common & found
        if common is None:
            why = "none of its mappings is in the front-end's maps to infer it"
            out.placements.append(Placement(shmid, None, why))
            unplaced.update((m.dev, m.ino) for m in held)
            continue
        if not common:
            spread = "; ".join(
                f"{hex_range(m.shm_offset, m.len)} at "
                + ", ".join(hex(b) for b in sorted(candidates[m.shm_offset]))
                for m in present
            )
            out.findings.append(f"region {shmid}: its mappings sit at no one base ({spread})")
            out.placements.append(Placement(shmid, None, "its mappings sit at no one base"))
            unplaced.update((m.dev, m.ino) for m in held)
            continue
        # without the layout, the region is taken to end where its last mapping does
        size = sizes.get(shmid) or max(m.end for m in held)
        # a file mapped twice can leave more than one base: take the one that explains most
        found_at = {b: disagreements(lines, shmid, b, size, present) for b in sorted(common)}
        base = min(found_at, key=lambda b: len(found_at[b]))
        out.placements.append(Placement(shmid, base))
        out.findings += found_at[base]
        placed.append((base, base + size))
    for line in lines:
        identity = (line.dev, line.inode)
        if identity not in seen or identity in unplaced:
            continue
        if any(line.start < end and start < line.end for start, end in placed):
            continue  # inside a region: the comparison above has judged it
        out.findings.append(
            f"the front-end maps file {dev_text(line.dev)} inode {line.inode} "
            f"({line.path or 'unnamed'}) at "
            f"{hex_range(line.start, line.end - line.start)}, file offset {line.offset:#x}, "
            "outside every region the picture places: a file that came through the backend "
            "channel and is not in the picture there"
        )
    return out


# ------------------------------------------------------------------ the verdict


@dataclass
class Truth:
    """The verdict on the front-end's maps against the picture, as status shows it."""

    verdict: str
    pid: int | None = None
    #: for "unknown": why
    why: str = ""
    comparison: Comparison = field(default_factory=Comparison)

    def to_json(self) -> dict[str, Any]:
        c = self.comparison
        out: dict[str, Any] = {"verdict": self.verdict, "pid": self.pid}
        if self.why:
            out["why"] = self.why
        out["findings"] = list(c.findings)
        out["regions"] = [
            {"shmid": p.shmid, "base": p.base, **({"why": p.why} if p.why else {})}
            for p in c.placements
        ]
        out["unchecked"] = list(c.unchecked)
        return out


def check(
    peer: Peer | None,
    sizes: MappingOf[int, int],
    mappings: Iterable[Mapping],
    seen: Collection[tuple[int, int]],
    *,
    unsure: str = "",
) -> Truth:
    """Read the front-end's maps and compare; `unsure` is why the picture itself cannot
    be trusted to match them right now (then the verdict is unknown without reading)."""
    if peer is None:
        return Truth(UNKNOWN, None, "the front-end's pid is not known (none is attached)")
    why = absent(peer) or unsure
    if why:
        return Truth(UNKNOWN, peer.pid, why)
    path = f"/proc/{peer.pid}/maps"
    try:
        lines = read_maps(peer.pid)
    except PermissionError:
        return Truth(UNKNOWN, peer.pid, f"permission denied reading {path}")
    except (FileNotFoundError, ProcessLookupError):
        return Truth(UNKNOWN, peer.pid, f"process {peer.pid} is gone")
    except OSError as exc:
        return Truth(UNKNOWN, peer.pid, f"reading {path}: {exc.strerror or exc}")
    except (ValueError, IndexError) as exc:  # a line the parser does not know
        return Truth(UNKNOWN, peer.pid, f"{path} could not be read: {exc}")
    # the pid may have gone, or gone to another process, while it was read; an exited
    # process not yet reaped has empty maps
    why = absent(peer) or ("" if lines else f"process {peer.pid} has no address space")
    if why:
        return Truth(UNKNOWN, peer.pid, why)
    comparison = compare(lines, sizes, mappings, seen)
    if comparison.findings:
        return Truth(DISAGREE, peer.pid, comparison=comparison)
    if comparison.unchecked:
        n = len(comparison.unchecked)
        return Truth(UNKNOWN, peer.pid, f"{n} mapping(s) of files the tap never learnt",
                     comparison)  # fmt: skip
    return Truth(AGREE, peer.pid, comparison=comparison)
