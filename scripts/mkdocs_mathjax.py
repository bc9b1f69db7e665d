"""MkDocs hook: publish a vendored copy of MathJax with the site, so formulas render offline.

MathJax 3.2.2 comes from the PyPI package ``django-static-mathjax`` (part of the ``dev`` extra;
it needs no Django), which holds MathJax's ``es5`` build in ``mathjax/static/mathjax/es5``. This
hook adds to the site, under ``javascripts/vendor/mathjax/``, the ``tex-chtml.js`` component that
``mkdocs.yml`` names in ``extra_javascript`` and the files it loads lazily (``LAZY``): about 7 MB,
which ``mkdocs serve`` serves too.

``tex-chtml.js``, not the CDN's ``tex-mml-chtml.js``: the docs have no MathML, and MathML input
typesets the hidden MathML that MathJax leaves beside each formula for screen readers whenever
the page is typeset again (javascripts/mathjax.js does, as Material's recipe has it), nesting a
copy of every formula inside itself.

Nothing is fetched: the build fails, with the install command, if the package is missing.
"""

from __future__ import annotations

import importlib.util
import pathlib

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

DEST = "javascripts/vendor/mathjax"
ENTRY = "tex-chtml.js"
# What tex-chtml.js may load later, by es5 folder: the TeX extensions (autoload, \require), the
# CHTML fonts, the menu's parts, and the accessibility tools that the menu turns on with their
# speech-rule maps. The other combined components and the SVG output are never loaded.
LAZY = ("input/tex/extensions/", "output/chtml/fonts/", "ui/", "a11y/", "sre/")


def mathjax_es5() -> pathlib.Path:
    """The ``es5`` folder of the installed MathJax copy, or a PluginError that says how to get it."""
    spec = importlib.util.find_spec("mathjax")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            es5 = pathlib.Path(root) / "static" / "mathjax" / "es5"
            if (es5 / ENTRY).is_file():
                return es5
    raise PluginError(
        "MathJax is not installed: the docs need the django-static-mathjax package "
        "(pip install -e '.[dev]'), which ships MathJax 3 for offline use"
    )


def _wanted(rel: str) -> bool:
    return rel == ENTRY or rel.startswith(LAZY)


def on_config(config):
    mathjax_es5()  # fail early, before any page is built
    entry = f"{DEST}/{ENTRY}"
    if not any(str(script) == entry for script in config.extra_javascript):
        raise PluginError(f"mkdocs.yml: extra_javascript must list {entry} (the vendored MathJax)")
    return config


def on_files(files: Files, config) -> Files:
    es5 = mathjax_es5()
    for path in sorted(es5.rglob("*")):
        rel = path.relative_to(es5).as_posix()
        if path.is_file() and _wanted(rel):
            files.append(File.generated(config, f"{DEST}/{rel}", abs_src_path=str(path)))
    return files
