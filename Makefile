# The two commands that do all the set-up on a fresh machine:
#   make demo   - the whole chain on this machine (broker, gateway, dashboard, devices)
#   make test   - the test suite
# Each creates .venv on first use. Mosquitto and Chromium come from apt (see README).

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/medge demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check edge_agent converter gateway models medge tests

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
