# The two commands a newcomer needs:  make demo   and   make test
.PHONY: demo test test-fast lint setup-demo setup-test

VENV ?= .venv
DEMO_OUT ?= demo_out

demo: setup-demo
	$(VENV)/bin/fdn demo --out $(DEMO_OUT)

test: setup-test
	$(VENV)/bin/python -m pytest -q Testing

# Quick local runs: everything but the tests marked slow (DDP, end-to-end training, the demo, browsers).
test-fast: setup-test
	$(VENV)/bin/python -m pytest -q -m "not slow" Testing

# Lint: ruff (style, imports, docstrings of public code) and mypy (strict on fdn_core; pyproject.toml).
lint: setup-test
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

setup-demo:
	bash scripts/setup.sh demo

setup-test:
	bash scripts/setup.sh test
