"""The README's Python example runs as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README lost its Python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme"}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # twice: the second run resumes
    exec(compile(blocks[0], str(README), "exec"), namespace)
    kept = sorted(p.name for p in (tmp_path / "runs" / "readme").glob("step-*"))
    # "What you get on disk" shows what the example keeps, and the files of its newest
    listing = README.read_text().split("What you get on disk:", 1)[1].split("```")[1]
    assert re.findall(r"^  (step-\d{8})/", listing, flags=re.M) == kept
    shown = re.findall(r"^    (\S+\.(?:json|safetensors))", listing, flags=re.M)
    assert sorted(shown) == sorted(os.listdir(tmp_path / "runs" / "readme" / kept[-1]))


DOCS = [README, *sorted((README.parent / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_docs_link_nothing_outside_the_repository(page: Path) -> None:
    """A clone of the project must read whole: no link or path out of the repository."""
    text = page.read_text()
    root = README.parent.resolve()
    for target in re.findall(r"\]\(([^)#\s]+)", text):
        assert not re.match(r"[a-z]+://", target), f"{page.name} links {target}"
        resolved = (page.parent / target).resolve()
        assert resolved.is_relative_to(root) and resolved.exists(), \
            f"{page.name} links {target}, which is not a file of the repository"
    assert "../shared" not in text, f"{page.name} refers to ../shared, outside the repository"
