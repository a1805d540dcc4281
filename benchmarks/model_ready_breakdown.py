"""Where a fresh process's seconds go before a model is ready on the GPU (#23's "model ready"):
interpreter start, each import, CUDA start, the model build. Run from a shell that stamps the start:

    START=$(date +%s.%N) python benchmarks/model_ready_breakdown.py [--layers 32]

Prints one line per phase: seconds since the stamp, and the phase's own seconds.
"""
from __future__ import annotations

import os
import sys
import time

START = float(os.environ.get("START", time.time()))
marks: list[tuple[str, float]] = [("interpreter up", time.time() - START)]


def mark(name: str) -> None:
    marks.append((name, time.time() - START))


import torch  # noqa: E402

mark("import torch")
torch.cuda.init()
torch.empty(1, device="cuda")
mark("CUDA start (context + first allocation)")
import transformers  # noqa: E402,F401
from transformers import LlamaForCausalLM  # noqa: E402,F401

mark("import transformers + LlamaForCausalLM")
import shadowkv_fx  # noqa: E402,F401

mark("import shadowkv_fx")
from shadowkv_fx import bench  # noqa: E402

mark("import shadowkv_fx.bench")
layers = int(sys.argv[sys.argv.index("--layers") + 1]) if "--layers" in sys.argv else 32
model = bench.llama31_8b_random(layers)
torch.cuda.synchronize()
mark(f"build the 8B-shaped model ({layers} layers, random bf16)")
import torch._dynamo  # noqa: E402,F401
import torch._inductor.config  # noqa: E402,F401

mark("import torch._dynamo + inductor (first compile pays it)")
previous = 0.0
for name, at in marks:
    print(f"{at:7.2f} s  (+{at - previous:5.2f})  {name}")
    previous = at
