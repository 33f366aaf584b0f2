# Two commands: `make demo` and `make test`. Both install whatever is missing first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-system setup-venv tinyos demo test lint typecheck unit bench clean

setup: setup-system setup-venv tinyos

setup-system:
	@if [ "$$(id -u)" -eq 0 ]; then bash scripts/setup-system.sh; \
	 else echo "not root: skipping system packages (run 'sudo make setup-system' once)"; fi

setup-venv:
	@bash scripts/setup-venv.sh

tinyos: setup-venv
	@$(PY) -m worker_role.tinyos build --quiet

demo: setup
	@$(PY) -m node.demo

lint: setup-venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The full suite includes the from-scratch rebuild that proves the debian-12 layers reproducible.
test: setup lint
	VMLEND_SLOW_TESTS=1 $(VENV)/bin/pytest -q

unit: setup-venv
	$(VENV)/bin/pytest -q -m "not vm and not e2e"

bench: setup
	@for b in bench/*.py; do $(PY) $$b; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .hypothesis
