#!/usr/bin/env bash
# The GPU suite on a device machine (inside scripts/device_jobs.sh, which installs the package and sets OUT):
# every test file with CUDA cases, 12 at a time, then where a fresh process's seconds go before a model is ready.
# Usage: bash scripts/device_jobs.sh $OUT/jobs "bash scripts/gpu_suite.sh"   (results: $OUT/jobs/gpu_tests.txt, ready.txt)
set -uo pipefail
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
python3 -m pytest -q -o addopts='' -p no:cacheprovider -rs -n 12 --dist loadfile tests/test_triton_*.py \
    tests/test_cuda_graph.py tests/test_pinned.py tests/test_sparse_decode.py tests/test_fold.py tests/test_token_chunks.py \
    tests/test_reference_kernels.py tests/test_cold_start.py tests/test_hooks.py tests/test_capture_warmup.py \
    tests/test_serving_shadowkv.py tests/test_prefix_store.py tests/test_dense_fallback.py tests/test_quantize.py \
    tests/test_quantized_store.py tests/test_cache_reuse.py tests/test_span_select.py tests/test_bench_fill.py \
    tests/test_attend_earlier.py tests/test_prefill_pieces.py tests/test_landmark_runs.py tests/test_key_codes.py tests/test_key_basis.py tests/test_prefill_syncs.py > "$OUT/gpu_tests.txt" 2>&1
tail -3 "$OUT/gpu_tests.txt"
START=$(date +%s.%N) python3 benchmarks/model_ready_breakdown.py > "$OUT/ready.txt" 2>&1
cat "$OUT/ready.txt"
