"""Triton chunk selection (``triton_topk.top_chunks``) against ``naive.top_chunks`` (torch.topk).

Order within the k picks is free and equal scores may be picked in any order, so a result is
checked by the scores it picked: sorted, they must equal torch.topk's values exactly. Rows with
many ``-inf`` (fewer finite scores than k), ``C < k``, C off a power of two, ties (bf16 scores,
few distinct values) and strided inputs; outputs poisoned so an unwritten slot shows. Without
CUDA the kernel runs under TRITON_INTERPRET=1 on small shapes; on CUDA also at decode shapes and
inside a CUDA graph.
"""
import os
from unittest import mock

import pytest
import torch
from hypothesis import given, strategies as st

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from shadowkv_fx.kernels import dispatch, naive, triton_topk  # noqa: E402
from tests.models import cuda_only, skip_unless_kernels_run_here  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
skip_unless_kernels_run_here(triton_topk.top_chunks_kernel)

# int32: segment_top_kernel's candidates; -7 is the key bits 0xFFFFFFF9, above every score's key: a candidate slot
# left unwritten is picked and shows
POISON = {torch.int64: -7, torch.uint8: 0xAB, torch.int32: -7}


def poisoned_scratch(*size, dtype, **kwargs):
    return torch.empty(*size, dtype=dtype, **kwargs).fill_(POISON[dtype])


def make_scores(gen: torch.Generator, b: int, hkv: int, c: int, *, dtype=torch.float32, masked=0.0,
                levels: int = 0, transposed: bool = False) -> torch.Tensor:
    """Random scores; ``masked`` of them ``-inf``; ``levels`` > 0 rounds them to that many values (ties)."""
    scores = torch.rand(b, hkv, c, generator=gen) + 0.01  # positive like softmax sums, never zero
    if levels:
        scores = (scores * levels).ceil() / levels
    scores = scores.masked_fill(torch.rand(b, hkv, c, generator=gen) < masked, float("-inf"))
    if b > 1:  # a sequence too short to compress: nothing selectable
        scores[-1, 0] = float("-inf")
    if transposed:  # same values, laid out [B, C, Hkv]
        scores = scores.transpose(1, 2).contiguous().transpose(1, 2)
    return scores.to(DEVICE, dtype)


def check_top_chunks(scores: torch.Tensor, k: int, **tiles) -> None:
    b, hkv, c = scores.shape
    with mock.patch.object(triton_topk, "_scratch", poisoned_scratch):
        idx, picked = triton_topk.top_chunks(scores, k, **tiles)
    _, ref_picked = naive.top_chunks(scores, k)
    what = f"b={b} hkv={hkv} c={c} k={k} {scores.dtype} {tiles}"
    assert idx.shape == picked.shape == (b, hkv, k) and idx.dtype == torch.int64 and picked.dtype == torch.bool, what
    assert picked.view(torch.uint8).le(1).all(), f"{what}: unwritten picked slots"
    assert idx.ge(0).all() and idx.lt(max(c, 1)).all(), f"{what}: indices out of range {idx.min()}..{idx.max()}"
    distinct = max(min(c, k), 1)  # slots beyond C repeat index 0
    for row in idx.flatten(0, 1):
        assert row.unique().numel() == distinct, f"{what}: repeated chunk in {row.sort().values.tolist()}"
    if c < k:
        assert torch.equal(picked.sum(-1), ref_picked.sum(-1)), what
        return
    # the picked scores, sorted, are torch.topk's values: the same set up to equal scores
    got = scores.gather(-1, idx).float().sort(dim=-1, descending=True).values
    expected = scores.topk(k, dim=-1).values.float()
    assert torch.equal(got, expected), f"{what}: picked scores differ in {(got != expected).sum()} slots"
    assert torch.equal(picked, torch.isfinite(scores.gather(-1, idx))), f"{what}: picked != isfinite"
    assert torch.equal(picked.sum(-1), ref_picked.sum(-1)), what


@given(seed=st.integers(0, 2**16), b=st.sampled_from([1, 3]), hkv=st.sampled_from([1, 2, 5]),
       c=st.sampled_from([1, 37, 300, 1000]), k=st.sampled_from([1, 8, 64, 300]),
       masked=st.sampled_from([0.0, 0.5, 0.97]), levels=st.sampled_from([0, 3]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), transposed=st.booleans())
def test_top_chunks_matches_reference(seed, b, hkv, c, k, masked, levels, dtype, transposed):
    gen = torch.Generator().manual_seed(seed)
    check_top_chunks(make_scores(gen, b, hkv, c, dtype=dtype, masked=masked, levels=levels, transposed=transposed), k)


@given(seed=st.integers(0, 2**16), c=st.sampled_from([1, 37, 300, 1000]), k=st.sampled_from([1, 8, 64, 300]),
       segments=st.sampled_from([2, 3, 8]), masked=st.sampled_from([0.0, 0.5, 0.97]), levels=st.sampled_from([0, 3]),
       transposed=st.booleans())
def test_segmented_top_chunks_matches_reference(seed, c, k, segments, masked, levels, transposed):
    """A row split over ``segments`` programs (each segment's top k, then the row's top k of those) picks the same
    set; where the split would not shrink the row the one-program kernel runs."""
    gen = torch.Generator().manual_seed(seed)
    check_top_chunks(make_scores(gen, 2, 3, c, masked=masked, levels=levels, transposed=transposed), k,
                     segments=segments)


def test_segmented_top_chunks_ties_and_the_last_short_segment():
    """The k-th score shared across segments, and a last segment shorter than the others (C = 1000 over 8 segments
    of 125, 7 of 128 lanes past C in the last), with the split taken (8 x 16 candidates < 1000)."""
    gen = torch.Generator().manual_seed(9)
    check_top_chunks(make_scores(gen, 2, 2, 1000, masked=0.3, levels=7), 16, segments=8)
    check_top_chunks(make_scores(gen, 2, 2, 1001, masked=0.0), 16, segments=8)
    check_top_chunks(torch.full((1, 2, 1000), 0.5, device=DEVICE), 16, segments=8)


def test_auto_segments_balances_the_two_stages():
    """``"auto"`` splits a row past ``split_above`` chunks where a segment's row and the candidates' row come out
    about as long (decode shapes: chunks of 8 at 32K, a fold's chunks past 4096, and at 122K; chunks of 4 at both),
    not rows of 4096 or where k is a quarter of the row or more, and picks the same set as the reference where it
    splits (C = 1024, k = 16, rows past 256 split: 8 segments)."""
    assert [triton_topk.auto_segments(c, k) for c, k in ((4096, 256), (4200, 256), (15360, 256), (8192, 512),
                                                         (30720, 512))] == [1, 4, 8, 4, 8]
    assert triton_topk.auto_segments(5000, 1300) == triton_topk.auto_segments(1024, 16) == 1
    with mock.patch.dict(triton_topk.GPU_TILES, split_above=256):
        assert triton_topk.auto_segments(1024, 16) == 8
        gen = torch.Generator().manual_seed(5)
        check_top_chunks(make_scores(gen, 1, 2, 1024, masked=0.2, levels=5), 16, segments="auto")


@pytest.mark.parametrize("c, k, masked", [
    (300, 64, 0.9),   # ~30 finite per row: every one of them, then -inf chunks, not picked
    (5, 8, 0.0),      # fewer chunks than k: padded slots, not picked
    (0, 4, 0.0),      # no chunks at all
    (257, 256, 0.0),  # one past a power of two
    (256, 256, 0.5),  # k = C: everything
])
def test_top_chunks_edge_rows(c, k, masked):
    gen = torch.Generator().manual_seed(c + k)
    check_top_chunks(make_scores(gen, 2, 3, c, masked=masked), k)


def test_top_chunks_all_equal_and_signed_scores():
    """Ties across the whole row, and negative scores and zeros (the key map's sign handling)."""
    gen = torch.Generator().manual_seed(3)
    check_top_chunks(torch.full((2, 2, 100), 0.25, device=DEVICE), 10)
    signed = torch.randn(2, 2, 200, generator=gen)
    signed[:, :, :20] = 0.0
    signed[:, :, 20:40] = -0.0
    check_top_chunks(signed.to(DEVICE), 50)


def test_top_chunks_many_ties_at_the_threshold():
    """Few distinct scores: the k-th largest is shared by many chunks, only some of them picked."""
    gen = torch.Generator().manual_seed(5)
    check_top_chunks(make_scores(gen, 2, 2, 500, masked=0.3, levels=7), 40)


def test_dispatch_uses_reference_off_gpu_and_k_zero():
    scores = torch.randn(2, 3, 50)
    idx, picked = dispatch.top_chunks(scores, 7)
    ref_idx, ref_picked = naive.top_chunks(scores, 7)
    assert torch.equal(idx, ref_idx) and torch.equal(picked, ref_picked)
    idx, picked = triton_topk.top_chunks(scores.to(DEVICE), 0)
    assert idx.shape == picked.shape == (2, 3, 0)
    with pytest.raises(ValueError, match="float"):
        triton_topk.top_chunks(torch.zeros(2, 3, 4, dtype=torch.int32, device=DEVICE), 2)


@cuda_only
@pytest.mark.parametrize("b, c", [(4, 4096), (16, 15616), (1, 16384)])
def test_top_chunks_decode_shapes_on_gpu(b, c):
    """Llama-3.1-8B at 32K and 122K: 8 KV heads, k = 256 (budget 2048 / chunk 8), outliers masked."""
    gen = torch.Generator().manual_seed(c)
    scores = make_scores(gen, b, 8, c, masked=0.01)
    probs = torch.softmax(torch.randn(b, 8, c, generator=gen) * 3, dim=-1).to(DEVICE)  # a real score's spread
    check_top_chunks(scores, 256)
    check_top_chunks(probs.masked_fill(scores.isinf(), float("-inf")), 256)
    # a dispatch on CUDA is the kernel, bit for bit
    idx, picked = dispatch.top_chunks(scores, 256)
    kidx, kpicked = triton_topk.top_chunks(scores, 256)
    assert torch.equal(idx, kidx) and torch.equal(picked, kpicked)


@cuda_only
@pytest.mark.parametrize("num_warps", [4, 8, 16, 32])
def test_top_chunks_every_swept_warp_count_on_gpu(num_warps):
    """kernel_bench --sweep-topk may pick any of these for GPU_TILES: each must stay exact."""
    gen = torch.Generator().manual_seed(num_warps)
    for c in (4096, 15616):
        check_top_chunks(make_scores(gen, 2, 8, c, masked=0.01, levels=1000), 256, num_warps=num_warps)


@cuda_only
@pytest.mark.parametrize("segments", [4, 16, 32, "auto"])
def test_segmented_top_chunks_decode_shapes_on_gpu(segments):
    """kernel_bench --sweep-topk's segment counts at the decode shapes, chunks of 8 and of 4 (the safeguard's)."""
    gen = torch.Generator().manual_seed(len(str(segments)))
    for b, c, k in ((4, 4096, 256), (1, 15360, 256), (1, 30720, 512)):
        check_top_chunks(make_scores(gen, b, 8, c, masked=0.01, levels=1000), k, segments=segments)


@cuda_only
def test_top_chunks_replays_in_cuda_graph():
    """No host sync: capture succeeds, and a replay picks for the scores written since."""
    gen = torch.Generator().manual_seed(11)
    scores = make_scores(gen, 4, 8, 4096, masked=0.01)
    triton_topk.top_chunks(scores, 256)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        idx, picked = triton_topk.top_chunks(scores, 256)
    scores.copy_(make_scores(gen, 4, 8, 4096, masked=0.5))
    graph.replay()
    torch.cuda.synchronize()
    got = scores.gather(-1, idx).sort(dim=-1, descending=True).values
    assert torch.equal(got, scores.topk(256, dim=-1).values)
    assert torch.equal(picked, torch.isfinite(scores.gather(-1, idx)))
