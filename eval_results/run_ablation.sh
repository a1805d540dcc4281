#!/usr/bin/env bash
# Ablation on the same suite (SmolLM2-135M, CPU, float32): rank, chunk size, outliers on/off.
set -euo pipefail
for kind in rank chunk outliers; do
    shadowkv-fx eval --model smollm2 --tasks niah_single_2,niah_multikey_1 --lengths 4k --budgets 256 \
        --samples 2 --methods shadowkv --ablation "$kind" --out-dir "eval_results/ablation_$kind"
done
