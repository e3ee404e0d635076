#!/usr/bin/env bash
# Set up (idempotently) the project's virtual environment: torch 2.13.0 first, then the project.
# Usage: bash scripts/setup.sh [EXTRAS]   e.g. "demo" for the demo, "test" for the test suite.
# "train" (alone or in the list) also installs the training harness (training/, distribution fdn-training);
# "test" installs it too, since the suite tests it.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-demo}"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
# torch first: 2.13.0 installs offline here; any other version would download a multi-GB CUDA build.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "== installing torch==2.13.0"
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
CORE_EXTRAS=$(echo ",$EXTRAS," | sed 's/,train,/,/g; s/^,//; s/,$//')
TARGETS=(-e ".${CORE_EXTRAS:+[$CORE_EXTRAS]}")
if [[ ",$EXTRAS," == *,train,* || ",$EXTRAS," == *,test,* ]]; then
  TARGETS+=(-e ./training)
fi
echo "== installing fdn-retrieval${CORE_EXTRAS:+[$CORE_EXTRAS]} (editable)${TARGETS[3]:+ and fdn-training}"
"$PY" -m pip install --quiet "${TARGETS[@]}"

if [[ "$EXTRAS" == *test* ]] && ! command -v chromium >/dev/null 2>&1; then
  # The report test opens the demo's index.html in headless Chromium (Debian package).
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing Debian chromium for the browser test"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "!! chromium not found: install it (sudo apt-get install chromium) or the browser test will fail" >&2
  fi
fi
echo "== environment ready: $VENV"
