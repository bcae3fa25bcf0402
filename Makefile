# Two entry points for a fresh machine (needs only Python >= 3.11 and make):
#   make demo   - headend + simulated site + gateway on loopback, live timeline
#   make test   - ruff, mypy, pytest
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest pydnp3 proto bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "dergw needs Python >= 3.11; set PYTHON=/path/to/python3.11")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dergw demo

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# Three workers on two cores: the HIL tests spend most of their time waiting on real time.
pytest: $(STAMP) pydnp3
	$(BIN)/pytest -q -n 3

# pydnp3, the DNP3 driver's native backend, builds from source once per machine (3.5-7 min) into
# ~/.cache/dergw/wheels (packaging/pydnp3). CI (DERGW_REQUIRE_SERVICES=1) builds it when that
# cache lacks it, so the DNP3 tests run on both backends; elsewhere a cached wheel is installed
# when there is one, and the pydnp3 tests skip when there is none.
pydnp3: $(STAMP)
	@packaging/pydnp3/build-wheel --python $(BIN)/python --install $(if $(filter 1,$(DERGW_REQUIRE_SERVICES)),,--cached-only)

# Regenerate the wire contract from proto/dergw/v1/*.proto (tests fail if the committed copy is stale).
proto: $(STAMP)
	$(BIN)/python proto/generate.py

bench: $(STAMP)
	$(BIN)/dergw bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
