"""shmemctl as a user installs it: a wheel built from this tree, installed into a fresh
virtual environment, used from a directory that has nothing of the source tree.

The environment sees the machine's site-packages for the dependencies (textual,
construct, ...: downloading them again would test PyPI, not us), and the test
checks that what it imports is the wheel's, not this tree's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import PATIENCE

TREE = Path(__file__).resolve().parent.parent
LEFT_OUT = shutil.ignore_patterns(
    ".git", "__pycache__", "*.egg-info", "build", "dist", ".*_cache", "tests", "fuzz", "bench",
    "screenshots",
)  # fmt: skip


def run(argv: list[str | Path], cwd: Path, **kw: object) -> subprocess.CompletedProcess[str]:
    env = {"PATH": f"{argv[0].parent if isinstance(argv[0], Path) else ''}:/usr/bin:/bin",
           "HOME": str(cwd), "SHMEMCTL_RUN_DIR": str(cwd / "run")}  # fmt: skip
    done = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True,
        stdin=subprocess.DEVNULL, timeout=PATIENCE * 4, **kw,  # type: ignore[call-overload]
    )  # fmt: skip
    assert done.returncode == 0, f"{argv}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def install(base: Path) -> tuple[Path, Path]:
    """(the environment's bin directory, a working directory outside the tree)."""
    source = base / "source"  # a copy: building in the tree would leave build/ behind
    shutil.copytree(TREE, source, ignore=LEFT_OUT)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", base / "dist", source], base)  # fmt: skip
    (wheel,) = (base / "dist").glob("shmemctl-*.whl")
    run([sys.executable, "-m", "venv", "--system-site-packages", base / "venv"], base)
    bin_dir = base / "venv" / "bin"
    run([bin_dir / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel],
        base)  # fmt: skip
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(source)
    return bin_dir, elsewhere


def the_wheel_is_what_runs(installed: tuple[Path, Path]) -> None:
    bin_dir, elsewhere = installed
    done = run([bin_dir / "python", "-c",
                "import shmemctl, backend_sim, tui, shmemctl.pytest_plugin as p; "
                "print(shmemctl.__file__, backend_sim.__file__, tui.__file__, p.__file__)"],
               elsewhere)  # fmt: skip
    venv = str(bin_dir.parent)
    assert all(path.startswith(venv) for path in done.stdout.split()), done.stdout
    version = run([bin_dir / "shmemctl", "--version"], elsewhere).stdout
    assert "0.1.0" in version and "22" in version
    assert "Usage" in run([bin_dir / "python", "-m", "shmemctl", "--help"], elsewhere).stdout
    assert (Path(done.stdout.split()[0]).parent / "py.typed").exists()


def the_demo_runs_without_a_terminal(installed: tuple[Path, Path]) -> None:
    bin_dir, elsewhere = installed
    done = run([bin_dir / "shmemctl", "demo", "--pause", "0"], elsewhere)
    assert "map 0 0 1M: ok" in done.stdout and "unmap 0 0x100000 8K: ENOENT" in done.stdout
    assert "every received fd was closed once mapped" in done.stdout


def the_examples_and_the_plugin_run(installed: tuple[Path, Path]) -> None:
    bin_dir, elsewhere = installed
    shutil.copytree(TREE / "examples", elsewhere / "examples", dirs_exist_ok=True)
    (elsewhere / "pytest.ini").write_text("[pytest]\n")
    done = run([bin_dir / "python", "-m", "pytest", "-p", "no:cacheprovider", "examples"],
               elsewhere)  # fmt: skip
    assert "2 passed" in done.stdout
    device = f"{bin_dir / 'python'} -m backend_sim --listen {{socket}} --scenario blobs"
    done = run([bin_dir / "python", "-m", "pytest", "-p", "no:cacheprovider", "-q",
                f"--shmem-conformance-backend={device}", "--ignore=examples"],
               elsewhere)  # fmt: skip
    assert " passed" in done.stdout and "failed" not in done.stdout


def nothing_reads_the_source_tree(installed: tuple[Path, Path]) -> None:
    bin_dir, _ = installed
    site = next((bin_dir.parent / "lib").glob("python3*/site-packages"))
    packaged = [p for pkg in ("shmemctl", "backend_sim", "tui") for p in (site / pkg).rglob("*.py")]
    assert packaged
    for path in packaged:
        text = path.read_text()
        assert "from tests" not in text and "import tests" not in text, path
    assert os.path.exists(site / "tui" / "app.tcss") or list((site / "tui").glob("*.tcss"))


def test_a_wheel_installed_elsewhere_runs_everything(tmp_path: Path) -> None:
    # one test, not four: the wheel is built once, whichever worker runs it
    installed = install(tmp_path)
    the_wheel_is_what_runs(installed)
    nothing_reads_the_source_tree(installed)
    the_demo_runs_without_a_terminal(installed)
    the_examples_and_the_plugin_run(installed)
