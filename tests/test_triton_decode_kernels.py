"""Decode-step Triton kernels (chunk scoring, key rebuild + RoPE) against their references.

Fresh random inputs per example, odd sizes (chunk counts and rebuilt-token counts that are not
multiples of a tile), outputs and scratch buffers poisoned with NaN so an unwritten element shows.
Without CUDA the kernels run under TRITON_INTERPRET=1 on small shapes; on CUDA the same tests run
on the GPU, plus Llama-3.1-8B-sized cases.
"""
import os
from unittest import mock

import pytest
import torch
from hypothesis import given, strategies as st

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from shadowkv_fx.kernels import naive, triton_rebuild, triton_score  # noqa: E402
from tests.models import assert_close, cuda_only, skip_unless_kernels_run_here  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
skip_unless_kernels_run_here(triton_score.score_logits_kernel)

# dtype and its tolerance, relative to the largest expected magnitude
DTYPES = [pytest.param(torch.float32, 1e-5, id="fp32"), pytest.param(torch.bfloat16, 1e-2, id="bf16")]


def nan_scratch(*size, **kwargs):
    return torch.empty(*size, **kwargs).fill_(float("nan"))


def rand(gen: torch.Generator, *shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


def check_scores(b, hkv, g, n, c, d, dtype, tol, seed, transposed_q=False, empty_rows=0):
    gen = torch.Generator().manual_seed(seed)
    if transposed_q:  # queries as the model leaves them: [B, n, Hq, D] viewed as [B, Hq, n, D]
        q = rand(gen, b, n, hkv * g, d, dtype=dtype).transpose(1, 2)
    else:
        q = rand(gen, b, hkv * g, n, d, dtype=dtype)
    landmarks = rand(gen, b, hkv, c, d, dtype=dtype)
    selectable = (torch.rand(b, hkv, c, generator=gen) > 0.2).to(DEVICE)
    selectable[:, :, 0] = c == 1  # an outlier chunk at the edge of the first tile
    selectable[b - empty_rows :] = False  # a sequence too short to compress: nothing selectable
    with mock.patch.object(triton_score, "_scratch", nan_scratch):
        scores = triton_score.score_chunks(q, landmarks, selectable, d ** -0.5)
    expected = naive.score_chunks(q, landmarks, selectable, d ** -0.5)
    assert scores.dtype == torch.float32 and not scores.isnan().any()
    assert torch.equal(torch.isinf(scores), ~selectable)
    assert_close(scores, expected, atol=tol * max(1e-3, expected.nan_to_num(0.0, 0.0, 0.0).abs().max().item()), rtol=tol,
                 what=f"scores b={b} hkv={hkv} g={g} n={n} c={c} d={d}")


@pytest.mark.parametrize("dtype, tol", DTYPES)
@given(seed=st.integers(0, 2**16), b=st.sampled_from([1, 3]), hkv=st.sampled_from([1, 2]),
       g=st.sampled_from([1, 2, 4]), n=st.sampled_from([1, 3]), c=st.sampled_from([1, 37, 300]),
       d=st.sampled_from([8, 16, 64]), transposed_q=st.booleans())
def test_score_chunks_matches_reference(dtype, tol, seed, b, hkv, g, n, c, d, transposed_q):
    check_scores(b, hkv, g, n, c, d, dtype, tol, seed, transposed_q, empty_rows=1 if b > 1 else 0)


def check_rebuild(b, hkv, n_chunks, l, k, r, d, form, rotary, dtype, tol, seed, out_mode="new", table_batch=None):
    gen = torch.Generator().manual_seed(seed)
    u = rand(gen, b, n_chunks * l, r, dtype=dtype)
    sv = rand(gen, b, hkv, r, d, dtype=dtype)
    chunk_idx = torch.randint(0, n_chunks, (b, hkv, k), generator=gen).to(DEVICE)
    pad = torch.randint(0, 2 * l, (b,), generator=gen).to(DEVICE)
    # tables a bit shorter than the last position sometimes: those rows clamp to the last one
    s = n_chunks * l + int(torch.randint(-l, 2 * l, (), generator=gen))
    angles = torch.rand(table_batch or b, 1, s, rotary // 2, generator=gen) * 6.3
    angles = torch.cat([angles, angles], dim=-1)  # cat(freqs, freqs), as HF rotary embeddings lay it out
    cos, sin = angles.cos().to(DEVICE, dtype), angles.sin().to(DEVICE, dtype)
    expected = naive.rebuild_rope_keys(u, sv, chunk_idx, l, pad, cos, sin, form, dtype=torch.float32)
    out_dtype = torch.float32 if out_mode == "fp32" else dtype
    if out_mode == "new":
        out = None
    elif out_mode == "slice":  # the rebuilt keys land inside a larger key buffer
        big = torch.full((b, hkv, k * l + 11, d + 8), float("nan"), dtype=dtype, device=DEVICE)
        out = big[:, :, 5 : 5 + k * l, 4 : 4 + d]
    else:
        out = torch.full((b, hkv, k * l, d), float("nan"), dtype=out_dtype, device=DEVICE)
    if out_mode == "new":
        with mock.patch.object(triton_rebuild, "_scratch", nan_scratch):
            keys = triton_rebuild.rebuild_rope_keys(u, sv, chunk_idx, l, pad, cos, sin, form)
    else:
        keys = triton_rebuild.rebuild_rope_keys(u, sv, chunk_idx, l, pad, cos, sin, form, out=out)
        assert keys is out
        if out_mode == "slice":
            assert big[:, :, :5].isnan().all() and big[:, :, 5 + k * l :].isnan().all()
            assert big[..., :4].isnan().all() and big[..., 4 + d :].isnan().all()
    assert keys.dtype == out_dtype and not keys.isnan().any()
    assert_close(keys, expected, atol=tol * expected.abs().max().item(), rtol=tol,
                 what=f"keys {form} R={rotary} b={b} hkv={hkv} k={k} L={l} r={r} d={d} out={out_mode}")


@pytest.mark.parametrize("dtype, tol", DTYPES)
@given(seed=st.integers(0, 2**16), b=st.sampled_from([1, 3]), hkv=st.sampled_from([1, 2]),
       l=st.sampled_from([4, 8]), k=st.integers(1, 9), r=st.sampled_from([8, 24]), d=st.sampled_from([16, 64]),
       form=st.sampled_from(["rotate_half", "interleaved", "none"]), partial=st.booleans(),
       out_mode=st.sampled_from(["new", "slice", "fp32", "nan"]), batch_one_table=st.booleans())
def test_rebuild_rope_keys_matches_reference(dtype, tol, seed, b, hkv, l, k, r, d, form, partial, out_mode,
                                              batch_one_table):
    rotary = d // 2 if partial and form != "none" else d
    check_rebuild(b, hkv, 11, l, k, r, d, form, rotary, dtype, tol, seed, out_mode,
                  table_batch=1 if batch_one_table else b)


@pytest.mark.parametrize("arch, form", [("llama", "rotate_half"), ("glm4", "interleaved")])
def test_naive_rebuild_rotates_as_hf_does(arch, form):
    """The naive twin's rotation is the model's: checked against transformers' own apply_rotary_pos_emb."""
    modeling = pytest.importorskip(f"transformers.models.{arch}.modeling_{arch}")
    gen = torch.Generator().manual_seed(1)
    b, hkv, n_chunks, l, r, d = 2, 2, 5, 4, 8, 16
    rotary = d // 2 if arch == "glm4" else d  # GLM-4 rotates half the head dims
    u, sv = torch.randn(b, n_chunks * l, r, generator=gen), torch.randn(b, hkv, r, d, generator=gen)
    pad = torch.tensor([0, 3])
    s = n_chunks * l + 3
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary, 2).float() / rotary)
    freqs = torch.arange(s).float()[:, None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1).expand(b, 1, s, rotary)
    cos, sin = emb.cos(), emb.sin()
    every = torch.arange(n_chunks).expand(b, hkv, n_chunks)
    ours = naive.rebuild_rope_keys(u, sv, every, l, pad, cos, sin, form)
    k_pre = naive.rebuild_rope_keys(u, sv, every, l, pad, cos, sin, "none")
    theirs = torch.stack([
        modeling.apply_rotary_pos_emb(k_pre[i : i + 1], k_pre[i : i + 1], cos[i, :, pad[i] : pad[i] + n_chunks * l],
                                      sin[i, :, pad[i] : pad[i] + n_chunks * l])[1][0]
        for i in range(b)
    ])
    assert_close(ours, theirs, atol=1e-5, what=arch)


def test_rebuild_rejects_unknown_rope_form():
    u, sv = torch.randn(1, 8, 8), torch.randn(1, 1, 8, 16)
    idx = torch.zeros(1, 1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="rope_form"):
        triton_rebuild.rebuild_rope_keys(u, sv, idx, 8, [0], u, u, "yarn")


@cuda_only
@pytest.mark.parametrize("n", [1, 4])
def test_score_chunks_llama8b_shapes_on_gpu(n):
    check_scores(4, 8, 4, n, 4096, 128, torch.bfloat16, 1e-2, seed=n, transposed_q=True, empty_rows=1)


@cuda_only
@pytest.mark.parametrize("form, rotary", [("rotate_half", 128), ("none", 128), ("interleaved", 64)])
@pytest.mark.parametrize("out_mode", ["new", "slice"])
def test_rebuild_rope_keys_llama8b_shapes_on_gpu(form, rotary, out_mode):
    check_rebuild(4, 8, 4096, 8, 256, 160, 128, form, rotary, torch.bfloat16, 1e-2, seed=7, out_mode=out_mode)
