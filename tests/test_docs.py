"""Every tutorial and the README's example run as written (tutorials at smoke size)."""

from __future__ import annotations

import os
import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "examples" / "tutorials").glob("*.py"))


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs_at_smoke_size(path, tmp_path, monkeypatch):
    monkeypatch.setenv("CARV_SMOKE", "1")
    monkeypatch.setenv("CARV_TUTORIAL_OUT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(path), run_name="__main__")


def test_attribution_example_runs_at_smoke_size(tmp_path, monkeypatch):
    """The attribution tutorial page includes examples/attribution.py: run it tiny."""
    argv = [
        "attribution.py",
        "--n-train",
        "6",
        "--n-query",
        "1",
        "--K",
        "4",
        "--dim",
        "8",
        "--pilot-draws",
        "4",
        "--reference-n",
        "1",
        "--repeats",
        "1",
        "--out",
        str(tmp_path / "attribution.png"),
    ]
    monkeypatch.setattr("sys.argv", argv)
    runpy.run_path(str(ROOT / "examples" / "attribution.py"), run_name="__main__")
    assert (tmp_path / "attribution.png").exists()


def test_every_tutorial_page_includes_its_script():
    """The docs include the scripts the suite runs (pymdownx.snippets), so they cannot drift."""
    pages = list((ROOT / "docs" / "tutorials").glob("*.md"))
    included = set()
    for page in pages:
        included |= set(re.findall(r'--8<-- "([^"]+)"', page.read_text()))
    for path in TUTORIALS:
        assert str(path.relative_to(ROOT)) in included, f"{path.name} is not in any tutorial page"
    for inc in included:
        assert (ROOT / inc).exists(), inc


def test_readme_example_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has a python example"
    os.environ.setdefault("CARV_SMOKE", "1")
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
