"""Sphinx configuration of the course site: `make site` builds it into _build/html.

The site is Jupyter Book 1's stack (Sphinx, sphinx-book-theme, myst-nb) driven
directly. Jupyter Book 2 (mystmd) downloads its HTML theme from the web at build
time, which this project's machines cannot reach.

The source directory is the repository root, so the README's and the notebooks'
relative links (notebooks/01-sockets.ipynb, ../docs/protocol.md) work unchanged.
The pages list comes from site/_toc.yml, which names notebooks by a glob.

The notebooks are rendered from their stored outputs, never executed: those
outputs are what CI checks with nbval. Notebook 07 keeps its widget state; the
chat panels are drawn from it by @jupyter-widgets/html-manager, which the build
takes from the npm registry (npm pack) and serves from _static, so that a page
needs no network when it is read.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

project = "chatlib"
author = "chatlib"
html_title = "chatlib: a multi-client TCP chat in Python"

extensions = ["myst_nb", "sphinx_external_toc", "sphinx_copybutton"]
external_toc_path = "site/_toc.yml"
root_doc = "README"
# Only the course's pages are sources; the rest of the repository (the code,
# the tests, a virtualenv) is not walked for documents.
include_patterns = ["README.md", "notebooks/*.ipynb", "docs/*.md"]
exclude_patterns = [".venv", "_build", "build", "**/.ipynb_checkpoints"]

nb_execution_mode = "off"
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

html_theme = "sphinx_book_theme"
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": True,
    "use_fullscreen_button": False,
    # sphinx-book-theme leaves this empty but pydata-sphinx-theme 0.17 still fills it,
    # which draws a second search box in a bar across the top.
    "navbar_persistent": [],
}
html_show_sourcelink = False
# Without a mode the theme's script logs an error ("invalid theme mode") on every page.
html_context = {"default_mode": "light"}
# Without an icon a browser asks for /favicon.ico, and logs the 404.
html_favicon = "favicon.svg"
# The landing page, /index.html: a redirect to the README that asks for nothing
# else. sphinx-external-toc writes a bare one only when there is none, and a
# browser that sees a bare one before it moves on asks for /favicon.ico.
html_extra_path = ["extra"]

# The widget embedder: the version that reads ipywidgets 8 state (version_major 2).
WIDGETS_PACKAGE = "@jupyter-widgets/html-manager@1.0.15"
WIDGETS_STATIC = "jupyter-widgets"
# embed.js (not embed-amd.js) needs no RequireJS; it renders the stored state on load.
nb_ipywidgets_js = {f"{WIDGETS_STATIC}/embed.js": {}}


def _unpack_widget_embedder(app) -> None:
    """Fetch the widget embedder with npm (once per build folder) and serve it from _static."""
    cache = Path(app.doctreedir).parent / "npm"
    static = cache / "static"
    target = static / WIDGETS_STATIC
    if not (target / "embed.js").exists():
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError(
                "npm is needed to fetch the widget embedder for notebook 07's chat panels: "
                "install Node.js and npm (Debian: apt-get install npm)"
            )
        cache.mkdir(parents=True, exist_ok=True)
        packed = subprocess.run(
            [npm, "pack", "--silent", "--pack-destination", str(cache), WIDGETS_PACKAGE],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()[-1]
        with tarfile.open(cache / packed) as archive:
            archive.extractall(cache, filter="data")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(cache / "package" / "dist", target)
    app.config.html_static_path.append(str(static))


def setup(app) -> None:
    """Add the widget embedder to the static files before the HTML builder copies them."""
    app.connect("builder-inited", _unpack_widget_embedder)
