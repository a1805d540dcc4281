"""The fused tail append (key RoPE + three writes) against the models' own RoPE functions.

The reference is Hugging Face's code (Llama's rotate-half, GLM-4's interleaved partial RoPE): in
16-bit dtypes the kernel must equal it bit for bit, since decode swaps one for the other only
where prefill saw them agree (bf16; fp16 and fp32 keep the model's function). Buffers start as NaN so an unwritten or misplaced row shows.
"""
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from transformers.models.glm4 import modeling_glm4  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

from shadowkv_fx.kernels import triton_append  # noqa: E402
from tests.models import assert_close, cuda_only, skip_unless_kernels_run_here  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
skip_unless_kernels_run_here(triton_append.append_rope_kernel)


def model_rope(form: str, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The model's own key RoPE: ``k [B, H, n, D]``, tables ``[B|1, 1, n, R]`` as the pass taps them."""
    module = modeling_llama if form == "rotate_half" else modeling_glm4
    _, k_rot = module.apply_rotary_pos_emb(k, k, cos[:, 0], sin[:, 0])
    return k_rot


def tables(gen, b: int, n: int, width: int, dtype, start: int = 5):
    """cos/sin the way the models build them: angles of positions ``start..`` in ``cat(freqs, freqs)``."""
    inv = 1.0 / (10000 ** (torch.arange(0, width, 2).float() / width))
    pos = start + torch.arange(n).float() + torch.randint(0, 1000, (b, 1), generator=gen).float()
    freqs = pos[..., None] * inv
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(device=DEVICE, dtype=dtype), emb.sin().to(device=DEVICE, dtype=dtype)


@settings(max_examples=8, deadline=None)
@given(form=st.sampled_from(["rotate_half", "interleaved"]), b=st.integers(1, 2), hkv=st.integers(1, 3),
       n=st.integers(1, 3), d=st.sampled_from([16, 24, 64]), partial=st.booleans(),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), fill=st.integers(0, 6),
       one_table=st.booleans(), seed=st.integers(0, 2**16))
def test_append_rotates_like_the_model_and_writes_at_the_fill_level(form, b, hkv, n, d, partial, dtype, fill,
                                                                     one_table, seed):
    gen = torch.Generator().manual_seed(seed)
    width = d // 2 if partial and form == "interleaved" else d  # partial RoPE is GLM's
    k_pre = torch.randn(b, hkv, n, d, generator=gen).to(device=DEVICE, dtype=dtype)
    v = torch.randn(b, hkv, n, d + 8, generator=gen).to(device=DEVICE, dtype=dtype)
    cos, sin = tables(gen, 1 if one_table else b, n, width, dtype)
    base, pre_base, slots = 3, 1, 16
    k_buf = torch.full((b, hkv, slots, d), float("nan"), dtype=dtype, device=DEVICE)
    v_buf = torch.full((b, hkv, slots, d + 8), float("nan"), dtype=dtype, device=DEVICE)
    pre = torch.full((b, hkv, slots, d), float("nan"), dtype=dtype, device=DEVICE)
    level = torch.tensor(fill, device=DEVICE)
    triton_append.append_rope(k_pre, v, cos, sin, form, k_buf, v_buf, level, base, pre, pre_base,
                              rounded=dtype == torch.bfloat16)
    expected = model_rope(form, k_pre, cos, sin)
    at = slice(base + fill, base + fill + n)
    if dtype == torch.bfloat16:
        assert torch.equal(k_buf[:, :, at], expected), "bf16 keys must equal the model's RoPE bit for bit"
    else:  # one rounding of a fused sum against eager's two: the last bit may differ (decode keeps
        # the model's function there: rotates_like_flag says no)
        tol = 1e-5 if dtype == torch.float32 else 3e-3
        assert_close(k_buf[:, :, at], expected, atol=tol, rtol=tol, what="rotated keys")
    assert torch.equal(v_buf[:, :, at], v) and torch.equal(pre[:, :, pre_base + fill : pre_base + fill + n], k_pre)
    for buf, written in ((k_buf, at), (v_buf, at), (pre, slice(pre_base + fill, pre_base + fill + n))):
        rest = torch.ones(slots, dtype=torch.bool)
        rest[written] = False
        assert buf[:, :, rest].isnan().all(), "no other slot is touched"


def test_rotates_like_refuses_a_rope_it_does_not_reproduce():
    gen = torch.Generator().manual_seed(3)
    k_pre = torch.randn(1, 2, 9, 32, generator=gen).to(device=DEVICE, dtype=torch.bfloat16)
    cos, sin = tables(gen, 1, 9, 32, torch.bfloat16)
    llama = model_rope("rotate_half", k_pre, cos, sin)
    assert triton_append.rotates_like_flag(k_pre, llama, cos, sin, "rotate_half")
    assert not triton_append.rotates_like_flag(k_pre, llama, cos, sin, "interleaved")
    # the same rotation computed in float32 and rounded once differs in the last bit somewhere
    upcast = model_rope("rotate_half", k_pre.float(), cos.float(), sin.float()).to(torch.bfloat16)
    assert not torch.equal(upcast, llama)
    assert not triton_append.rotates_like_flag(k_pre, upcast, cos, sin, "rotate_half")


@cuda_only
def test_fused_append_gives_the_tokens_of_the_models_own_rope(monkeypatch):
    """On the GPU, decode swaps the model's key RoPE for the fused kernel: same tokens, and the
    kernel did run (each layer saw that it reproduces the model)."""
    import copy

    import shadowkv_fx
    from shadowkv_fx.compat import output_cache
    from shadowkv_fx.kernels import dispatch
    from tests.models import tiny_pair

    _, model = tiny_pair("llama", head_dim=32, layers=2)
    model = model.to("cuda", torch.bfloat16)
    ids = torch.randint(3, 96, (2, 700), generator=torch.Generator().manual_seed(0)).cuda()
    config = shadowkv_fx.ShadowKVConfig(sparse_budget=64, rank=16, outlier_chunks=4, fold_chunks=2)

    def run():
        optimized = shadowkv_fx.optimize(copy.deepcopy(model), config)
        out = optimized.generate(ids, max_new_tokens=40, do_sample=False, return_dict_in_generate=True)
        states = [layer.state for layer in output_cache(out).layers]
        return out.sequences, [s.fused_append for s in states]

    fused_tokens, fused = run()
    monkeypatch.setattr(dispatch, "rotates_like_flag", lambda *a, **k: None)
    plain_tokens, plain = run()
    assert all(fused) and not any(plain)
    assert torch.equal(fused_tokens, plain_tokens)
