"""Notebook 07 in JupyterLab in a real browser: type in one panel, read the other.

Starts a headless JupyterLab on a free port over a temporary copy of the
notebook, drives Debian's Chromium with Playwright, runs every cell above
"## Clean up" (the panels must stay connected while we type), then types
into alice's panel and checks what bob's panel shows.

Needs Playwright for Python and a Chromium binary (Playwright cannot
download its own browsers here). Without them the test is skipped, except
under CI (``CI=true``), where a missing browser is a failure.

Set ``CHATLIB_SCREENSHOT=/some/file.png`` to save a picture of the panels.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "07-chat-panel.ipynb"
XSS = "<img src=x onerror=alert(1)>"

# Seconds. The first JupyterLab start on a busy two-core machine is the slow part.
LAB_START_TIMEOUT = 60
LAB_STOP_TIMEOUT = 15
# Milliseconds, as Playwright counts.
PAGE_TIMEOUT = 60_000
RUN_TIMEOUT = 60_000
CHAT_TIMEOUT = 15_000

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

# JupyterLab renders only the cells in view unless windowing is off, and
# would otherwise fetch news from the internet.
LAB_OVERRIDES = {
    "@jupyterlab/notebook-extension:tracker": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension:notification": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}


def _missing(what: str) -> None:
    """Skip for *what* missing; under CI, fail instead: CI must run this test."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (CI=true: the browser test must run, not skip)")
    pytest.skip(what)


def _chromium() -> str:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    _missing("no Chromium found: install Debian's chromium package (apt-get install chromium)")
    raise AssertionError("unreachable")


def _sync_playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed: pip install -e '.[test]'")
    return sync_playwright


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except (urllib.error.URLError, OSError):
        return None


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[str]:
    """Run JupyterLab over a copy of notebook 07; yield its base URL."""
    _chromium()  # no browser: skip (or fail) before starting anything
    _sync_playwright()
    home = tmp_path_factory.mktemp("lab")
    notebooks = home / "notebooks"
    notebooks.mkdir()
    shutil.copy(NOTEBOOK, notebooks / NOTEBOOK.name)
    # Settings and state in temporary directories, so the test neither reads
    # nor writes the user's (or the virtualenv's) JupyterLab settings.
    app_settings = home / "app-settings"
    app_settings.mkdir()
    (app_settings / "overrides.json").write_text(json.dumps(LAB_OVERRIDES), encoding="utf-8")
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(home / "user-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
        "JUPYTER_PLATFORM_DIRS": "1",
        # The kernel is started as plain "python": make it this environment's.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = home / "jupyterlab.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyterlab",
                "--no-browser",
                "--allow-root",
                "--ip=127.0.0.1",
                f"--port={port}",
                "--ServerApp.port_retries=0",
                "--IdentityProvider.token=",
                "--ServerApp.password=",
                f"--ServerApp.root_dir={notebooks}",
                "--LabApp.expose_app_in_browser=True",
                "--ServerApp.disable_check_xsrf=True",
                f"--LabApp.app_settings_dir={app_settings}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=home,
        )
    try:
        deadline = time.monotonic() + LAB_START_TIMEOUT
        while _get(f"{url}/api/status") != 200:
            if process.poll() is not None or time.monotonic() > deadline:
                log_text = log_path.read_text(errors="replace")[-3000:]
                pytest.fail(f"JupyterLab did not start on port {port}:\n{log_text}")
            time.sleep(0.2)
        yield url
    finally:
        _stop_lab(process, url)


def _stop_lab(process: subprocess.Popen, url: str) -> None:
    """Shut JupyterLab (and its kernels) down; escalate if it takes too long."""
    if process.poll() is None:
        request = urllib.request.Request(f"{url}/api/shutdown", method="POST", data=b"")
        try:
            urllib.request.urlopen(request, timeout=5).close()
        except (urllib.error.URLError, OSError):
            process.terminate()
    try:
        process.wait(LAB_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


@pytest.fixture(scope="module")
def browser(lab):
    sync_playwright = _sync_playwright()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


# JavaScript run in the page. `window.jupyterapp` is there because of
# --LabApp.expose_app_in_browser.
_KERNEL_IDLE = """() => {
    const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    return !!(panel && panel.sessionContext && panel.content
        && panel.sessionContext.session && panel.sessionContext.session.kernel
        && panel.sessionContext.kernelDisplayStatus === "idle");
}"""

_RUN_ABOVE_CLEAN_UP = """async () => {
    const app = window.jupyterapp;
    const notebook = app.shell.currentWidget.content;
    const index = notebook.widgets.findIndex(
        (cell) => cell.model.sharedModel.getSource().startsWith("## Clean up"));
    if (index < 0) {
        throw new Error('notebook 07 has no "## Clean up" cell');
    }
    notebook.activeCellIndex = index;
    await app.commands.execute("notebook:run-all-above");
    return index;
}"""

# Done when every code cell above the clean-up has run and the kernel is
# idle again, or as soon as one shows an error.
_RAN_ABOVE = """(index) => {
    const panel = window.jupyterapp.shell.currentWidget;
    const cells = panel.content.widgets.slice(0, index)
        .filter((cell) => cell.model.type === "code");
    const errors = cells.flatMap((cell) => cell.model.outputs.toJSON())
        .filter((output) => output.output_type === "error");
    if (errors.length) {
        return {errors};
    }
    const done = cells.every((cell) => cell.model.executionCount !== null)
        && panel.sessionContext.kernelDisplayStatus === "idle";
    return done ? {errors: []} : false;
}"""

_COUNT_IN_TEXT = """([element, text]) => element.textContent.split(text).length - 1"""


def _wait_for_count(page, locator, text: str, expected: int) -> None:
    """Wait until *text* occurs *expected* times in *locator*'s text."""
    page.wait_for_function(
        "([element, text, expected]) => element.textContent.split(text).length - 1 === expected",
        arg=[locator.element_handle(), text, expected],
        timeout=CHAT_TIMEOUT,
    )


def test_two_panels_chat_live_and_show_html_as_text(browser, lab):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    dialogs: list[str] = []

    def on_dialog(dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.goto(f"{lab}/lab/tree/{NOTEBOOK.name}", timeout=PAGE_TIMEOUT)
    page.wait_for_function("() => window.jupyterapp !== undefined", timeout=PAGE_TIMEOUT)
    page.wait_for_function(_KERNEL_IDLE, timeout=PAGE_TIMEOUT)

    clean_up_index = page.evaluate(_RUN_ABOVE_CLEAN_UP)
    result = page.wait_for_function(_RAN_ABOVE, arg=clean_up_index, timeout=RUN_TIMEOUT)
    errors = result.json_value()["errors"]
    assert not errors, f"cells above the clean-up failed: {errors}"

    # The notebook displays two panels, alice's then bob's.
    panels = page.locator(".chat-panel")
    expect(panels).to_have_count(2, timeout=CHAT_TIMEOUT)
    alice, bob = panels.nth(0), panels.nth(1)
    expect(alice.locator(".chat-status")).to_contain_text("connected as alice")
    expect(bob.locator(".chat-status")).to_contain_text("connected as")
    alice.scroll_into_view_if_needed()
    alice_input = alice.locator(".chat-input input")
    bob_log = bob.locator(".chat-log")

    # Enter sends, once, and clears the box.
    alice_input.fill("Hello from the browser")
    alice_input.press("Enter")
    expect(bob_log).to_contain_text("Hello from the browser", timeout=CHAT_TIMEOUT)
    expect(alice_input).to_have_value("")
    expect(alice.locator(".chat-log .chat-own").last).to_contain_text("Hello from the browser")

    # So does the Send button.
    alice_input.fill("Clicked into the chat")
    alice.locator(".chat-send").click()
    expect(bob_log).to_contain_text("Clicked into the chat", timeout=CHAT_TIMEOUT)
    alice_input.fill("after the click")
    alice_input.press("Enter")
    expect(bob_log).to_contain_text("after the click", timeout=CHAT_TIMEOUT)
    _wait_for_count(page, bob_log, "Clicked into the chat", 1)
    _wait_for_count(page, bob_log, "Hello from the browser", 1)

    # Actions and errors get their own classes (and so their own styles).
    alice_input.fill("/me waves from the browser")
    alice_input.press("Enter")
    expect(bob.locator(".chat-line.chat-action").last).to_contain_text(
        "waves from the browser", timeout=CHAT_TIMEOUT
    )
    bob_input = bob.locator(".chat-input input")
    bob_input.fill("/nosuchcommand")
    bob_input.press("Enter")
    expect(bob.locator(".chat-line.chat-error").last).to_contain_text(
        "Unknown command /nosuchcommand", timeout=CHAT_TIMEOUT
    )

    # The newest line is in view: the log scrolls to its end by itself.
    expect(bob.locator(".chat-line").last).to_be_in_viewport()

    # HTML typed into the chat arrives as text. The notebook sent the same
    # line once already, so wait for the count to go up.
    before = page.evaluate(_COUNT_IN_TEXT, [bob_log.element_handle(), XSS])
    alice_input.fill(XSS)
    alice_input.press("Enter")
    _wait_for_count(page, bob_log, XSS, before + 1)
    expect(bob.locator(".chat-line").last).to_contain_text(XSS)
    assert page.locator(".chat-log img").count() == 0
    assert dialogs == []

    # The buttons run kernel-side handlers while the receiving thread updates widgets.
    alice.locator(".chat-close").click()
    expect(alice.locator(".chat-status")).to_contain_text("disconnected", timeout=CHAT_TIMEOUT)
    expect(alice_input).to_be_disabled()
    expect(bob_log).to_contain_text("alice left.", timeout=CHAT_TIMEOUT)
    alice.locator(".chat-reconnect").click()
    expect(alice.locator(".chat-status")).to_contain_text(
        "connected as alice", timeout=CHAT_TIMEOUT
    )
    alice_input.fill("back again")
    alice_input.press("Enter")
    expect(bob_log).to_contain_text("back again", timeout=CHAT_TIMEOUT)

    # The room box: Enter goes to another room, Join back to the lobby, whose
    # recent messages (the notebook's server keeps some) come back dimmed.
    alice_room = alice.locator(".chat-members .chat-room")
    expect(alice_room).to_have_text("#lobby")
    alice_room_input = alice.locator(".chat-room-input input")
    alice_room_input.fill("#maths")
    alice_room_input.press("Enter")
    expect(alice_room).to_have_text("#maths", timeout=CHAT_TIMEOUT)
    expect(alice.locator(".chat-members")).to_contain_text("Online (1)")
    expect(bob_log).to_contain_text("alice left (for another room).", timeout=CHAT_TIMEOUT)
    alice_room_input.fill("#lobby")
    alice.locator(".chat-join").click()
    expect(alice_room).to_have_text("#lobby", timeout=CHAT_TIMEOUT)
    expect(alice_room_input).to_have_value("")
    expect(alice.locator(".chat-line.chat-replayed").last).to_contain_text("back again")
    expect(alice.locator(".chat-line.chat-history-end").last).to_be_visible()
    opacity = alice.locator(".chat-line.chat-replayed").last.evaluate(
        "(element) => getComputedStyle(element).opacity"
    )
    assert float(opacity) < 1

    if screenshot := os.environ.get("CHATLIB_SCREENSHOT"):
        page.locator(".chat-panel").first.locator("xpath=..").screenshot(path=screenshot)
    page.close()
