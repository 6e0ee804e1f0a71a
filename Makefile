# The two commands that do all the set-up on a fresh machine:
#   make demo   - the whole chain on this machine (broker, gateway, dashboard, devices)
#   make test   - the test suite (ruff included: tests/test_style.py)
#   make test-fast - the same without conversions and whole-chain runs (-m "not slow")
# Each creates .venv on first use. Mosquitto and Chromium come from apt (see README).

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint schemas clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/medge demo $(ARGS)

# Two pytest workers (pytest-xdist), a test file each at a time: a file's module fixtures
# (a conversion, a broker) stay in one process. JOBS=1 runs it in one process.
JOBS ?= 2
XDIST = $(if $(filter-out 1,$(JOBS)),-n $(JOBS) --dist loadfile,)

test: $(STAMP)
	$(BIN)/python -m pytest $(XDIST) $(ARGS)

# Converted bundles are cached by content in .pytest_cache/medge-bundles (MEDGE_TEST_CACHE;
# tests/conftest.py), so a second run skips the session's conversion too.
test-fast: $(STAMP)
	$(BIN)/python -m pytest $(XDIST) -m "not slow" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# docs/*.schema.json from the pydantic models (tests/test_schema_export.py checks they are current)
schemas: $(STAMP)
	$(BIN)/python tools/export_schema.py

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
