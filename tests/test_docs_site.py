"""The built docs site, opened in headless Chromium: offline math, pictures, code that fits.

Builds the site with ``mkdocs build --strict`` into a temporary folder, serves it on 127.0.0.1
and opens every page in Debian's Chromium, driven by Python Playwright (``executable_path``:
Playwright's own browser download is never used). Every request to another host is refused and
reported. Per page it checks that no raw TeX is left in the rendered text, that MathJax reported
no TeX error, drew every glyph and typeset no formula twice, that every ``<img>`` loaded, that
no local file is missing (a lazily loaded MathJax part, say), that no code block is cut at the
column edge, and that the console has no errors. Then, on one tutorial, that the copy button of
a block with wrapped lines copies its source exactly, and on a phone-sized screen that code
still fits.

Skips when Chromium or Playwright is not installed. To run it::

    apt-get install -y chromium && pip install playwright==1.65.2

``CARV_DOCS_CHROMIUM`` names another Chromium executable.
"""

from __future__ import annotations

import functools
import http.server
import os
import pathlib
import shutil
import subprocess
import sys
import threading

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _chromium() -> str | None:
    env = os.environ.get("CARV_DOCS_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = _chromium()
if CHROMIUM is None:
    pytest.skip(
        f"CARV_DOCS_CHROMIUM={os.environ['CARV_DOCS_CHROMIUM']} is not an executable"
        if os.environ.get("CARV_DOCS_CHROMIUM")
        else "Chromium not installed (apt-get install -y chromium, or set CARV_DOCS_CHROMIUM)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright not installed (pip install playwright==1.65.2)"
)

# Chromium as root on a machine with no outside network: no sandbox, and none of its own
# background traffic (updates, sync, safe browsing), which would only show as refused requests.
# Playwright adds --headless, and --user-data-dir for the fresh profile of each run.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
]

# Raw TeX in prose: a delimiter arithmatex leaves when MathJax did not run, or a control word
# (an undefined macro stays as its name). Code, pre and MathJax's own source are not prose.
_RAW_TEX_JS = r"""() => {
  const skip = new Set(['PRE', 'CODE', 'SCRIPT', 'STYLE', 'TEXTAREA']);
  const root = document.querySelector('article') || document.body;
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT, {
    acceptNode(node) {
      for (let e = node.parentElement; e && e !== root; e = e.parentElement) {
        if (skip.has(e.tagName)) return NodeFilter.FILTER_REJECT;
      }
      return NodeFilter.FILTER_ACCEPT;
    }
  });
  const found = [];
  const pattern = /\\[()\[\]]|\\[A-Za-z]+|\$\$/g;
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    for (const m of n.data.matchAll(pattern)) {
      found.push(n.data.slice(Math.max(0, m.index - 20), m.index + 30).trim());
    }
  }
  return [...new Set(found)];
}"""

_STATS_JS = r"""async () => {
  for (const img of document.images) {  // off-screen lazy pictures: load them now
    img.loading = 'eager';
    try { await img.decode(); } catch (e) {}
  }
  await document.fonts.ready;
  return {
    bad_fonts: Array.from(document.fonts).filter(f => f.status === 'error').map(f => f.family),
    formulas: document.querySelectorAll('.arithmatex').length,
    rendered: document.querySelectorAll('.arithmatex mjx-container').length,
    unrendered: Array.from(document.querySelectorAll('.arithmatex'))
        .filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.slice(0, 60)),
    nested: document.querySelectorAll('mjx-container mjx-container').length,
    // A CHTML glyph is an empty mjx-c whose ::before holds the character: with no style for it
    // (the output's cache cleared after typesetting), the formula is there but blank.
    blank_glyphs: Array.from(document.querySelectorAll('.arithmatex mjx-math mjx-c'))
        .filter(c => !c.textContent && ['none', 'normal', ''].includes(
            getComputedStyle(c, '::before').content)).length,
    tex_errors: Array.from(document.querySelectorAll('mjx-merror'))
        .map(e => e.getAttribute('data-mjx-error') || e.textContent),
    images: document.images.length,
    broken_images: Array.from(document.images)
        .filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute('src')),
    clipped_code: Array.from(document.querySelectorAll('pre > code'))
        .filter(c => c.scrollWidth > c.clientWidth + 1)
        .map(c => c.textContent.split('\n').reduce((a, b) => (b.length > a.length ? b : a))
             .slice(0, 60)),
  };
}"""

# Resolves when MathJax has typeset the page (or at once on a page without formulas). The
# typesetPromise of MathJax 3.2 does not queue behind the page's own (javascripts/mathjax.js):
# typesetting once more and waiting for that is how to know it is done; it also shows that a
# second typeset leaves the page alone ('nested' below).
_MATH_DONE_JS = """() => new Promise(resolve => {
  if (!document.querySelector('.arithmatex')) return resolve(true);
  const start = Date.now();
  (function poll() {
    const mj = window.MathJax;
    if (mj && mj.startup && mj.startup.promise) {
      mj.startup.promise.then(() => mj.typesetPromise ? mj.typesetPromise() : null)
        .then(() => document.fonts.ready)  // CHTML glyphs are blank until MathJax's fonts load
        .then(() => resolve(true), () => resolve(false));
    } else if (Date.now() - start > 8000) {
      resolve(false);
    } else {
      setTimeout(poll, 25);
    }
  })();
})"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", "mkdocs.yml", "-d", out],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


@pytest.fixture(scope="module")
def base_url(site):
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as pw:
        # A persistent context is how Playwright takes a --user-data-dir: a fresh, empty one.
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
            permissions=["clipboard-read", "clipboard-write"],
        )
        yield context
        context.close()


@pytest.fixture(scope="module")
def watch(browser, base_url):
    """Refuses (and records) every request outside the local server, for all the tests."""
    return _Watch(browser, base_url)


def _pages(site: pathlib.Path) -> list[str]:
    names = sorted(p.parent.relative_to(site).as_posix() for p in site.rglob("index.html"))
    return ["" if n == "." else n + "/" for n in names]


class _Watch:
    """What a page asked for outside localhost, what failed to load, and the console's errors."""

    def __init__(self, context, base_url: str) -> None:
        self.base_url = base_url
        self.outside: list[str] = []
        self.failed: list[str] = []
        self.errors: list[str] = []
        context.route("**/*", self._route)

    def _route(self, route) -> None:
        url = route.request.url
        if url.startswith(self.base_url) or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            self.outside.append(url)
            route.abort()

    def attach(self, page) -> None:
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        page.on(
            "response",
            lambda r: r.status >= 400 and self.failed.append(f"{r.status} {r.url}"),
        )
        page.on("requestfailed", self._failed)

    def _failed(self, request) -> None:
        # Outside requests are reported as such; ERR_ABORTED is the next goto cancelling a load
        # (a missing file is a 404 response instead).
        if request.url.startswith(self.base_url) and request.failure != "net::ERR_ABORTED":
            self.failed.append(f"{request.failure} {request.url}")

    def clear(self) -> None:
        self.outside.clear()
        self.failed.clear()
        self.errors.clear()


def test_every_page_renders_offline(site, base_url, browser, watch):
    pages = _pages(site)
    assert len(pages) >= 10, f"only {len(pages)} pages built"
    page = browser.new_page()
    watch.attach(page)
    problems: dict[str, list[str]] = {}
    formulas = 0
    for name in pages:
        watch.clear()
        page.goto(base_url + name, wait_until="load")
        done = page.evaluate(_MATH_DONE_JS)
        stats = page.evaluate(_STATS_JS)
        raw = page.evaluate(_RAW_TEX_JS)
        page.wait_for_timeout(50)  # let late console messages and responses arrive
        formulas += stats["rendered"]
        found = []
        if not done:
            found.append("MathJax did not finish (not loaded?)")
        if stats["unrendered"]:
            found.append(
                f"{len(stats['unrendered'])} formulas left as TeX: {stats['unrendered'][:3]}"
            )
        if raw:
            found.append(f"raw TeX in the text: {raw[:3]}")
        if stats["blank_glyphs"]:
            found.append(f"{stats['blank_glyphs']} formula glyphs drawn blank (no CHTML style)")
        if stats["nested"]:
            found.append(f"{stats['nested']} formulas typeset inside another (MathML input?)")
        if stats["tex_errors"]:
            found.append(f"MathJax TeX errors: {stats['tex_errors'][:3]}")
        if stats["bad_fonts"]:
            found.append(f"fonts that did not load: {sorted(set(stats['bad_fonts']))}")
        if stats["broken_images"]:
            found.append(f"images that did not load: {stats['broken_images']}")
        if stats["clipped_code"]:
            found.append(f"code cut at the column edge: {stats['clipped_code'][:3]}")
        if watch.outside:
            found.append(f"requests outside localhost: {sorted(set(watch.outside))[:5]}")
        if watch.failed:
            found.append(f"local files that failed: {sorted(set(watch.failed))[:5]}")
        if watch.errors:
            found.append(f"console errors: {watch.errors[:3]}")
        if found:
            problems[name or "(home)"] = found
    page.close()
    report = "\n".join(f"{name}: " + "; ".join(found) for name, found in problems.items())
    assert not problems, f"{len(problems)} of {len(pages)} pages have problems:\n{report}"
    assert formulas > 50, f"only {formulas} formulas rendered over the whole site"


_LONGEST_BLOCK_JS = """() => {
  const blocks = Array.from(document.querySelectorAll('pre:has(> code) > code'));
  const width = c => Math.max(...c.textContent.split('\\n').map(l => l.length));
  let best = -1;
  blocks.forEach((c, i) => { if (best < 0 || width(c) > width(blocks[best])) best = i; });
  return best < 0 ? null : {index: best, width: width(blocks[best])};
}"""

# Rendered lines of a block that took more than one row on screen.
_WRAPPED_LINES_JS = """code => Array.from(code.querySelectorAll(':scope > span'))
  .filter(s => s.getBoundingClientRect().height > 1.5 * parseFloat(getComputedStyle(s).lineHeight))
  .length"""


def test_copy_button_copies_the_source_of_a_wrapped_block(site, base_url, browser, watch):
    page = browser.new_page()
    page.set_viewport_size({"width": 600, "height": 900})  # narrow: long lines surely wrap
    for name in [n for n in _pages(site) if n.startswith("tutorials/")]:
        page.goto(base_url + name, wait_until="load")
        longest = page.evaluate(_LONGEST_BLOCK_JS)
        if longest and longest["width"] > 80:
            break
    else:
        pytest.fail("no tutorial has a code line over 80 characters to test with")
    block = page.locator("pre:has(> code)").nth(longest["index"])
    code = block.locator("> code")
    source = code.evaluate("c => c.textContent")
    assert code.evaluate(_WRAPPED_LINES_JS) > 0, f"{name}: no line of its widest block wraps"
    block.hover()
    block.locator("button[data-clipboard-target]").click()  # Material's copy button
    copied = page.evaluate("() => navigator.clipboard.readText()")
    page.close()
    assert copied.rstrip("\n") == source.rstrip("\n"), f"{name}: the copy differs from the source"


def test_code_fits_a_phone_screen(site, base_url, browser, watch):
    page = browser.new_page()
    page.set_viewport_size({"width": 390, "height": 844})
    clipped = {}
    for name in [n for n in _pages(site) if n.startswith("tutorials/")]:
        page.goto(base_url + name, wait_until="load")
        lines = page.evaluate(_STATS_JS)["clipped_code"]
        if lines:
            clipped[name] = lines[:3]
    page.close()
    assert not clipped, f"code cut at the column edge on a 390 px screen: {clipped}"
