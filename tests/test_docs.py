"""Every `§N` the code, the faults and the conformance checks cite resolves in
docs/protocol.md: a section or subsection that exists, and a step that is in its list."""

from __future__ import annotations

import re
from pathlib import Path

from shmemctl.conformance import backend as backend_suite
from shmemctl.conformance import frontend as frontend_suite
from shmemctl.conformance.report import PASSAGES
from shmemctl.faults import BACKEND_FAULTS, FRONTEND_FAULTS

ROOT = Path(__file__).resolve().parent.parent
NOTES = (ROOT / PASSAGES).read_text()
CITATION = re.compile(r"§(\d+(?:\.\d+)?)(?:,? steps? (\d+)(?:-(\d+))?)?")


def _sections() -> set[str]:
    numbers = re.findall(r"^##(?:#)? (\d+(?:\.\d+)?)\.? ", NOTES, flags=re.M)
    return set(numbers)


def _steps(heading: str) -> int:
    """How many numbered steps the list under `heading` has."""
    body = NOTES.split(heading, 1)[1].split("\n#", 1)[0]
    return len(re.findall(r"^(\d+)\. ", body, flags=re.M))


SECTIONS = _sections()
STEPS = {"5": _steps("### SHMEM_MAP (9): validation, in order"), "4": _steps("### QEMU's order")}


def _unresolved(text: str) -> list[str]:
    bad = []
    for m in CITATION.finditer(text):
        section, first, last = m.groups()
        if section not in SECTIONS:
            bad.append(m.group(0))
        elif first is not None:
            top = int(last or first)
            if section not in STEPS or not 1 <= int(first) <= top <= STEPS[section]:
                bad.append(m.group(0))
    return bad


def test_the_notes_have_their_sections_and_step_lists() -> None:
    assert {"1", "2", "3", "4", "5", "6.1", "6.13", "7", "8"} <= SECTIONS
    assert STEPS["5"] >= 12 and STEPS["4"] >= 7


def test_every_citation_in_the_code_resolves() -> None:
    sources = [p for d in ("shmemctl", "backend_sim", "tui", "fuzz", "tests")
               for p in (ROOT / d).rglob("*.py") if p != Path(__file__).resolve()]  # fmt: skip
    assert len(sources) > 40
    unresolved = {str(p.relative_to(ROOT)): bad
                  for p in sources if (bad := _unresolved(p.read_text()))}  # fmt: skip
    assert unresolved == {}


def test_every_check_and_fault_cites_a_passage_that_resolves() -> None:
    passages = [*frontend_suite.CHECKS.values(), *backend_suite.CHECKS.values(),
                *FRONTEND_FAULTS.values(), *BACKEND_FAULTS.values()]  # fmt: skip
    for passage in passages:
        assert CITATION.search(passage), f"cites no passage: {passage!r}"
        assert _unresolved(passage) == [], passage


def test_a_citation_that_does_not_resolve_is_caught() -> None:
    assert _unresolved("(§9)") == ["§9"]
    assert _unresolved("(§5 step 13)") == ["§5 step 13"]
    assert _unresolved("(§6.2 step 1)") == ["§6.2 step 1"]
    assert _unresolved("§5, steps 4-12 and §6.13") == []
