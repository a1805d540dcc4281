"""Where a fresh process's seconds go before a model is ready on the GPU (#23's "model ready"):
interpreter start, each import, CUDA start, the model build. Run from a shell that stamps the start:

    START=$(date +%s.%N) python benchmarks/model_ready_breakdown.py [--layers 32]

Prints one line per phase: seconds since the stamp, and the phase's own seconds.
"""
from __future__ import annotations

import argparse
import importlib
import os
import time

START = float(os.environ.get("START", time.time()))
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--layers", type=int, default=32)
layers = parser.parse_args().layers
marks: list[tuple[str, float]] = [("interpreter up", time.time() - START)]


def mark(name: str) -> None:
    marks.append((name, time.time() - START))


import torch  # noqa: E402

mark("import torch")
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.empty(1, device=device)
mark(f"{device} start (context + first allocation)")
importlib.import_module("transformers").LlamaForCausalLM  # the model class loads its modules lazily

mark("import transformers + LlamaForCausalLM")
importlib.import_module("shadowkv_fx")

mark("import shadowkv_fx")
from shadowkv_fx import bench  # noqa: E402

mark("import shadowkv_fx.bench")
model = bench.llama31_8b_random(layers, device)
if device == "cuda":
    torch.cuda.synchronize()
mark(f"build the 8B-shaped model ({layers} layers, random bf16)")
importlib.import_module("torch._dynamo")
importlib.import_module("torch._inductor.config")

mark("import torch._dynamo + inductor (first compile pays it)")
previous = 0.0
for name, at in marks:
    print(f"{at:7.2f} s  (+{at - previous:5.2f})  {name}")
    previous = at
