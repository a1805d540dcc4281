"""8-bit values and landmarks (#26): the quantise/dequantise round trip, the knobs, and the
dequantising gather and int8 scoring kernels against their twins (TRITON_INTERPRET=1 on CPU)."""
import os
from unittest import mock

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

import shadowkv_fx  # noqa: E402
from shadowkv_fx.kernels import naive, quantize, triton_gather, triton_score, value_reuse  # noqa: E402
from tests.models import assert_close, cuda_only, skip_unless_kernels_run_here  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
skip_unless_kernels_run_here(triton_gather.gather_chunks_kernel)


@settings(deadline=None, max_examples=60)
@given(seed=st.integers(0, 2**16), lead=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       inner=st.lists(st.integers(1, 17), min_size=1, max_size=2), magnitude=st.sampled_from([1e-30, 1e-3, 1.0, 3e4]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), zero_group=st.booleans())
@example(seed=0, lead=[1], inner=[1], magnitude=1.0, dtype=torch.float32, zero_group=True)  # an all-zero group
@example(seed=1, lead=[3, 2], inner=[8, 16], magnitude=1.0, dtype=torch.bfloat16, zero_group=False)  # value chunks
def test_round_trip_error_is_at_most_half_a_scale_step(seed, lead, inner, magnitude, dtype, zero_group):
    """|x - q * scale| <= scale / 2 per element (up to float32 rounding of one divide and one
    multiply: 2**-22 of |x|), codes in [-127, 127], and the scale is the group's absmax / 127."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, *inner, generator=gen) * magnitude).to(dtype)
    if zero_group:
        x.view(-1, *inner)[0] = 0
    q, scale = quantize.quantize(x, len(inner))
    assert q.dtype == torch.int8 and q.shape == x.shape and scale.shape == tuple(lead)
    assert q.abs().max() <= quantize.QMAX
    xf = x.float()
    assert torch.equal(scale, xf.abs().amax(dim=tuple(range(len(lead), x.dim()))) / quantize.QMAX)
    back = quantize.dequantize(q, scale)
    bound = scale.reshape(*lead, *([1] * len(inner))) / 2 + xf.abs() * 2**-22
    err = (xf - back).abs()
    assert (err <= bound).all(), f"max error over bound {(err - bound).max().item():.3e}"
    if zero_group:
        assert scale.view(-1)[0] == 0 and (back.view(-1, *inner)[0] == 0).all()
    # the largest element of each non-zero group is hit exactly: it maps to +-127
    assert (q.reshape(*lead, -1).abs().amax(-1) == quantize.QMAX).eq(scale > 0).all()


def test_quantize_rejects_a_bad_group():
    with pytest.raises(ValueError, match="dims must be in 1..2"):
        quantize.quantize(torch.ones(2, 3), 3)


@pytest.mark.parametrize("name", ["value_bits", "landmark_bits"])
@pytest.mark.parametrize("bad", [4, 32, 16.0, True, "8"])
def test_bits_knobs_accept_16_or_8_only(name, bad):
    assert getattr(shadowkv_fx.ShadowKVConfig(**{name: 8}), name) == 8
    with pytest.raises(ValueError, match=f"ShadowKVConfig.{name} must be 16 .* or 8"):
        shadowkv_fx.ShadowKVConfig(**{name: bad})


def int8_store(gen, b, hkv, c, l, d):
    codes, scales = quantize.quantize(torch.randn(b, hkv, c, l, d, generator=gen) * 3, 2)
    if DEVICE.type == "cuda":
        codes = codes.pin_memory()
    return codes, scales.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b, hkv, c, l, d, k", [(1, 1, 3, 8, 16, 2), (2, 3, 7, 4, 60, 5), (3, 2, 33, 8, 24, 9)])
def test_dequantising_gather_matches_its_twin(dtype, b, hkv, c, l, d, k):
    check_dequantising_gather(dtype, b, hkv, c, l, d, k)


def check_dequantising_gather(dtype, b, hkv, c, l, d, k):
    """The kernel multiplies in float32 and rounds once to ``out``'s dtype, as the twin does: equal
    bits (in bf16 within one unit of the last place under the CPU interpreter, whose float32 to
    bf16 conversion truncates where a GPU rounds to nearest)."""
    gen = torch.Generator().manual_seed(b * 100 + c)
    codes, scales = int8_store(gen, b, hkv, c, l, d)
    idx = torch.stack([torch.randperm(c, generator=gen)[:k] for _ in range(b * hkv)]).view(b, hkv, k).to(DEVICE)
    out = torch.full((b, hkv, k * l, d), float("nan"), dtype=dtype, device=DEVICE)
    triton_gather.gather_value_chunks(codes, idx, DEVICE, out, None, scales)
    expected = naive.gather_value_chunks(codes, idx, DEVICE, scales)
    assert expected.dtype == torch.float32
    if dtype == torch.float32 or DEVICE.type == "cuda":
        assert torch.equal(out, expected.to(dtype))
    else:
        assert_close(out, expected, atol=0, rtol=2**-7, what="bf16 within one ulp")
    plain = naive.gather_value_chunks(codes, idx, DEVICE).float()  # the codes, undequantised
    scale_of = torch.gather(scales, 2, idx).repeat_interleave(l, dim=-1)[..., None]
    assert_close(out, plain * scale_of, atol=0, rtol=1e-2 if dtype == torch.bfloat16 else 0, what="code * scale")
    default = triton_gather.gather_value_chunks(codes, idx, DEVICE, scales=scales)
    assert default.dtype == torch.float32 and torch.equal(default, expected)


@pytest.mark.parametrize("b, hkv, c, l, d, k", [(1, 1, 9, 8, 16, 4), (2, 3, 17, 4, 60, 6)])
def test_dequantising_gather_writes_only_the_chunks_to_fetch(b, hkv, c, l, d, k):
    gen = torch.Generator().manual_seed(c + k)
    codes, scales = int8_store(gen, b, hkv, c, l, d)
    prev_idx = torch.stack([torch.randperm(c, generator=gen)[:k] for _ in range(b * hkv)]).view(b, hkv, k)
    idx = torch.stack([torch.randperm(c, generator=gen)[:k] for _ in range(b * hkv)]).view(b, hkv, k)
    slot_idx, _, fetch = value_reuse.stable_slots(idx, torch.ones_like(idx, dtype=torch.bool), prev_idx)
    assert fetch.any() and (~fetch).any(), "the case must mix hits and misses"
    old = torch.full((b, hkv, k * l, d), 100.0, dtype=torch.bfloat16, device=DEVICE)  # far above any value
    out = old.clone()
    triton_gather.gather_value_chunks(codes, slot_idx.to(DEVICE), DEVICE, out, fetch.to(DEVICE), scales)
    expected = naive.gather_fetching(codes, slot_idx, fetch, old.cpu().clone(), scales.cpu())
    assert_close(out.cpu(), expected, atol=0, rtol=0 if DEVICE.type == "cuda" else 2**-7, what="fetched chunks")
    kept = ~fetch.repeat_interleave(l, dim=-1)
    assert (out.cpu()[kept] == 100).all() and (out.cpu()[~kept] != 100).all()


def test_gather_rejects_scales_beside_float_values():
    with pytest.raises(ValueError, match="scales must be a float32"):
        triton_gather.gather_value_chunks(torch.zeros(1, 1, 3, 4, 8), torch.zeros(1, 1, 2, dtype=torch.long), DEVICE,
                                          scales=torch.ones(1, 1, 3, device=DEVICE))


def nan_scratch(*size, **kwargs):
    return torch.empty(*size, **kwargs).fill_(float("nan"))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@settings(deadline=None, max_examples=8)
@given(seed=st.integers(0, 2**16), b=st.sampled_from([1, 3]), hkv=st.sampled_from([1, 2]),
       g=st.sampled_from([1, 2, 4]), n=st.sampled_from([1, 3]), c=st.sampled_from([1, 37, 130]),
       d=st.sampled_from([16, 60]))
@example(seed=3, b=3, hkv=2, g=4, n=1, c=37, d=60)  # GQA, an odd head dim and chunk count
def test_int8_landmark_scores_match_their_twin(dtype, tol, seed, b, hkv, g, n, c, d):
    check_int8_scores(b, hkv, g, n, c, d, dtype, tol, seed)


def check_int8_scores(b, hkv, g, n, c, d, dtype, tol, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * g, n, d, generator=gen).to(DEVICE, dtype)
    landmarks = torch.randn(b, hkv, c, d, generator=gen) * torch.rand(b, hkv, c, 1, generator=gen) * 4
    codes, scales = (t.to(DEVICE) for t in quantize.quantize(landmarks, 1))
    selectable = (torch.rand(b, hkv, c, generator=gen) > 0.2).to(DEVICE)
    with mock.patch.object(triton_score, "_scratch", nan_scratch):
        scores = triton_score.score_chunks(q, codes, selectable, d ** -0.5, scales)
    expected = naive.score_chunks(q, codes, selectable, d ** -0.5, scales)
    assert torch.equal(torch.isinf(scores), ~selectable) and not scores.isnan().any()
    assert_close(scores, expected, atol=tol * max(1e-3, expected.nan_to_num(0.0, 0.0, 0.0).abs().max().item()),
                 rtol=tol, what=f"int8 scores b={b} hkv={hkv} g={g} n={n} c={c} d={d}")
    # the twin's scaled dot is the dot with the dequantised landmarks
    dequantised = naive.score_chunks(q.float(), quantize.dequantize(codes, scales), selectable, d ** -0.5)
    assert_close(expected, dequantised, atol=1e-5, rtol=1e-5, what="scale after the dot")


def test_score_rejects_int8_landmarks_without_float_scales():
    q, codes = torch.zeros(1, 2, 1, 16, device=DEVICE), torch.zeros(1, 1, 5, 16, dtype=torch.int8, device=DEVICE)
    selectable = torch.ones(1, 1, 5, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="must share one float dtype"):
        triton_score.score_chunks(q, codes, selectable, 0.25)
    with pytest.raises(ValueError, match="landmark_scale must be a float32"):
        triton_score.score_chunks(q, codes, selectable, 0.25, torch.ones(1, 1, 5, dtype=torch.float16, device=DEVICE))


@cuda_only
def test_dequantising_gather_llama8b_shapes_on_gpu():
    """122K tokens of one KV head group (15360 chunks of 8 x 128), 256 chunks fetched, from pinned memory."""
    check_dequantising_gather(torch.bfloat16, 1, 8, 15360, 8, 128, 256)


@cuda_only
@pytest.mark.parametrize("n", [1, 4])
def test_int8_landmark_scores_llama8b_shapes_on_gpu(n):
    check_int8_scores(4, 8, 4, n, 15360, 128, torch.bfloat16, 1e-2, seed=n)
