"""Screenshot every page of the built docs site offline, and check its math, pictures and code.

For reviewing the rendered site on a machine without internet. The site is self-contained:
MathJax is vendored into it at build time (scripts/mkdocs_mathjax.py) and the theme uses system
fonts, so every request outside the local server is refused, and counted as a problem. For each
page it prints how many formulas MathJax rendered, how many are left as raw TeX, MathJax errors,
broken images, code blocks cut at the column edge, outside requests and console errors, and saves
a full-page PNG. tests/test_docs_site.py makes the same checks in the test suite.

Needs what the docs build does plus a browser (not in the ``dev`` extra)::

    apt-get install -y chromium && pip install playwright==1.65.2
    mkdocs build --strict -d /tmp/site
    python scripts/screenshot_docs.py /tmp/site /tmp/shots [--width 390]
"""

from __future__ import annotations

import argparse
import functools
import http.server
import pathlib
import tempfile
import threading

# As root on a machine with no outside network: no sandbox, no background traffic of its own.
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

MATH_DONE = """() => new Promise(resolve => {
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

STATS = """async () => {
  for (const img of document.images) {
    img.loading = 'eager';
    try { await img.decode(); } catch (e) {}
  }
  await document.fonts.ready;
  return {
    bad_fonts: Array.from(document.fonts).filter(f => f.status === 'error').map(f => f.family),
    math: document.querySelectorAll('.arithmatex > mjx-container').length,
    raw: Array.from(document.querySelectorAll('.arithmatex'))
        .filter(e => !e.querySelector('mjx-container')).length,
    merror: document.querySelectorAll('mjx-merror').length,
    nested: document.querySelectorAll('mjx-container mjx-container').length,
    blank: Array.from(document.querySelectorAll('.arithmatex mjx-math mjx-c'))
        .filter(c => !c.textContent && ['none', 'normal', ''].includes(
            getComputedStyle(c, '::before').content)).length,
    broken: Array.from(document.images)
        .filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute('src')),
    clipped: Array.from(document.querySelectorAll('pre > code'))
        .filter(c => c.scrollWidth > c.clientWidth + 1).length,
  };
}"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # one line per page is printed instead
        pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("site", type=pathlib.Path, help="the built site (mkdocs build -d SITE)")
    p.add_argument("out", type=pathlib.Path, help="folder for the screenshots")
    p.add_argument("--browser", default="/usr/bin/chromium", help="the Chromium executable")
    p.add_argument("--width", type=int, default=1280, help="viewport width in CSS pixels")
    p.add_argument("--port", type=int, default=0, help="local port (default: a free one)")
    args = p.parse_args()
    if not (args.site / "index.html").is_file():
        p.error(f"site: no index.html in {args.site}; run mkdocs build -d {args.site} first")
    if not (args.site / "javascripts/vendor/mathjax/tex-chtml.js").is_file():
        p.error(f"site: no vendored MathJax in {args.site}; rebuild it with this mkdocs.yml")
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    handler = functools.partial(_QuietHandler, directory=str(args.site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    local = f"http://127.0.0.1:{server.server_address[1]}/"
    outside: list[str] = []

    def route(request_route):
        url = request_route.request.url
        if url.startswith(local) or url.startswith(("data:", "blob:")):
            return request_route.continue_()
        outside.append(url)
        return request_route.abort()

    pages = sorted(p.parent.relative_to(args.site) for p in args.site.rglob("index.html"))
    problems = 0
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=args.browser,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": args.width, "height": 900},
        )
        context.route("**/*", route)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        for rel in pages:
            errors.clear()
            outside.clear()
            name = rel.as_posix()
            page.goto(local + ("" if name == "." else name + "/"), wait_until="load")
            done = page.evaluate(MATH_DONE)
            stats = page.evaluate(STATS)
            shot = args.out / ((name.replace("/", "_") if name != "." else "home") + ".png")
            page.screenshot(path=str(shot), full_page=True)
            bad = (
                not done
                or stats["raw"]
                or stats["merror"]
                or stats["nested"]
                or stats["blank"]
                or stats["broken"]
                or stats["bad_fonts"]
                or stats["clipped"]
                or outside
                or errors
            )
            problems += bool(bad)
            print(
                f"{'!!' if bad else 'ok'} {name}: {stats['math']} formulas, {stats['raw']} raw, "
                f"{stats['merror']} MathJax errors, {stats['nested']} typeset twice, {stats['blank']} blank glyphs, broken images {stats['broken']}, fonts failed {stats['bad_fonts']}, "
                f"{stats['clipped']} code blocks cut, outside requests {sorted(set(outside))}, "
                f"console errors {errors}" + ("" if done else ", MathJax did not finish")
            )
        context.close()
    server.shutdown()
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
