"""One layer's chunk scoring at 32K x 4 (Llama-3.1-8B heads), the 4-bit code kernel beside the 16-bit landmark kernel,
for a profiler: each runs once to compile, then once more to be profiled (issue #32: why the code kernel reads at a
third of HBM).

    ncu --clock-control none --kernel-name regex:"code_logits|score_logits" --launch-skip 2 --launch-count 2 \\
        --section SpeedOfLight --section WarpStateStats python benchmarks/code_kernel_profile.py

``CODE_TILES='{"dot": "fp16_asm_phases", "block_t": 128}'`` updates ``GPU_TILES`` first (another form's profile).
"""
from __future__ import annotations

import json
import os
import sys

import torch

from shadowkv_fx.kernels import triton_code_score, triton_score

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import D  # noqa: E402  (sibling scripts: the 8B head shape, the sweep's inputs)
from score_kernel_sweep import scoring_inputs  # noqa: E402


def main() -> None:
    triton_code_score.GPU_TILES.update(json.loads(os.environ.get("CODE_TILES", "{}")))
    torch.manual_seed(0)
    q, sel, landmarks, _, (codes, scale) = scoring_inputs(4, 32768)
    for _ in range(2):  # compile, then the profiled launch (the profiler skips the first of each kernel)
        triton_code_score.score_code_chunks(q, codes, scale, sel, D**-0.5)
        triton_score.score_chunks(q, landmarks, sel, D**-0.5)
    torch.cuda.synchronize()
    print("code tiles", triton_code_score.GPU_TILES)


if __name__ == "__main__":
    main()
