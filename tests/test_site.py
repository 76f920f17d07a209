"""The course site (`make site`) in a real browser: every page whole, offline.

Builds the site from the notebooks' stored outputs into a temporary folder
(never executing a notebook), serves it from 127.0.0.1 with the standard
library's http.server, and opens every page in Debian's Chromium with
Playwright. A Sphinx build reports success even when a notebook renders
badly, so the pages themselves are checked: no console error, no failed or
outside request (a reader may be offline), every internal link answers, every
notebook shows its outputs, each stored plot as an image, and the chat panels
drawn from notebook 07's stored widget state.

Needs Playwright, Chromium and npm (the build fetches the widget embedder from
the npm registry). Without them the test is skipped, except under CI
(``CI=true``), where that is a failure.

Set ``CHATLIB_SCREENSHOT_SITE=/some/folder`` to save a picture of each notebook page.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.test_browser import CHROMIUM_ARGS, _chromium, _missing, _sync_playwright

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
# The pages the site must have: one per source, named like it (site/conf.py).
SOURCES = [ROOT / "README.md", *NOTEBOOKS, *sorted((ROOT / "docs").glob("*.md"))]
# Pages Sphinx adds beside the sources.
GENERATED_PAGES = ["index.html", "search.html", "genindex.html"]

# The build command of `make site`, from the repository root (site/conf.py).
SPHINX_HTML = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-c", "site"]

# Seconds: Sphinx renders the whole course in about 12 s on an idle machine; under
# pytest-timeout's 120 s for the first test, so that a slow build says so itself.
BUILD_TIMEOUT = 100
# Milliseconds, as Playwright counts.
PAGE_TIMEOUT = 30_000
WIDGET_TIMEOUT = 15_000

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
# The notebook that shows ChatPanel widgets (07 at the time of writing).
(CHAT_PANEL_NOTEBOOK,) = (ROOT / "notebooks").glob("[0-9]*-chat-panel.ipynb")


def _page_name(source: Path) -> str:
    return source.relative_to(ROOT).with_suffix(".html").as_posix()


def _notebook(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _outputs(notebook: dict) -> list[list[dict]]:
    """Return the outputs of each code cell that has any."""
    return [
        cell["outputs"]
        for cell in notebook["cells"]
        if cell["cell_type"] == "code" and cell.get("outputs")
    ]


def _count_mime(notebook: dict, mime: str) -> int:
    return sum(mime in output.get("data", {}) for cell in _outputs(notebook) for output in cell)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """Build the site as `make site` does, into a temporary folder; return its html folder."""
    _chromium()  # no browser: skip (or fail) before a build that nothing would read
    _sync_playwright()
    if shutil.which("npm") is None:
        _missing("no npm found: install Debian's npm package (apt-get install npm)")
    out = tmp_path_factory.mktemp("site")
    started = time.monotonic()
    build = subprocess.run(
        [*SPHINX_HTML, "-d", out / "doctrees", ".", out / "html"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    assert build.returncode == 0, f"the site did not build:\n{build.stderr[-3000:]}"
    print(f"site built in {time.monotonic() - started:.1f} s")
    return out / "html"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        """Keep the test's output for failures, not one line per request."""


class _SiteServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """Pass over a browser hanging up mid-file (a page closed as it loaded); report the rest."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def server(site) -> Iterator[str]:
    """Serve the built site on 127.0.0.1, on a free port; yield its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    httpd = _SiteServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, name="site-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def browser(server):
    """Yield a headless Chromium, shared by the pages (each opens in a page of its own)."""
    with _sync_playwright()() as playwright:
        chromium = playwright.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def link_status() -> dict[str, int | None]:
    """HTTP status of each internal link already checked, shared by all pages."""
    return {}


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):
        return None


def _open(browser, server: str, name: str) -> tuple[object, list[str]]:
    """Open page *name* of the site at *server*; return it and the problems seen as it loaded."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []

    def on_request(request) -> None:
        if not request.url.startswith((server, "data:", "blob:", "about:")):
            problems.append(f"request outside the site: {request.url}")

    def on_response(response) -> None:
        if response.status >= 400:
            problems.append(f"HTTP {response.status}: {response.url}")

    page.on(
        "console",
        lambda m: m.type == "error" and problems.append(f"console: {m.text} at {m.location}"),
    )
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url} ({r.failure})"))
    page.on("request", on_request)
    page.on("response", on_response)
    page.goto(server + name, wait_until="networkidle", timeout=PAGE_TIMEOUT)
    return page, problems


def test_every_source_has_a_page(site):
    missing = [name for name in map(_page_name, SOURCES) if not (site / name).is_file()]
    assert not missing, f"no page for {missing}"
    assert NOTEBOOKS, "no notebooks found"


@pytest.mark.parametrize("name", [*map(_page_name, SOURCES), *GENERATED_PAGES])
def test_page_loads_offline_and_its_links_resolve(browser, server, link_status, name):
    page, problems = _open(browser, server, name)
    hrefs = page.eval_on_selector_all("a[href]", "(links) => links.map((link) => link.href)")
    page.close()
    assert not problems, f"{name}: " + "\n".join(problems)

    internal = {href.split("#")[0] for href in hrefs if href.startswith(server)}
    assert internal, f"{name} links to no other page: is the navigation there?"
    for url in internal - link_status.keys():
        link_status[url] = _status(url)
    broken = sorted(url for url in internal if link_status[url] != 200)
    assert not broken, f"{name} links to pages that do not answer 200: {broken}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_page_shows_its_stored_outputs(browser, server, notebook):
    stored = _notebook(notebook)
    page, problems = _open(browser, server, _page_name(notebook))
    try:
        assert not problems, "\n".join(problems)
        assert page.locator(".cell_output").count() == len(_outputs(stored))

        # Every stored plot is an image on the page, and the image loaded.
        images = page.locator(".cell_output img")
        assert images.count() == _count_mime(stored, "image/png")
        widths = images.evaluate_all("(images) => images.map((image) => image.naturalWidth)")
        assert all(width > 0 for width in widths), f"an image did not load: {widths}"

        # The previous/next links at the foot of the page.
        assert page.locator(".prev-next-area a").count() >= 1

        if folder := os.environ.get("CHATLIB_SCREENSHOT_SITE"):
            page.screenshot(path=str(Path(folder) / f"{notebook.stem}.png"), full_page=True)
    finally:
        page.close()


WIDGET_NOTEBOOKS = [path for path in NOTEBOOKS if _count_mime(_notebook(path), WIDGET_VIEW)]


@pytest.mark.parametrize("notebook", WIDGET_NOTEBOOKS, ids=lambda path: path.stem)
def test_stored_widgets_are_drawn(browser, server, notebook):
    from playwright.sync_api import expect

    views = _count_mime(_notebook(notebook), WIDGET_VIEW)
    page, problems = _open(browser, server, _page_name(notebook))
    try:
        # The embedder puts each drawn view beside the script tag that names it.
        expect(page.locator(".cell_output .widget-subarea")).to_have_count(
            views, timeout=WIDGET_TIMEOUT
        )
        assert not problems, "\n".join(problems)
    finally:
        page.close()


def test_chat_panels_show_their_stored_conversation(browser, server):
    from playwright.sync_api import expect

    page, problems = _open(browser, server, _page_name(CHAT_PANEL_NOTEBOOK))
    try:
        panels = page.locator(".chat-panel")
        expect(panels.first).to_be_visible(timeout=WIDGET_TIMEOUT)
        expect(panels.first.locator(".chat-status")).to_contain_text("connected as")
        expect(panels.first.locator(".chat-log .chat-line").first).to_be_visible()
        assert not problems, "\n".join(problems)
    finally:
        page.close()
