#!/usr/bin/env bash
# Why a fresh process on the device machine spends ~9 s importing torch + transformers (#23's warm first token):
# is the bytecode cache written (writable site-packages), and what does a second process, or a bytecode cache in a
# folder we name (PYTHONPYCACHEPREFIX), save? Usage (inside device_jobs.sh): bash scripts/import_probe.sh > $OUT/imports.txt
set -uo pipefail
IMPORT="import torch; from transformers import LlamaForCausalLM"
python3 - <<'PY'
import importlib.util, os
for name in ("torch", "transformers"):
    folder = os.path.dirname(importlib.util.find_spec(name).origin)
    caches = sum(1 for root, dirs, files in os.walk(folder) if root.endswith("__pycache__"))
    print(f"{name}: {folder} writable={os.access(folder, os.W_OK)} __pycache__ folders={caches}")
PY
stamp() { local t0; t0=$(date +%s%N); "$@" > /dev/null 2>&1; echo "$(( ($(date +%s%N) - t0) / 1000000 )) ms: $*"; }
for run in 1 2; do stamp python3 -c "$IMPORT"; done
for run in 1 2; do PYTHONPYCACHEPREFIX=/tmp/pyc stamp python3 -c "$IMPORT"; done
PYTHONDONTWRITEBYTECODE=1 stamp python3 -c "$IMPORT"
stamp python3 -c "pass"
stamp python3 -S -c "pass"
python3 -X importtime -c "$IMPORT" 2> /tmp/importtime.txt
echo "--- slowest imports (self us, cumulative us, module)"
sort -t'|' -k2 -n -r /tmp/importtime.txt | head -25
echo "--- syscall-heavy? stat count of one import"
python3 - <<'PY'
import sys, time
calls = {"n": 0}
import os
real_stat = os.stat
def counting_stat(*a, **k):
    calls["n"] += 1
    return real_stat(*a, **k)
os.stat = counting_stat
t = time.time()
import torch
from transformers import LlamaForCausalLM
print(f"{time.time() - t:.2f} s, os.stat from python: {calls['n']}, sys.path entries: {len(sys.path)}, modules: {len(sys.modules)}")
PY
