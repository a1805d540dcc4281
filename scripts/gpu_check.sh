#!/usr/bin/env bash
# One device call: the GPU tests (kernels against their references, CUDA-graphed decode, threads)
# and the side-by-side bench. Usage: bash scripts/gpu_check.sh OUT_DIR [bench args...]
set -uo pipefail
OUT=${1:?output folder}; shift
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# packages the GPU machine lacks travel as wheels in .whl (carried; see the device README)
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps .whl/*.whl >> "$OUT/install.log" 2>&1 || cat "$OUT/install.log"
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/install.log" 2>&1 || cat "$OUT/install.log"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -o addopts="" -p no:cacheprovider -rs ${GPU_TESTS:-tests/test_triton_kernels.py tests/test_triton_decode_kernels.py \
    tests/test_triton_decode_attention.py tests/test_cuda_graph.py} 2>&1 | tee "$OUT/gpu_tests.txt" | tail -25
if [ "$#" -gt 0 ]; then
    shadowkv-fx bench --out "$OUT/bench" "$@" 2>&1 | tee "$OUT/bench_log.txt" | tail -40
fi
