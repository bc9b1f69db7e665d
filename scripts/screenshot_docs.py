"""Screenshot every page of the built docs site offline, and check its math and pictures.

For reviewing the rendered site on a machine without internet. MathJax, which the site loads
from a CDN, is served from a local npm copy instead; every other outside request (web fonts) is
refused. For each page it prints how many formulas MathJax rendered, how many are left as raw
TeX, MathJax errors, broken images and console errors, and saves a full-page PNG.

Needs what the docs build does plus a browser (not in the ``dev`` extra)::

    apt-get install chromium && pip install playwright && npm install --prefix /tmp/mj mathjax@3
    mkdocs build --strict -d /tmp/site
    python scripts/screenshot_docs.py /tmp/site /tmp/shots --mathjax /tmp/mj/node_modules/mathjax/es5
"""

from __future__ import annotations

import argparse
import functools
import http.server
import pathlib
import threading

CDN = "unpkg.com/mathjax@3/es5/"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # one line per page is printed instead
        pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("site", type=pathlib.Path, help="the built site (mkdocs build -d SITE)")
    p.add_argument("out", type=pathlib.Path, help="folder for the screenshots")
    p.add_argument("--mathjax", type=pathlib.Path, required=True, help="a local mathjax/es5")
    p.add_argument("--browser", default="/usr/bin/chromium", help="the Chromium executable")
    p.add_argument("--port", type=int, default=8765)
    args = p.parse_args()
    if not (args.site / "index.html").is_file():
        p.error(f"site: no index.html in {args.site}; run mkdocs build -d {args.site} first")
    if not (args.mathjax / "tex-mml-chtml.js").is_file():
        p.error(f"--mathjax: no tex-mml-chtml.js in {args.mathjax}")
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    handler = functools.partial(_QuietHandler, directory=str(args.site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    local = f"http://127.0.0.1:{args.port}/"

    def route(request_route):
        url = request_route.request.url
        if CDN in url:
            path = args.mathjax / url.split(CDN, 1)[1]
            if path.is_file():
                return request_route.fulfill(path=str(path))
            return request_route.abort()
        if url.startswith(local):
            return request_route.continue_()
        return request_route.abort()  # web fonts: the theme falls back to system fonts

    pages = sorted(p.parent.relative_to(args.site) for p in args.site.rglob("index.html"))
    problems = 0
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.browser, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.route("**/*", route)
        for rel in pages:
            errors.clear()
            name = rel.as_posix()
            page.goto(local + ("" if name == "." else name + "/"), wait_until="networkidle")
            page.wait_for_timeout(1500)  # MathJax typesets after the load event
            stats = page.evaluate(
                """() => ({
                  math: document.querySelectorAll('mjx-container').length,
                  raw: Array.from(document.querySelectorAll('.arithmatex'))
                      .filter(e => !e.querySelector('mjx-container')).length,
                  merror: document.querySelectorAll('mjx-merror').length,
                  broken: Array.from(document.images)
                      .filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src),
                })"""
            )
            shot = args.out / ((name.replace("/", "_") if name != "." else "home") + ".png")
            page.screenshot(path=str(shot), full_page=True)
            bad = stats["raw"] or stats["merror"] or stats["broken"] or errors
            problems += bool(bad)
            print(
                f"{'!!' if bad else 'ok'} {name}: {stats['math']} formulas, {stats['raw']} raw, "
                f"{stats['merror']} MathJax errors, broken images {stats['broken']}, "
                f"page errors {errors}"
            )
        browser.close()
    server.shutdown()
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
