"""Sizes and offsets as people type them (`4096`, `0x1000`, `64K`, `8M`, `1G`) and as printed."""

from __future__ import annotations

import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(0[xX][0-9a-fA-F]+|\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """`4096`, `0x1000`, `64K`, `8M`, `1G` (also `64KiB`) -> bytes; ValueError says what fits."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(
            f"{text!r} is not a size; write a number of bytes like 4096, 0x1000, 64K, 8M or 1G"
        )
    number, unit = m.groups()
    return int(number, 0) * _UNITS[unit.upper()]


def human_size(n: int) -> str:
    """Shortest exact form: 64K, 8M, 1G, else the byte count."""
    for unit in ("T", "G", "M", "K"):
        if n and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


def mib(n: int) -> str:
    """Memory as people read it in a status: '26.9M'."""
    return f"{n / (1 << 20):.1f}M"


def hex_range(offset: int, length: int) -> str:
    """`0x0+0x100000`: how ranges are named in every message."""
    return f"{offset:#x}+{length:#x}"


def parse_regions(spec: str, page_size: int) -> dict[int, int]:
    """`0=8M,2=64K` -> {0: 8 MiB, 2: 64 KiB}; shmids 0-255, page-multiple sizes."""
    regions: dict[int, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        shmid_text, sep, size_text = part.partition("=")
        if not sep:
            raise ValueError(f"{part!r}: write each region as SHMID=SIZE, e.g. 0=8M,2=64K")
        try:
            shmid = int(shmid_text, 0)
        except ValueError:
            raise ValueError(f"{part!r}: shmid {shmid_text!r} is not a number 0-255") from None
        if not 0 <= shmid <= 255:
            raise ValueError(f"{part!r}: shmid {shmid} is outside 0-255")
        if shmid in regions:
            raise ValueError(f"{part!r}: shmid {shmid} is given twice")
        size = parse_size(size_text)
        if size % page_size:
            raise ValueError(
                f"{part!r}: size {size:#x} is not a multiple of the page size {page_size:#x}"
            )
        regions[shmid] = size
    return regions
