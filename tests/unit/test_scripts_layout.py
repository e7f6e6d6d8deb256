"""The benchmarks and examples follow the package's layout rules (issue 22 item 10): small files with one purpose,
no script of more than 500 lines (larger ones are split into a package of pieces beside them, like
``benchmarks/cpu/ttr/``, ``benchmarks/cpu/strategies/`` or ``examples/training/``)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAX_LINES = 500
SCRIPTS = sorted(p for folder in ("benchmarks", "examples") for p in (REPO / folder).rglob("*.py")
                 if "__pycache__" not in p.parts)


def test_there_are_scripts() -> None:
    assert len(SCRIPTS) > 20, SCRIPTS


@pytest.mark.parametrize("path", SCRIPTS, ids=[str(p.relative_to(REPO)) for p in SCRIPTS])
def test_script_is_small(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(REPO)}: {lines} lines (at most {MAX_LINES}: split it by purpose)"
