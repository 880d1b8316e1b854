# The two commands of the README:  make physics  |  make test
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup physics test test-all test-avx2 lint format bench mlflow release
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

# The suite as an AVX2-only CPU runs it, on a CPU with AVX-512 bf16: PyTorch's and oneDNN's kernels
# capped at AVX2 (bf16 matmuls emulated, ~0.03x fp32; `auto` finds no native bf16 and keeps fp32).
test-avx2: setup
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 RAY_AUTH_MODE=disabled $(VENV)/bin/pytest -m "not slow" -q

format:
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

mlflow:
	$(VENV)/bin/ssae-ray mlflow

# Rebuild the GSAE release shipped in ssae_ray/releases/ from its recipe (`local-converged`: about
# 25 min on a quiet 2-core CPU with bf16) and write it with its manifest (README: Ship a GSAE).
release: setup
	$(VENV)/bin/ssae-ray pretrain --preset local-converged --ship
