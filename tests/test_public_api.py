"""The lazy top-level package: its tables, ``__all__`` and the eager imports for type checkers agree.

``carv_pyro/__init__.py`` resolves names on first use from two tables (``_NAMES``: name ->
defining module; ``_MODULES``: subpackages), while ``__all__`` is a literal list and a
``TYPE_CHECKING`` block repeats the imports for IDEs. Nothing ties the four together at run
time, so these tests do.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys

import pytest

import carv_pyro


def test_lazy_tables_match_all_exactly():
    lazy = list(carv_pyro._NAMES) + list(carv_pyro._MODULES)
    assert len(lazy) == len(set(lazy)), "a name is in both _NAMES and _MODULES"
    assert len(carv_pyro.__all__) == len(set(carv_pyro.__all__)), "__all__ repeats a name"
    assert set(lazy) == set(carv_pyro.__all__)


def test_type_checking_imports_match_all():
    tree = ast.parse(inspect.getsource(carv_pyro))
    block = next(
        node
        for node in tree.body
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
    )
    eager: dict[str, str] = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.level == 1, ast.dump(node)
        for alias in node.names:
            eager[alias.asname or alias.name] = "." + (node.module or alias.name)
    assert set(eager) == set(carv_pyro.__all__)
    # the eager import names the same module as the lazy table
    for name, module in carv_pyro._NAMES.items():
        assert eager[name] == module, name


@pytest.mark.parametrize("name", carv_pyro.__all__)
def test_every_public_name_imports(name):
    value = getattr(carv_pyro, name)
    assert value is not None
    if name in carv_pyro._NAMES:
        defining = importlib.import_module(carv_pyro._NAMES[name], "carv_pyro")
        assert value is getattr(defining, name)
    else:
        assert value is importlib.import_module(f"carv_pyro.{name}")
    assert name in dir(carv_pyro)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        carv_pyro.not_a_name


def test_star_import_and_laziness_in_a_fresh_interpreter():
    # A fresh interpreter: this process has long imported torch. Importing the package must not
    # (the command line's --help waits on it); `import *` must then resolve every name.
    code = (
        "import sys, carv_pyro\n"
        "heavy = sorted(m for m in ('torch', 'pyro', 'diffusers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "ns = {}\n"
        "exec('from carv_pyro import *', ns)\n"
        "missing = sorted(set(carv_pyro.__all__) - set(ns))\n"
        "assert not missing, missing\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
