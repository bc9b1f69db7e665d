"""The built wheel and sdist carry the shipped teachers, and the wheel runs the main job offline.

The archives are built by setuptools' PEP 517 hooks, called directly and without isolation
(isolation would download setuptools): the sdist from a copy of the project's packaging inputs,
then the wheel FROM THE UNPACKED SDIST, as ``pip install <sdist>`` and ``python -m build`` do, so
a file the sdist forgets fails here too. The wheel is installed with ``--no-deps --no-index``
into a fresh venv that reuses this interpreter's packages (torch, Pyro, diffusers) and runs
``carv-pyro dream`` from a folder outside the repository, with the Hugging Face hub offline and
every proxy pointing nowhere.

About 30 s on a 2-core CPU; marked ``slow`` (deselect with ``-m 'not slow'``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "carv_pyro"
#: The shipped teacher folders, relative to the package.
TEACHERS = ("teachers/default", "teachers/shapes_teacher")


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{args}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


def _hook(hook: str, project: Path, out: Path) -> Path:
    """Run a setuptools build hook in ``project`` (its own process: setuptools writes egg-info
    and build folders into the working directory, which is a copy, never the checkout)."""
    code = f"import sys\nfrom setuptools import build_meta\nprint(build_meta.{hook}(sys.argv[1]))"
    name = _run([sys.executable, "-c", code, str(out)], cwd=project).strip().splitlines()[-1]
    return out / name


def _shipped_files() -> dict[str, str | None]:
    """``{path in the package: sha256 or None}``: every file of the teacher folders (sha256 where
    the folder's manifest lists it) and ``py.typed``."""
    files: dict[str, str | None] = {"py.typed": None}
    for folder in TEACHERS:
        root = PACKAGE / folder
        manifest = json.loads((root / "manifest.json").read_text())
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                files[f"{folder}/{path.relative_to(root).as_posix()}"] = None
        for rel, sha in manifest["files"].items():
            assert f"{folder}/{rel}" in files, f"{folder}/manifest.json lists a missing {rel}"
            files[f"{folder}/{rel}"] = sha
    return files


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("packaging")
    project = tmp / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    shutil.copytree(ROOT / "src", project / "src", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, project / name)
    sdist = _hook("build_sdist", project, tmp / "dist")
    with tarfile.open(sdist) as tar:
        # the "data" filter (refuse links and paths out of the folder) where Python has it
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(tmp / "unpacked", **safe)
    (unpacked,) = (tmp / "unpacked").iterdir()
    wheel = _hook("build_wheel", unpacked, tmp / "dist")
    return {"tmp": tmp, "sdist": sdist, "wheel": wheel}


def test_wheel_and_sdist_carry_every_shipped_teacher_file(built):
    files = _shipped_files()
    assert any(p.endswith(".safetensors") for p in files)  # the test sees the weights at all
    with zipfile.ZipFile(built["wheel"]) as whl:
        names = set(whl.namelist())
        missing = [p for p in files if f"carv_pyro/{p}" not in names]
        assert not missing, f"the wheel lacks {missing}"
        for path, sha in files.items():
            if sha is not None:  # byte for byte what the manifest verifies on load
                assert hashlib.sha256(whl.read(f"carv_pyro/{path}")).hexdigest() == sha, path
    with tarfile.open(built["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    missing = [p for p in files if f"src/carv_pyro/{p}" not in names]
    assert not missing, f"the sdist lacks {missing}"
    assert {"pyproject.toml", "README.md"} <= names


def _venv_env(venv: Path) -> dict[str, str]:
    """The environment of the installed package: offline, no PYTHONPATH into the checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONNOUSERSITE="1",
        MPLBACKEND="Agg",
    )
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[proxy] = "http://127.0.0.1:9"  # the discard port: any download fails at once
    env["no_proxy"] = env["NO_PROXY"] = ""
    return env


def test_a_fresh_venv_installs_the_wheel_and_runs_the_main_job_offline(built):
    tmp = built["tmp"]
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], tmp)
    python = venv / "bin" / "python"
    site = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp)
        .strip()
        .splitlines()[-1]
    )
    # --system-site-packages reaches the base interpreter's packages; when this interpreter is
    # itself a venv (torch installed there), a .pth adds its site folders too, after the new
    # venv's own, so the wheel's copy of carv_pyro comes first. A plain path line: the editable
    # install's own .pth there is not processed, so the checkout stays off sys.path.
    outer = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site / "outer-site.pth").write_text("\n".join(sorted(outer)) + "\n")
    env = _venv_env(venv)
    pip = [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed"]
    _run([*pip, "--no-compile", "--quiet", str(built["wheel"])], tmp, env)

    work = tmp / "elsewhere"  # outside the repository: nothing can be imported from the cwd
    work.mkdir()
    probe = (
        "import json, carv_pyro\n"
        "from carv_pyro.teachers import load_default, load_shapes\n"
        "from carv_pyro.teachers.embedded import DEFAULT_TEACHER_DIR\n"
        "load_default(); load_shapes()  # each verifies its files against its manifest\n"
        "print(json.dumps({'package': carv_pyro.__file__, 'teacher': str(DEFAULT_TEACHER_DIR)}))"
    )
    where = json.loads(_run([str(python), "-c", probe], work, env).strip().splitlines()[-1])
    for path in where.values():
        assert Path(path).resolve().is_relative_to(site.resolve()), where
        assert not Path(path).resolve().is_relative_to(ROOT), where

    out = work / "run"
    _run(
        [
            str(venv / "bin" / "carv-pyro"),  # the console script the wheel installs
            "dream",
            "torus",
            "--steps",
            "2",
            "--R",
            "1",
            "--K",
            "1",
            "--resolution",
            "8",
            "--eval-every",
            "1",
            "--out",
            str(out),
            "--quiet",
        ],
        work,
        env,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary, "an empty summary"
    for name in ("turntable.png", "curves.png", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0, name
