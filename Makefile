# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lossland-installed
DEMO_DIR ?= runs/demo

.PHONY: install demo test test-all test-slow bench reproduce clean

install: $(STAMP)

# Re-install whenever the package metadata changes.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: install
	$(PY) -m experiments.train --workdir=$(DEMO_DIR) --overwrite --track_every=20 --steps=3000
	@echo "records: $(DEMO_DIR)/metrics.jsonl  config: $(DEMO_DIR)/config.json  plots: $(DEMO_DIR)/plots/"

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ""

test-slow: install
	$(PY) -m pytest -q -m slow

bench: install
	$(PY) -m benchmarks.curvature

clean:
	rm -rf $(VENV) runs .pytest_cache
reproduce: install
	$(PY) -m experiments.reproduce --preset=quick
