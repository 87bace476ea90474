# Two commands on a fresh machine: `make run` (the main job on the built-in default) and `make test`.
# Both create .venv and install on first use (`make install`, idempotent).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast run lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

test: install
	$(PY) -m pytest -q --durations=25

test-fast: install
	$(PY) -m pytest -q -m "not slow"

run: install
	$(PY) -m pipeline.run all --config pipeline/configs/quickstart.yaml

lint: install
	$(VENV)/bin/ruff check smarttrim stages pipeline cluster tests bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
