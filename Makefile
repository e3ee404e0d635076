# The two commands a newcomer needs:  make demo   and   make test
.PHONY: demo test lint setup-demo setup-test

VENV ?= .venv
DEMO_OUT ?= demo_out

demo: setup-demo
	$(VENV)/bin/fdn demo --out $(DEMO_OUT)

test: setup-test
	$(VENV)/bin/python -m pytest -q Testing

lint: setup-test
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

setup-demo:
	bash scripts/setup.sh demo

setup-test:
	bash scripts/setup.sh test
