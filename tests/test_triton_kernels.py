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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b, hkv, c, l, d, k", [(1, 1, 9, 8, 16, 4), (2, 3, 17, 4, 60, 6)])
def test_value_gather_reads_reused_chunks_from_the_previous_copy(dtype, b, hkv, c, l, d, k):
    """Chunks the previous step fetched come from its copy on the device, the rest from the source."""
    g = torch.Generator().manual_seed(c + k)
    src = torch.randn(b, hkv, c, l, d, generator=g).to(dtype)
    if DEVICE.type == "cuda":
        src = src.pin_memory()
    prev_idx = torch.stack([torch.randperm(c, generator=g)[:k] for _ in range(b * hkv)]).view(b, hkv, k)
    idx = torch.stack([torch.randperm(c, generator=g)[:k] for _ in range(b * hkv)]).view(b, hkv, k)
    reuse = reference.reuse_slots(idx, prev_idx)
    assert (reuse >= 0).any() and (reuse < 0).any(), "the case must mix hits and misses"
    for j in range(k):  # a hit points at the same chunk id in the previous selection
        hit = reuse[..., j] >= 0
        assert torch.equal(torch.gather(prev_idx, 2, reuse[..., j : j + 1].clamp(min=0))[..., 0][hit], idx[..., j][hit])
    # a marked copy: values read from it differ from the source, so the test sees where each came from
    prev = (reference.gather_value_chunks(src, prev_idx, DEVICE) + 100).to(dtype).contiguous()
    out = torch.full((b, hkv, k * l, d), float("nan"), dtype=dtype, device=DEVICE)
    triton_gather.gather_value_chunks(src, idx.to(DEVICE), DEVICE, out, reuse.to(DEVICE), prev)
    expected = reference.gather_reusing(src, idx, reuse, prev.cpu(), torch.device("cpu"))
    assert torch.equal(out.cpu(), expected)
    hits = (reuse >= 0).repeat_interleave(l, dim=-1)
    assert torch.equal(out.cpu()[~hits], reference.gather_value_chunks(src, idx, torch.device("cpu"))[~hits])
