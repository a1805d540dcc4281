"""How far the subspace solver's key bases (``compression.EIGEN_SOLVER = "subspace"``) are from the optimal ones
(the full ``eigh``), on real keys: SmolLM2's pre-RoPE keys of a 2K-token prompt (this repository's README), every
layer, at ranks where the subspace route applies (rank + 16 <= W / 2, W = 192). CPU.

    python benchmarks/subspace_fit.py [--tokens 2048] [--ranks 32 64] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os

import torch

from shadowkv_fx.kernels import compression
from shadowkv_fx.smollm2 import load_smollm2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--ranks", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--rounds", type=int, default=compression.SUBSPACE_ROUNDS, help="subspace iteration rounds")
    args = parser.parse_args()
    compression.SUBSPACE_ROUNDS = args.rounds
    model, tokenizer = load_smollm2()
    readme = os.path.join(os.path.dirname(__file__), "..", "README.md")
    ids = tokenizer(open(readme).read() * 4, return_tensors="pt").input_ids[:, : args.tokens]
    keys: list[torch.Tensor] = []
    for layer in model.model.layers:
        layer.self_attn.k_proj.register_forward_hook(lambda m, i, out: keys.append(out[0].detach().float()))
    with torch.no_grad():
        model(ids)
    hkv = model.config.num_key_value_heads
    for rank in args.ranks:
        worst, total = 0.0, [0.0, 0.0]
        for flat in keys:
            fits = []
            for solver in ("eigh", "subspace"):
                compression.EIGEN_SOLVER = solver
                fits.append(compression.factor_keys(flat, hkv, rank)[2].item())
            worst = max(worst, fits[1] / fits[0] - 1)
            total = [t + f for t, f in zip(total, fits)]
        print(f"{args.rounds} rounds, rank {rank}: mean fit error over {len(keys)} layers, eigh {total[0] / len(keys):.4f}, "
              f"subspace {total[1] / len(keys):.4f}; the worst layer's subspace error is {100 * worst:.2f}% higher")


if __name__ == "__main__":
    main()
