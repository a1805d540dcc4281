"""Triton kernels against their references on fresh random inputs (TRITON_INTERPRET=1 on CPU)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from shadowkv_fx.kernels import naive, value_reuse  # noqa: E402
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
    expected = naive.gather_value_chunks(src, idx, DEVICE)
    assert out.dtype == dtype and out.device.type == DEVICE.type
    assert torch.equal(out, expected)


def test_value_chunk_gather_reads_rows_that_share_one_document():
    """Rows repeating one row through a zero batch stride (one document's questions in a batch,
    cache_share.repeat_rows) each read the shared row's values."""
    g = torch.Generator().manual_seed(7)
    row = torch.randn(1, 3, 7, 4, 60, generator=g)
    if DEVICE.type == "cuda":
        row = row.pin_memory()
    src = row.expand(3, -1, -1, -1, -1)
    idx = torch.stack([torch.randperm(7, generator=g)[:5] for _ in range(9)]).view(3, 3, 5).to(DEVICE)
    out = triton_gather.gather_value_chunks(src, idx, DEVICE)
    assert torch.equal(out, naive.gather_value_chunks(src.contiguous(), idx, DEVICE))
    # 8-bit values: the codes and their per-chunk scales repeat one row alike
    codes = torch.randint(-127, 128, (1, 3, 7, 4, 60), generator=g, dtype=torch.int8)
    scales = (torch.rand(1, 3, 7, generator=g) + 0.5).to(DEVICE)
    if DEVICE.type == "cuda":
        codes = codes.pin_memory()
    codes, scales = codes.expand(3, -1, -1, -1, -1), scales.expand(3, -1, -1)
    out = triton_gather.gather_value_chunks(codes, idx, DEVICE, scales=scales)
    assert torch.equal(out, naive.gather_value_chunks(codes.contiguous(), idx, DEVICE, scales.contiguous()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b, hkv, c, l, d, k", [(1, 1, 9, 8, 16, 4), (2, 3, 17, 4, 60, 6)])
def test_value_gather_writes_only_the_chunks_to_fetch(dtype, b, hkv, c, l, d, k):
    """Slots whose chunk the previous step already held keep their values; the rest are fetched."""
    g = torch.Generator().manual_seed(c + k)
    src = torch.randn(b, hkv, c, l, d, generator=g).to(dtype)
    if DEVICE.type == "cuda":
        src = src.pin_memory()
    prev_idx = torch.stack([torch.randperm(c, generator=g)[:k] for _ in range(b * hkv)]).view(b, hkv, k)
    idx = torch.stack([torch.randperm(c, generator=g)[:k] for _ in range(b * hkv)]).view(b, hkv, k)
    picked = torch.rand(b, hkv, k, generator=g) < 0.8
    slot_idx, slot_picked, fetch = value_reuse.stable_slots(idx, picked, prev_idx)
    assert fetch.any() and (~fetch).any(), "the case must mix hits and misses"
    kept = slot_idx == prev_idx
    assert torch.equal(kept, ~fetch), "a chunk held last step stays in its slot; every other slot is fetched"
    assert torch.equal(slot_idx.sort(-1).values, idx.sort(-1).values), "the slots hold exactly the chosen chunks"
    for row in range(b * hkv):  # each pick keeps its 'real' flag wherever it lands
        flags = dict(zip(idx.view(-1, k)[row].tolist(), picked.view(-1, k)[row].tolist()))
        assert [flags[i] for i in slot_idx.view(-1, k)[row].tolist()] == slot_picked.view(-1, k)[row].tolist()
    # the slots hold last step's values, marked: a kept slot must keep the mark, a fetched one lose it
    old = (naive.gather_value_chunks(src, prev_idx, DEVICE) + 100).to(dtype)
    out = old.clone()
    triton_gather.gather_value_chunks(src, slot_idx.to(DEVICE), DEVICE, out, fetch.to(DEVICE))
    expected = naive.gather_fetching(src, slot_idx, fetch, old.cpu().clone())
    assert torch.equal(out.cpu(), expected)
    assert torch.equal(out.cpu(), torch.where(fetch.repeat_interleave(l, dim=-1)[..., None],
                                              naive.gather_value_chunks(src, slot_idx, torch.device("cpu")),
                                              old.cpu()))
