#!/usr/bin/env bash
# Set up (idempotently) one of the project's virtual environments: torch 2.13.0 first, then the project.
# Usage: bash scripts/setup.sh [EXTRAS]   e.g. "demo" for the demo, "test" for the test suite.
# "train" (alone or in the list) also installs the training harness (training/, distribution fdn-training);
# "test" installs it too, since the suite tests it.
# "web" makes the separate browser environment .venv-web: fdn-retrieval with the phantom extra and the web
# application (SlicerFDNRetrieval/FDNRetrievalWeb, distribution fdn-retrieval-web, `fdn web`) with its test
# extra. It is separate because trame-slicer[standalone] 2.0.0 pins slicer-core 5.11 / vtk 9.6.0, while the
# test extra pins slicer-core 5.13.31053.0 (vtk 9.6.2); the two cannot share one environment.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-demo}"
PYTHON="${PYTHON:-python3}"
if [ "$EXTRAS" = "web" ]; then
  VENV="${VENV_WEB:-.venv-web}"
else
  VENV="${VENV:-.venv}"
fi

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
if [ "$EXTRAS" = "web" ]; then
  echo "== installing fdn-retrieval[phantom] and fdn-retrieval-web[test] (editable; trame-slicer[standalone]==2.0.0)"
  "$PY" -m pip install --quiet -e ".[phantom]" -e "./SlicerFDNRetrieval/FDNRetrievalWeb[test]"
else
  CORE_EXTRAS=$(echo ",$EXTRAS," | sed 's/,train,/,/g; s/^,//; s/,$//')
  TARGETS=(-e ".${CORE_EXTRAS:+[$CORE_EXTRAS]}")
  if [[ ",$EXTRAS," == *,train,* || ",$EXTRAS," == *,test,* ]]; then
    TARGETS+=(-e ./training)
  fi
  echo "== installing fdn-retrieval${CORE_EXTRAS:+[$CORE_EXTRAS]} (editable)${TARGETS[3]:+ and fdn-training}"
  "$PY" -m pip install --quiet "${TARGETS[@]}"
fi

# Debian packages: Chromium for the browser tests (the demo report, the web application), Mesa's EGL for
# offscreen VTK rendering in the web application. Installed when running as root, else named.
PACKAGES=()
if [[ "$EXTRAS" == *test* || "$EXTRAS" == web ]] && ! command -v chromium >/dev/null 2>&1; then
  PACKAGES+=(chromium)
fi
if [ "$EXTRAS" = "web" ] && command -v dpkg >/dev/null 2>&1; then
  for pkg in libegl1 libegl-mesa0 libgl1-mesa-dri; do
    dpkg -s "$pkg" >/dev/null 2>&1 || PACKAGES+=("$pkg")
  done
fi
if [ "${#PACKAGES[@]}" -gt 0 ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing Debian packages: ${PACKAGES[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}" >/dev/null
  else
    echo "!! missing: ${PACKAGES[*]} (sudo apt-get install ${PACKAGES[*]}); browser tests or rendering may fail" >&2
  fi
fi
echo "== environment ready: $VENV"
