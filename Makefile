# Everything runs from a local virtualenv, .venv, made on first use and
# re-installed whenever pyproject.toml changes (the stamp file tracks that).

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.make-stamp
ARGS ?=
CODE := chatlib tests notebooks tools
NBVAL_FLAGS := --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg
# Kernels are started as plain "python" (ipykernel's kernelspec), so put the
# venv first on PATH for anything that launches one.
VENV_PATH := PATH="$(abspath $(BIN)):$$PATH"
# Opt in to the platformdirs locations now; silences jupyter_core's deprecation warning.
QUIET_JUPYTER := JUPYTER_PLATFORM_DIRS=1
# Jupyter refuses to start as root (containers, CI machines) without this flag.
LAB_ROOT_FLAG := $(if $(filter 0,$(shell id -u 2>/dev/null)),--allow-root)

.PHONY: venv test student lab lab-solutions server client notebooks bench lint format clean site

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "Installing chatlib and its test and notebook dependencies into $(VENV) (a few minutes the first time)..."
	$(BIN)/python -m pip install --disable-pip-version-check --progress-bar off -e '.[test]'
	touch $@

test: $(STAMP)
	$(BIN)/ruff check $(CODE)
	$(BIN)/python -m pytest tests
	@# pytest exits 5 when it collects nothing, so skip nbval until notebooks exist.
	@if ls notebooks/*.ipynb >/dev/null 2>&1; then \
		echo "$(BIN)/python -m pytest $(NBVAL_FLAGS) notebooks/"; \
		$(VENV_PATH) $(QUIET_JUPYTER) $(BIN)/python -m pytest $(NBVAL_FLAGS) notebooks/; \
	else \
		echo "no notebooks/*.ipynb yet: skipping nbval"; \
	fi

# The learner's copies of the notebooks, exercises without solutions, in
# student/; copies already there are kept (ARGS=--force overwrites them).
student: $(STAMP)
	$(BIN)/python tools/student.py $(ARGS)

# From the repository root, so that the notebooks' links to ../chatlib/ and
# ../docs/ open; with the course map open, and no news pop-up over the outputs.
# lab opens the learner's copies, lab-solutions the teacher's. lab first copies
# any notebook that student/ lacks (all of them, the first time) and keeps the rest.
lab: $(STAMP)
	$(BIN)/python tools/student.py
	$(VENV_PATH) $(BIN)/jupyter lab $(LAB_ROOT_FLAG) --ServerApp.root_dir=. \
		--LabApp.app_settings_dir=lab-settings $(ARGS) student/00-course-map.ipynb

lab-solutions: $(STAMP)
	$(VENV_PATH) $(BIN)/jupyter lab $(LAB_ROOT_FLAG) --ServerApp.root_dir=. \
		--LabApp.app_settings_dir=lab-settings $(ARGS) notebooks/00-course-map.ipynb

server: $(STAMP)
	$(BIN)/python -m chatlib.server $(ARGS)

client: $(STAMP)
	$(BIN)/python -m chatlib.client $(ARGS)

notebooks: $(STAMP)
	$(VENV_PATH) $(QUIET_JUPYTER) $(BIN)/jupyter nbconvert --to notebook --execute --inplace \
		notebooks/[0-9]*.ipynb
	@# Widget state is kept: a fresh open (and the course site) shows the chat panels.
	$(BIN)/nbstripout --keep-output --keep-count --keep-metadata-keys metadata.widgets \
		notebooks/[0-9]*.ipynb

bench: $(STAMP)
	$(BIN)/python -m chatlib.bench $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(CODE)

format: $(STAMP)
	$(BIN)/ruff check --fix --exit-zero $(CODE)
	$(BIN)/ruff format $(CODE)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis _build
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	find . -name .ipynb_checkpoints -type d -prune -exec rm -rf {} +

# The course as a static website (site/conf.py): every notebook with the
# outputs stored in it (none is re-run), the docs and the README.
site: $(STAMP)
	$(BIN)/python -m sphinx -b html -q -c site -d _build/doctrees . _build/html
	@echo "The site is in _build/html. To read it, serve it and open http://127.0.0.1:8000/ :"
	@echo "    python3 -m http.server --bind 127.0.0.1 -d _build/html"
