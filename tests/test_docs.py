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


# The modules whose ``__all__`` is the public API; the API pages must document every name
# callable or class in them (constants are documented in their module's text).
PUBLIC_MODULES = [
    "carv_pyro",
    "carv_pyro.schedules",
    "carv_pyro.proposals",
    "carv_pyro.adaptive",
    "carv_pyro.objectives",
    "carv_pyro.guides",
    "carv_pyro.loss",
    "carv_pyro.accounting",
    "carv_pyro.timing",
    "carv_pyro.teachers",
    "carv_pyro.distributed",
    "carv_pyro.bench",
    "carv_pyro.data",
    "carv_pyro.classifier",
    "carv_pyro.sampling",
    "carv_pyro.pipelines.render",
    "carv_pyro.pipelines.text_to_3d",
    "carv_pyro.pipelines.distillation",
    "carv_pyro.pipelines.attribution",
]


def _resolve(path: str):
    """The object at a dotted path: the longest importable module, then attributes."""
    import importlib

    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def _documented_objects() -> list:
    """Every object a ``::: path`` directive of docs/api renders (modules expand to members)."""
    import inspect

    objects = []
    for page in (ROOT / "docs" / "api").glob("*.md"):
        for block in re.split(r"^(?=::: )", page.read_text(), flags=re.M):
            m = re.match(r"::: ([\w.]+)", block)
            if not m:
                continue
            obj = _resolve(m.group(1))
            objects.append(obj)
            if inspect.ismodule(obj):
                members = re.findall(r"^\s+- (\w+)\s*$", block, flags=re.M)
                objects += [getattr(obj, n) for n in members or getattr(obj, "__all__", [])]
    return objects


def test_every_public_name_is_in_the_api_reference_with_a_docstring():
    import importlib
    import inspect

    documented = _documented_objects()
    missing, undocumented = [], []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.ismodule(obj) or not (inspect.isclass(obj) or callable(obj)):
                continue
            if not any(obj is d for d in documented):
                missing.append(f"{module_name}.{name}")
            if not inspect.getdoc(obj):
                undocumented.append(f"{module_name}.{name}")
    assert not missing, f"public names without an API entry in docs/api: {missing}"
    assert not undocumented, f"public names without a docstring: {undocumented}"
