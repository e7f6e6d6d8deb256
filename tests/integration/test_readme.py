"""Every ```python block of the README and of the pages under docs/ runs as written (each in a fresh namespace)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    (page.relative_to(ROOT).as_posix(), index, code)
    for page in PAGES
    for index, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S))
]


def test_readme_has_examples():
    assert sum(name == "README.md" for name, _, _ in BLOCKS) >= 3
    assert len(BLOCKS) >= 7


@pytest.mark.parametrize(("name", "index", "code"), BLOCKS, ids=[f"{name}[{index}]" for name, index, _ in BLOCKS])
def test_readme_block_runs(name, index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = code.replace("/tmp/kfac_ckpt.pt", str(tmp_path / "ckpt.pt"))
    exec(compile(code, f"{name}[python block {index}]", "exec"), {"__name__": "__readme__"})
