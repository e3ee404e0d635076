# The two commands a newcomer needs:  make demo   and   make test   (then  make web  opens the demo in a browser)
.PHONY: demo test test-fast web lint setup-demo setup-test setup-web

VENV ?= .venv
VENV_WEB ?= .venv-web
DEMO_OUT ?= demo_out
# Extra options for `fdn web`, e.g. WEB_ARGS="--port 8090" or WEB_ARGS="--model M --db DB --data DIR".
WEB_ARGS ?=

demo: setup-demo
	$(VENV)/bin/fdn demo --out $(DEMO_OUT)

# The suite in the test environment, then the browser application's tests in its own environment
# (trame-slicer 2.0.0 needs slicer-core 5.11 / vtk 9.6.0, the test extra slicer-core 5.13).
test: setup-test setup-web
	$(VENV)/bin/python -m pytest -q Testing
	$(VENV_WEB)/bin/python -m pytest -q Testing/test_web_studies.py Testing/test_web_app.py

# The retrieval in a web browser on the demo database (after `make demo`): http://127.0.0.1:8080/
web: setup-web
	$(VENV_WEB)/bin/fdn web $(if $(filter-out demo_out,$(DEMO_OUT)),--db $(DEMO_OUT)/db --data $(DEMO_OUT)/cohort) $(WEB_ARGS)

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

setup-web:
	VENV_WEB=$(VENV_WEB) bash scripts/setup.sh web
