"""The documentation is true: every tutorial, the README's example and the code on the docs pages
run as written (tutorials at smoke size), every command they give parses, and every public name
has an API entry and a docstring."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "examples" / "tutorials").glob("*.py"))
# pages whose python blocks run, in order, in one namespace (they say so on the page)
RUNNABLE_PAGES = ["docs/composing.md", "docs/extending.md"]
# the pictures a tutorial writes (the docs pages show them)
PICTURES = {
    "sds_text_to_3d": [
        "sds_baseline_turntable.png",
        "sds_carv_turntable.png",
        "sds_auto_turntable.png",
        "sds_quality_wallclock.png",
    ],
    "accounting": ["accounting_variance_cost.png", "accounting_learned_q.png"],
    "distillation": ["distillation_samples.png"],
}


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs_at_smoke_size(path, tmp_path, monkeypatch):
    monkeypatch.setenv("CARV_SMOKE", "1")
    monkeypatch.setenv("CARV_TUTORIAL_OUT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(path), run_name="__main__")
    for picture in PICTURES.get(path.stem, []):
        assert (tmp_path / picture).is_file(), f"{path.name} did not write {picture}"


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


def test_readme_example_runs_and_prints_what_it_did(tmp_path):
    """The "Ten lines" block, in a fresh interpreter as a user would paste it."""
    blocks = _python_blocks((ROOT / "README.md").read_text())
    assert blocks, "the README has a python example"
    env = {k: v for k, v in os.environ.items() if k != "CARV_SMOKE"}
    done = subprocess.run(
        [sys.executable, "-c", blocks[0]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "Estimator('auto'" in out, out
    for what in (r"loss -?\d", r"\|grad\| \d", r"K = \d+", r"K\* = ", r"ESS \d"):
        assert re.search(what, out), f"the README example does not print {what!r}:\n{out}"


def test_getting_started_shows_the_readme_example():
    """getting-started.md includes the README's block by a snippet section, so they cannot drift."""
    page = (ROOT / "docs" / "getting-started.md").read_text()
    assert '--8<-- "README.md:ten-lines"' in page
    readme = (ROOT / "README.md").read_text()
    section = readme.split("[start:ten-lines]")[1].split("[end:ten-lines]")[0]
    assert _python_blocks((ROOT / "README.md").read_text())[0] in section


@pytest.mark.parametrize("page", RUNNABLE_PAGES)
def test_page_code_runs_in_order(page):
    blocks = _python_blocks((ROOT / page).read_text())
    assert blocks, page
    namespace: dict = {"__name__": "__docs__"}
    with contextlib.redirect_stdout(io.StringIO()):
        for i, block in enumerate(blocks):
            exec(compile(block, f"{page} block {i + 1}", "exec"), namespace)


def _commands(text: str) -> list[list[str]]:
    """Every ``carv-pyro ...`` command line in the shell blocks of a page (continuations joined,
    chained commands split)."""
    out = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;", line.split("#")[0]):
                words = shlex.split(part)
                if words and words[0] == "carv-pyro":
                    out.append(words[1:])
    return out


DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("page", DOC_PAGES, ids=[str(p.relative_to(ROOT)) for p in DOC_PAGES])
def test_every_command_on_a_page_parses(page):
    """The commands the docs give are the commands the CLI takes (options, choices, presets)."""
    from carv_pyro import PRESETS
    from carv_pyro.cli import build_parser

    for argv in _commands(page.read_text()):
        parser = build_parser()
        try:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                args = parser.parse_args(argv)
        except SystemExit as stop:
            raise AssertionError(f"`carv-pyro {shlex.join(argv)}`: {err.getvalue()}") from stop
        for name in (getattr(args, "estimators", None) or "").split(","):
            assert not name or name in PRESETS, (
                f"`carv-pyro {shlex.join(argv)}`: no preset {name!r}"
            )


def test_the_readme_gives_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "pip install torch==2.13.0 && pip install -e . && carv-pyro dream torus" in text
    assert 'pip install torch==2.13.0 && pip install -e ".[dev]" && python -m pytest' in text


# The modules whose ``__all__`` is the public API; the API pages must document every name
# callable or class in them (constants are documented in their module's text).
PUBLIC_MODULES = [
    "carv_pyro",
    "carv_pyro.infer",
    "carv_pyro.infer.estimator",
    "carv_pyro.infer.primitives",
    "carv_pyro.infer.guide",
    "carv_pyro.infer.loss",
    "carv_pyro.infer.samplers",
    "carv_pyro.infer.outer",
    "carv_pyro.infer.control_variates",
    "carv_pyro.infer.proposals",
    "carv_pyro.infer.functional",
    "carv_pyro.infer.distributed",
    "carv_pyro.layout",
    "carv_pyro.timesteps",
    "carv_pyro.schedules",
    "carv_pyro.proposals",
    "carv_pyro.guides",
    "carv_pyro.objectives",
    "carv_pyro.accounting",
    "carv_pyro.measure",
    "carv_pyro.timing",
    "carv_pyro.distributed",
    "carv_pyro.teachers",
    "carv_pyro.teachers.embedded",
    "carv_pyro.teachers.shapes",
    "carv_pyro.teachers.manifest",
    "carv_pyro.teachers.trainable",
    "carv_pyro.bench",
    "carv_pyro.data",
    "carv_pyro.classifier",
    "carv_pyro.sampling",
    "carv_pyro.integrations.threestudio",
    "carv_pyro.integrations.lightning",
    "carv_pyro.pipelines.base",
    "carv_pyro.pipelines.render",
    "carv_pyro.pipelines.shapes",
    "carv_pyro.pipelines.shape_classifier",
    "carv_pyro.pipelines.text_to_3d",
    "carv_pyro.pipelines.text_to_3d.scene",
    "carv_pyro.pipelines.text_to_3d.config",
    "carv_pyro.pipelines.text_to_3d.model",
    "carv_pyro.pipelines.text_to_3d.quality",
    "carv_pyro.pipelines.text_to_3d.pictures",
    "carv_pyro.pipelines.text_to_3d.dream",
    "carv_pyro.pipelines.text_to_3d.race",
    "carv_pyro.pipelines.text_to_3d.bench",
    "carv_pyro.pipelines.distillation",
    "carv_pyro.pipelines.attribution",
]


def _resolve(path: str):
    """The object at a dotted path: the longest importable module, then attributes."""
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


def _directives() -> list[tuple[str, str]]:
    """``(page, block)`` for every ``::: path`` directive of docs/api, with its options."""
    out = []
    for page in sorted((ROOT / "docs" / "api").glob("*.md")):
        for block in re.split(r"^(?=::: )", page.read_text(), flags=re.M):
            if block.startswith("::: "):
                out.append((page.name, block))
    return out


def _rendered(block: str) -> list:
    """The objects one directive renders: the object, and for a module its members (the
    ``members:`` list, or ``__all__``; none with ``members: false``)."""
    path = re.match(r"::: ([\w.]+)", block).group(1)
    obj = _resolve(path)
    objects = [obj]
    if inspect.ismodule(obj):
        if re.search(r"^\s+members:\s*(false|\[\])\s*$", block, flags=re.M):
            return objects
        members = re.findall(r"^\s+- (\w+)\s*$", block, flags=re.M)
        objects += [getattr(obj, n) for n in members or getattr(obj, "__all__", [])]
    return objects


def _public_callables() -> list[tuple[str, object]]:
    out = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.ismodule(obj) or not (inspect.isclass(obj) or callable(obj)):
                continue
            out.append((f"{module_name}.{name}", obj))
    return out


def _missing(documented: list, public: list[tuple[str, object]]) -> list[str]:
    return [name for name, obj in public if not any(obj is d for d in documented)]


def test_every_public_name_is_in_the_api_reference_with_a_docstring():
    public = _public_callables()
    documented = [obj for _, block in _directives() for obj in _rendered(block)]
    missing = _missing(documented, public)
    undocumented = [name for name, obj in public if not inspect.getdoc(obj)]
    assert not missing, f"public names without an API entry in docs/api: {missing}"
    assert not undocumented, f"public names without a docstring: {undocumented}"


def test_removing_any_api_entry_fails_the_check():
    """No entry is redundant: without any one ``:::`` directive that renders members, some
    public name loses its only entry, so the check above would fail (an entry that could go
    unnoticed is either a duplicate or documents nothing public)."""
    public = _public_callables()
    directives = _directives()
    rendered = [_rendered(block) for _, block in directives]
    redundant = []
    for i, (page, block) in enumerate(directives):
        if re.search(r"^\s+members:\s*(false|\[\])\s*$", block, flags=re.M):
            continue  # a module's text only
        others = [obj for j, objs in enumerate(rendered) if j != i for obj in objs]
        if not _missing(others, public):
            redundant.append(f"{page}: {block.splitlines()[0]}")
    assert not redundant, f"API entries whose removal no check would notice: {redundant}"
