"""The README is the docs' front door: every relative link in it reaches a file of the checkout, and every `#anchor`
a heading of that page (slugged as MkDocs and GitHub slug plain headings), so a newcomer's first click lands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]+)?\)")
slugify = pytest.importorskip("markdown.extensions.toc").slugify


def _anchors(page: Path) -> set[str]:
    headings = [line.lstrip("#").strip() for line in page.read_text().splitlines() if re.match(r"#{1,6} ", line)]
    return {slugify(heading.replace("`", ""), "-") for heading in headings}


def test_every_relative_link_of_the_readme_lands() -> None:
    links = LINK.findall((ROOT / "README.md").read_text())
    assert len(links) >= 10
    broken = []
    for target, anchor in links:
        if "://" in target:
            continue
        path = ROOT / target
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and anchor[1:] not in _anchors(path):
            broken.append(f"{target}{anchor}: no such heading")
    assert broken == []
