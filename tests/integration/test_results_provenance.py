"""Every results file the README and the docs cite can be traced to code: it records the git commit it was produced
from, that commit is in this repository's history, and the tree was clean when it ran (``tree_clean``, recorded by
``benchmarks.common.machine_info``; files from before that field record ``kfac_dir_dirty``). A cited figure is
its JSON (a PNG is drawn from the JSON of the same name), and a page quoting a benchmark's command
(``python benchmarks/cpu/<name>.py``) cites that benchmark's JSON files. Files under ``results/untraced/`` (kept for the record, and called untraceable
where the pages mention them) are not results."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def cited() -> list[str]:
    out: set[str] = set()
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for folder, stem in re.findall(r"benchmarks/(cpu|gpu)/results/([A-Za-z0-9_]+)\.(?:json|png)", text):
            out.add(f"benchmarks/{folder}/results/{stem}.json")
        for folder, script in re.findall(r"`python (?:-m )?benchmarks[/.](cpu|gpu)[/.]([a-z_]+)", text):
            out |= {str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks" / folder / "results").glob(f"{script}*.json")}
    # results/untraced/ keeps, for the record, files that cannot be traced to a commit (the pages say so)
    return sorted(out)


def provenance(record: Any) -> dict[str, Any] | None:
    """The first mapping in ``record`` that records a git commit (the ``machine`` block)."""
    if isinstance(record, dict):
        if "git_commit" in record:
            return record
        values = list(record.values())
    elif isinstance(record, list):
        values = record
    else:
        return None
    return next((p for p in map(provenance, values) if p is not None), None)


def in_history(commit: str) -> bool:
    try:
        return subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=ROOT,
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        pytest.skip("git is not available")


def test_the_docs_cite_results():
    assert len(cited()) >= 8, cited()


@pytest.mark.parametrize("path", cited())
def test_cited_results_record_a_clean_commit_of_this_history(path):
    file = ROOT / path
    assert file.exists(), f"{path} is cited but missing"
    info = provenance(json.loads(file.read_text(encoding="utf-8")))
    assert info is not None and info["git_commit"], f"{path} records no git commit"
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    assert in_history(info["git_commit"]), f"{path}: commit {info['git_commit']} is not in this history"
    clean = info["tree_clean"] if "tree_clean" in info else info.get("kfac_dir_dirty") is False
    assert clean is True, f"{path} was produced from a dirty tree ({info.get('changed_files')})"
