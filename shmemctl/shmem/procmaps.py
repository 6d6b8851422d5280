"""What the kernel says is mapped (/proc/PID/maps), in the shape of a mapping table.

The kernel merges neighbouring VMAs (two pages of one memfd mapped side by
side become one line), so both sides are brought to one canonical form first:
runs of the same protection over the same file at contiguous offsets.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..sizes import hex_range
from .mapping import Mapping, dev_number, dev_text


@dataclass(frozen=True, slots=True)
class MapsLine:
    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str
    #: the file's device (os.makedev of the MAJOR:MINOR column): with the inode, its identity
    dev: int = 0


@dataclass(frozen=True, slots=True)
class Segment:
    """A run inside one region: offsets relative to the region base."""

    start: int
    end: int
    access: str  # "none" (reservation), "ro" or "rw" (shared file mapping), or raw perms
    inode: int = 0
    file_offset: int = 0
    dev: int = 0


def read_maps(pid: int | str = "self") -> list[MapsLine]:
    lines = []
    with open(f"/proc/{pid}/maps") as f:
        for raw in f:
            parts = raw.split(maxsplit=5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            path = parts[5].rstrip("\n") if len(parts) > 5 else ""
            dev = dev_number(parts[3])
            lines.append(
                MapsLine(start, end, parts[1], int(parts[2], 16), int(parts[4]), path, dev)
            )
    return lines


def _access(perms: str) -> str:
    if perms == "---p":
        return "none"
    if perms == "r--s":
        return "ro"
    if perms == "rw-s":
        return "rw"
    return perms


def _canonical(segments: Iterable[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for seg in segments:
        if out:
            prev = out[-1]
            contiguous_file = seg.access == "none" or (
                (prev.dev, prev.inode) == (seg.dev, seg.inode)
                and prev.file_offset + (prev.end - prev.start) == seg.file_offset
            )
            if prev.end == seg.start and prev.access == seg.access and contiguous_file:
                out[-1] = Segment(
                    prev.start, seg.end, prev.access, prev.inode, prev.file_offset, prev.dev
                )
                continue
        out.append(seg)
    return out


def kernel_segments(lines: Iterable[MapsLine], base: int, size: int) -> list[Segment]:
    """The kernel's view of [base, base+size), clipped to the region."""
    segs = []
    for line in lines:
        if line.end <= base or line.start >= base + size:
            continue
        start, end = max(line.start, base), min(line.end, base + size)
        access = _access(line.perms)
        if access == "none":
            segs.append(Segment(start - base, end - base, access))
        else:
            clip = start - line.start
            segs.append(Segment(start - base, end - base, access, line.inode,
                                line.offset + clip, line.dev))  # fmt: skip
    return _canonical(segs)


def table_segments(size: int, mappings: Iterable[Mapping]) -> list[Segment]:
    """What the region should look like given its mapping table."""
    segs = []
    pos = 0
    for m in sorted(mappings, key=lambda m: m.shm_offset):
        if m.shm_offset > pos:
            segs.append(Segment(pos, m.shm_offset, "none"))
        access = "rw" if m.writable else "ro"
        segs.append(
            Segment(m.shm_offset, m.shm_offset + m.len, access, m.ino, m.fd_offset, m.dev)
        )
        pos = m.shm_offset + m.len
    if pos < size:
        segs.append(Segment(pos, size, "none"))
    return _canonical(segs)


def describe(seg: Segment) -> str:
    where = hex_range(seg.start, seg.end - seg.start)
    if seg.access == "none":
        return f"{where} reserved"
    return (
        f"{where} {seg.access} file {dev_text(seg.dev)} inode {seg.inode} "
        f"at file offset {seg.file_offset:#x}"
    )


def disagreements(
    lines: list[MapsLine], shmid: int, base: int, size: int, mappings: Iterable[Mapping]
) -> list[str]:
    """Empty when the kernel holds exactly what the table says; else one line per difference."""
    kernel = kernel_segments(lines, base, size)
    table = table_segments(size, mappings)
    if kernel == table:
        return []
    k, t = set(kernel), set(table)
    out = [f"region {shmid}: table has {describe(s)}, kernel does not" for s in table if s not in k]
    out += [
        f"region {shmid}: kernel has {describe(s)}, table does not" for s in kernel if s not in t
    ]
    return out
