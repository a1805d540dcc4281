"""Does a layer's key factorisation (``key_basis.py``) overlap the prefill's compute on the GPU?

Times, on one GPU, with the 8B shape's W = Hkv * D = 1024:
- one fp64 ``eigh`` of a W x W Gram matrix on the GPU, alone, and on the host CPU (LAPACK);
- a stand-in for one layer's prefill compute (bf16 GEMMs of a 32K-token layer, ~40 ms) alone;
- ``layers`` of them back to back with a factorisation a layer (``compression.factor_keys`` of 32K keys) run
  in line, and through ``key_basis.PendingBases`` (worker thread, side stream) at the stream's default and at
  high priority.

    python benchmarks/basis_overlap.py [--tokens 32768] [--layers 32] [--out DIR]

If the worker overlaps, its row is close to the compute alone; in line adds ~layers x one factorisation.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from shadowkv_fx import key_basis
from shadowkv_fx.kernels import compression

sys.path.insert(0, os.path.dirname(__file__))
from prefill_batch import write_results  # noqa: E402  (a sibling script)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds(fn, repeat: int = 3) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--rank", type=int, default=160)
    parser.add_argument("--out")
    parser.add_argument("--hidden", type=int, default=4096, help="model width (the stand-in's GEMMs)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only checks the script on tiny shapes
    torch.manual_seed(0)
    width = args.heads * args.head_dim
    keys = torch.randn(args.heads, args.tokens, args.head_dim, device=device, dtype=torch.bfloat16)
    gram = (lambda a: a.T @ a)(torch.randn(4 * width, width, device=device, dtype=torch.float64))
    gram_host = gram.cpu()
    h, mlp = args.hidden, args.hidden * 7 // 2
    hidden = torch.randn(args.tokens, h, device=device, dtype=torch.bfloat16)
    weights = [torch.randn(h, n, device=device, dtype=torch.bfloat16) for n in (h * 3 // 2, h, 2 * mlp)]
    down = torch.randn(mlp, h, device=device, dtype=torch.bfloat16)

    def layer_compute() -> None:  # q/k/v, o, gate+up, down of one 8B layer over the prompt's tokens
        qkv = hidden @ weights[0]
        out = qkv[:, :h] @ weights[1]
        up = out @ weights[2]
        (up[:, :mlp] * up[:, mlp:]) @ down

    u = torch.zeros(args.layers, args.tokens, args.rank, device=device, dtype=torch.bfloat16)
    sv = torch.zeros(args.layers, args.heads, args.rank, args.head_dim, device=device, dtype=torch.bfloat16)
    err = torch.zeros(args.layers, device=device)

    def prefill(mode: str) -> None:
        bases = key_basis.PendingBases()
        for layer in range(args.layers):
            layer_compute()
            if mode == "inline":
                factors = compression.factor_keys(compression.flatten_keys(keys), args.heads, args.rank)
                for out, value in zip((u[layer], sv[layer], err[layer]), factors):
                    out.copy_(value)
            elif mode != "none":
                bases.submit(keys, args.rank, u[layer], sv[layer], err[layer])
        bases.finish()

    def worker(priority: int):
        def run() -> None:
            key_basis.STREAM = (f"basis_overlap, priority {priority}", priority)
            prefill("worker")
        return run

    default_solver, default_rounds = compression.EIGEN_SOLVER, compression.SUBSPACE_ROUNDS
    rows = {
        "eigh fp64 on the GPU, one": seconds(lambda: torch.linalg.eigh(gram)),
        "eigh fp32 on the GPU, one": seconds(lambda: torch.linalg.eigh(gram.float())),
    }
    compression.EIGEN_SOLVER = "subspace"
    for rounds in (2, 3, 4):  # the package's own solver (its fixed start, its Rayleigh-Ritz step) at each depth
        compression.SUBSPACE_ROUNDS = rounds
        rows[f"subspace iteration x{rounds}, fp64 on the GPU, one"] = seconds(
            lambda: compression._top_eigenpairs(gram, args.rank))
    compression.SUBSPACE_ROUNDS = default_rounds
    compression.EIGEN_SOLVER = "eigh"  # the rows below without "subspace" in their name: the full eigh
    rows |= {
        "eigh fp64 on the host CPU, one": seconds(lambda: torch.linalg.eigh(gram_host)),
        "factor_keys on the GPU, one": seconds(
            lambda: compression.factor_keys(compression.flatten_keys(keys), args.heads, args.rank)),
        "layer compute, one": seconds(layer_compute),
        "prefill stand-in, no factorisation": seconds(lambda: prefill("none")),
        "prefill stand-in, factorisation in line": seconds(lambda: prefill("inline")),
    }
    if device == "cuda":
        rows["prefill stand-in, worker, default priority"] = seconds(worker(0))
        rows["prefill stand-in, worker, high priority"] = seconds(worker(-1))
    compression.EIGEN_SOLVER = "subspace"
    rows["factor_keys on the GPU, one, subspace"] = seconds(
        lambda: compression.factor_keys(compression.flatten_keys(keys), args.heads, args.rank))
    rows["prefill stand-in, in line, subspace"] = seconds(lambda: prefill("inline"))
    if device == "cuda":
        rows["prefill stand-in, worker, high priority, subspace"] = seconds(worker(-1))
    compression.EIGEN_SOLVER = default_solver
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    lines = [f"{name}, {args.tokens} tokens, W = {width}, {args.layers} layers, "
             f"torch.get_num_threads() = {torch.get_num_threads()}"]
    lines += [f"{name:<48}{value * 1e3:>10.2f} ms" for name, value in rows.items()]
    write_results(args.out, "basis_overlap", rows, "\n".join(lines))


if __name__ == "__main__":
    main()
