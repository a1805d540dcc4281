"""Triton kernels against their references on fresh random inputs (TRITON_INTERPRET=1 on CPU)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from shadowkv_fx.kernels import reference  # noqa: E402
from shadowkv_fx.kernels import triton_gather  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b, hkv, c, l, d, k", [(1, 1, 3, 8, 16, 2), (2, 3, 7, 4, 60, 5), (1, 2, 33, 8, 128, 9)])
def test_value_chunk_gather_matches_reference(dtype, b, hkv, c, l, d, k):
    g = torch.Generator().manual_seed(b * 100 + c)
    src = torch.randn(b, hkv, c, l, d, generator=g).to(dtype)
    if DEVICE.type == "cuda":
        src = src.pin_memory()
    idx = torch.stack([torch.randperm(c, generator=g)[:k] for _ in range(b * hkv)]).view(b, hkv, k).to(DEVICE)
    out = triton_gather.gather_value_chunks(src, idx, DEVICE)
    expected = reference.gather_value_chunks(src, idx, DEVICE)
    assert out.dtype == dtype and out.device.type == DEVICE.type
    assert torch.equal(out, expected)
