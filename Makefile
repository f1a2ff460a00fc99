# Two entry points: `make repro` runs the pipeline, `make test` runs the tests.
# Both create .venv and install the project only when pyproject.toml changed.

PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed

# Offline-safe settings for DVC and Prefect, set by the project, not the user.
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# Stage commands run whatever `python` is first on PATH: make it the venv's.
export PATH := $(BIN):$(PATH)

.PHONY: install repro test test-slow bench plots-html flow sweep clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

repro: $(STAMP)
	dvc repro

test: $(STAMP)
	python -m pytest

test-slow: $(STAMP)
	python -m pytest -m slow

bench: $(STAMP)
	python -m benchmarks.train_throughput

# The same stages through Prefect (embedded mode, no server to start).
flow: $(STAMP)
	python -m pipeline.flows

sweep: $(STAMP)
	python -m pipeline.flows sweep

# dvc plots show as a page that renders offline (vega inlined; npm fetches it once into .cache/vega).
plot_templates/offline.html: plot_templates/build_offline_template.py
	python3 plot_templates/build_offline_template.py

plots-html: $(STAMP) plot_templates/offline.html
	dvc plots show --html-template plot_templates/offline.html

clean:
	rm -rf $(VENV)
