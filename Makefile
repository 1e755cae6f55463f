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

# Tests run on every core (pytest-xdist). A module or test class is one unit of work, so
# tests sharing a module fixture run on one worker; units go out longest first (the order
# of tests/conftest.py). The 20 slowest tests are listed, so the next slow one is seen.
PYTEST := $(PY) -m pytest -q -n auto --dist loadscope --no-loadscope-reorder --durations=20
# Prints the wall time of a test command and keeps its exit status.
TIMED = start=$$(date +%s); $(1); status=$$?; \
	echo "$@: wall time $$(( $$(date +%s) - start )) s"; exit $$status

test: install
	@$(call TIMED,$(PYTEST))

test-all: install
	@$(call TIMED,$(PYTEST) -m "")

test-slow: install
	@$(call TIMED,$(PYTEST) -m slow)

bench: install
	$(PY) -m benchmarks.curvature

clean:
	rm -rf $(VENV) runs .pytest_cache
reproduce: install
	$(PY) -m experiments.reproduce --preset=quick
