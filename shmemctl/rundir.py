"""Where a pair's sockets, pid files and logs live (the architecture's run-directory rule).

ROOT is $SHMEMCTL_RUN_DIR, else $XDG_RUNTIME_DIR/shmemctl, else /tmp/shmemctl-UID;
a pair named NAME lives in ROOT/NAME. Directories are 0700.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_NAME = "default"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def root() -> Path:
    if os.environ.get("SHMEMCTL_RUN_DIR"):
        return Path(os.environ["SHMEMCTL_RUN_DIR"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "shmemctl"
    return Path(f"/tmp/shmemctl-{os.getuid()}")


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(
            f"pair name {name!r}: use letters, digits, '.', '_' or '-' (at most 64), e.g. default"
        )
    return name


@dataclass(frozen=True)
class PairPaths:
    dir: Path

    @property
    def vhost(self) -> Path:
        return self.dir / "vhost.sock"

    def control(self, role: str) -> Path:
        return self.dir / f"{role}.ctl"

    def pidfile(self, role: str) -> Path:
        return self.dir / f"{role}.pid"

    def logfile(self, role: str) -> Path:
        return self.dir / f"{role}.log"

    def ensure(self) -> PairPaths:
        """Create the directories 0700 (and tighten them if they exist)."""
        for d in (self.dir.parent, self.dir):
            d.mkdir(mode=0o700, exist_ok=True)
            if d.stat().st_uid == os.getuid():
                d.chmod(0o700)
        return self


def pair(name: str = DEFAULT_NAME) -> PairPaths:
    return PairPaths(root() / check_name(name))


def log_tail(path: Path, lines: int = 15, indent: str = "    ") -> str:
    """The last lines of a daemon's log, for an error that says why it did not come up."""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return "(no log)"
    return "\n".join(indent + line for line in text)
