#!/usr/bin/env bash
# Full accuracy suite on one GPU (SmolLM2-135M, float32): all 12 tasks at 2k/4k/8k, 3 samples each,
# dense vs ShadowKV vs the sink + local and Quest baselines at the same attended tokens.
# Budgets are fractions of each context length (1/16 is 128 tokens at 2k, 512 at 8k), rounded down
# to whole chunks; results are grouped by that fraction.
# Usage: bash eval_results/run_full.sh [extra eval options, e.g. --dtype bfloat16 --out-dir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
TASKS=niah_single_1,niah_single_2,niah_single_3,niah_single_word,niah_multikey_1,niah_multikey_2,niah_multikey_3
TASKS=$TASKS,niah_multivalue,niah_multiquery,vt,cwe,fwe
shadowkv-fx eval --model smollm2 --tasks "$TASKS" --lengths 2k,4k,8k --samples 3 \
    --methods dense,shadowkv,sink_local,quest --budgets 1/16,1/32,1/64 \
    --device cuda --dtype float32 --cuda-graphs --out-dir eval_results/smollm2_gpu "$@"
