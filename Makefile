# The two commands of the README:  make physics  |  make test
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup physics test test-all lint format bench mlflow
setup:
	bash scripts/setup.sh

physics: setup
	$(PY) jobs/physics.py --preset local

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	RAY_AUTH_MODE=disabled $(VENV)/bin/pytest -m "not slow" -q

test-all: setup
	RAY_AUTH_MODE=disabled $(VENV)/bin/pytest -q

format:
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

mlflow:
	$(VENV)/bin/ssae-ray mlflow
