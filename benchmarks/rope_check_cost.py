"""What one layer's RoPE-form check (``rope_detection.measure``) costs a prefill: device time and the memory it adds
on top of the keys, reading every prompt position against ``FORM_CHECK_POSITIONS`` spread ones (the default).

    python benchmarks/rope_check_cost.py [--tokens 32768,122880] [--out DIR]

Keys of the 8B shape (8 KV heads x 128, bf16) rotated by Llama's RoPE; each row's form must come out "rotate_half".
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from shadowkv_fx import rope_detection
from shadowkv_fx.kernels import rope_forms

sys.path.insert(0, os.path.dirname(__file__))
from basis_overlap import seconds  # noqa: E402  (sibling scripts)
from prefill_batch import write_results  # noqa: E402


def llama_keys(tokens: int, heads: int, head_dim: int, device: str) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Pre-RoPE keys ``[1, H, S, D]``, the same rotated the way Llama rotates them, and the tables."""
    inv = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(tokens, device=device, dtype=torch.float32)[:, None] * inv
    freqs = torch.cat([angles, angles], dim=-1)
    cos, sin = (t.to(torch.bfloat16)[None, None] for t in (freqs.cos(), freqs.sin()))
    k_pre = torch.randn(1, heads, tokens, head_dim, device=device, dtype=torch.bfloat16)
    k_rot = rope_forms.apply_rope(k_pre, cos, sin, "rotate_half")
    return k_pre, k_rot, [cos, sin]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="32768,122880")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--out")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"  # the CPU only checks the script on small shapes
    default = rope_forms.FORM_CHECK_POSITIONS
    rows, lines = {}, [f"{torch.cuda.get_device_name() if gpu else 'cpu'}: one layer's RoPE-form check",
                       f"{'tokens':>8} {'positions read':>15} {'ms':>8} {'added MiB':>10} form"]
    for tokens in (int(t) for t in args.tokens.split(",")):
        k_pre, k_rot, tables = llama_keys(tokens, args.heads, args.head_dim, device)
        for positions in (tokens, default):
            rope_forms.FORM_CHECK_POSITIONS = positions
            try:
                ms = 1e3 * seconds(lambda: rope_detection.measure(k_pre, k_rot, tables).errors)
                if gpu:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                pending = rope_detection.measure(k_pre, k_rot, tables)
                added = (torch.cuda.max_memory_allocated() - base) / 2**20 if gpu else float("nan")
                form = rope_forms.form_from_errors(pending.errors.tolist(), k_rot.dtype)
            finally:
                rope_forms.FORM_CHECK_POSITIONS = default
            read = len(range(0, tokens, -(-tokens // positions)))
            rows[f"{tokens} tokens, {'all' if positions == tokens else 'spread'}"] = {
                "positions_read": read, "ms": ms, "added_mib": added, "form": form}
            lines.append(f"{tokens:>8} {read:>15} {ms:>8.3f} {added:>10.1f} {form}")
    write_results(args.out, "rope_check_cost", rows, "\n".join(lines))


if __name__ == "__main__":
    main()
