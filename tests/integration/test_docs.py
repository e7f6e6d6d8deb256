"""Every relative link in the README and in docs/*.md points at a file that exists, and every `#anchor` at a
heading of the page it names (GitHub's heading ids)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks (a `# comment` in a code block is no heading, a `[x](y)` no link)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def heading_ids(page: Path) -> set:
    """GitHub's ids: lower case, punctuation other than `-` and `_` dropped, spaces to `-`, repeats numbered."""
    ids: set = set()
    for title in re.findall(r"^#{1,6} +(.+?) *#* *$", _prose(page.read_text(encoding="utf-8")), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in ids:
            n += 1
            candidate = f"{slug}-{n}"
        ids.add(candidate)
    return ids


def links(page: Path) -> list:
    return [t for t in LINK.findall(_prose(page.read_text(encoding="utf-8"))) if not re.match(r"[a-z]+:", t)]


def test_docs_pages_exist_and_are_linked_from_the_readme():
    names = {p.name for p in PAGES[1:]}
    assert {"optimizer.md", "adaptive.md", "distributed.md", "influence.md", "architecture.md", "results.md"} <= names
    readme_links = set(links(PAGES[0]))
    assert {f"docs/{name}" for name in names} <= readme_links


def test_heading_ids_follow_github():
    ids = heading_ids(ROOT / "docs" / "optimizer.md")
    assert "kfackfacpreconditionermodel-options" in ids
    assert "one-curvature-interface-update-refresh-ihvp-diag" in ids


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in heading_ids(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, "\n".join(broken)
