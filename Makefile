# Two entry points: `make repro` runs the pipeline, `make test` runs the tests.
# Both run the set-up first (`make install`): create .venv and install the project only when
# pyproject.toml changed, and build the offline plots page that `dvc plots show` uses.

PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed

# Offline-safe settings for DVC and Prefect, set by the project, not the user.
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# Stage commands run whatever `python` is first on PATH: make it the venv's.
export PATH := $(BIN):$(PATH)

.PHONY: install repro test test-slow bench flow sweep docs clean

install: $(STAMP) plot_templates/offline.html

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

repro: install
	dvc repro

test: install
	python -m pytest

test-slow: install
	python -m pytest -m slow

bench: install
	python -m benchmarks.train_throughput

# The same stages through Prefect (embedded mode, no server to start).
flow: install
	python -m orchestration

sweep: install
	python -m orchestration sweep

# The docs site: docs/ (mkdocs.yml) built into site/ (git-ignored); --strict fails on a broken link or anchor.
# NO_MKDOCS_2_WARNING silences mkdocs-material's notice about its successor, which is not a build warning.
DOCS_STAMP := $(VENV)/.docs-installed

$(DOCS_STAMP): pyproject.toml $(STAMP)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 mkdocs build --strict --site-dir site

# The page template with vega, vega-lite and vega-embed inlined (from vl-convert-python, no network),
# and plots.html_template in .dvc/config.local pointing at it: the plain `dvc plots show` and
# `dvc plots diff` then render offline.
plot_templates/offline.html: plot_templates/build_offline_template.py $(STAMP)
	python plot_templates/build_offline_template.py

clean:
	rm -rf $(VENV)
