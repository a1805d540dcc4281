"""Properties of the plain-PyTorch kernels: the prefill compression and the naive twins (the ground
truth the Triton kernels are held to)."""
import pytest
import torch
from hypothesis import given, strategies as st

from shadowkv_fx.kernels import compression, naive
from tests.models import assert_close


def rope_half(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def cos_sin(positions, dim, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions.double()[..., None] * inv
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


@given(hkv=st.integers(1, 3), t=st.integers(2, 40), d=st.sampled_from([4, 6, 16]), seed=st.integers(0, 999))
def test_full_rank_rebuild_is_exact_and_truncation_error_is_the_svd_tail(hkv, t, d, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(hkv, t, d, generator=g, dtype=torch.float64).float()
    full = hkv * d
    u, sv = compression.low_rank_keys(k, full)
    idx = torch.arange(t).expand(1, hkv, t)
    rebuilt = naive.rebuild_keys(u[None], sv[None], idx)[0]
    assert_close(rebuilt, k, atol=1e-4, what="full-rank rebuild")
    rank = max(1, min(t, full) // 2)
    u_r, sv_r = compression.low_rank_keys(k, rank)
    err = (naive.rebuild_keys(u_r[None], sv_r[None], idx)[0] - k).flatten().norm()
    singular = torch.linalg.svdvals(k.permute(1, 0, 2).reshape(t, full).double())
    tail = singular[rank:].norm().float()
    assert torch.isclose(err, tail, rtol=1e-3, atol=1e-4), (err, tail)


@pytest.mark.parametrize("rows", [7, 4096])
def test_tall_keys_fit_in_row_blocks_like_one_svd(monkeypatch, rows):
    """Long prompts take the Gram route a block of rows at a time: the same fit as one SVD."""
    monkeypatch.setattr(compression, "GRAM_ROWS", rows)
    g = torch.Generator().manual_seed(rows)
    hkv, t, d, rank = 2, 101, 4, 5
    k = (torch.randn(hkv, t, 3, generator=g) @ torch.randn(3, d, generator=g)
         + 0.1 * torch.randn(hkv, t, d, generator=g))  # a few strong directions, as keys have
    u, sv = compression.low_rank_keys(k, rank)
    assert u.shape == (t, rank) and sv.shape == (hkv, rank, d)
    flat = k.permute(1, 0, 2).reshape(t, hkv * d).double()
    uu, s, vh = torch.linalg.svd(flat, full_matrices=False)
    best = (uu[:, :rank] * s[:rank]) @ vh[:rank]
    idx = torch.arange(t).expand(1, hkv, t)
    rebuilt = naive.rebuild_keys(u[None], sv[None], idx)[0].permute(1, 0, 2).reshape(t, hkv * d)
    assert_close(rebuilt, best.float(), atol=1e-4, what="rank-5 fit")


@pytest.mark.parametrize("strong", [3, 12])
def test_subspace_solver_fits_the_keys_about_as_well_as_the_full_eigh(monkeypatch, strong):
    """``EIGEN_SOLVER = "subspace"`` (the default) finds only the top ``rank + SUBSPACE_EXTRA`` eigenvectors: its basis
    has orthonormal U and a fit error within 2% of the optimal one; past W / 2 directions it is the full eigh."""
    g = torch.Generator().manual_seed(strong)
    hkv, t, d, rank = 4, 1200, 16, 8
    k = (torch.randn(hkv, t, strong, generator=g) @ torch.randn(strong, d, generator=g)
         + 0.05 * torch.randn(hkv, t, d, generator=g))
    flat = compression.flatten_keys(k)
    monkeypatch.setattr(compression, "EIGEN_SOLVER", "eigh")
    u_best, sv_best, err_best = compression.factor_keys(flat, hkv, rank)
    monkeypatch.setattr(compression, "EIGEN_SOLVER", "subspace")
    u, sv, err = compression.factor_keys(flat, hkv, rank)
    assert_close(u.T @ u, torch.eye(rank), atol=1e-4, what="U's columns orthonormal")
    assert err_best <= err <= err_best * 1.02 + 1e-6, (err, err_best)
    idx = torch.arange(t).expand(1, hkv, t)
    rebuilt = naive.rebuild_keys(u[None], sv[None], idx)[0]
    best = naive.rebuild_keys(u_best[None], sv_best[None], idx)[0]
    miss, best_miss = (rebuilt - k).norm(), (best - k).norm()  # the fit itself, not only the energy it reports
    assert best_miss <= miss <= best_miss * 1.02, (miss, best_miss)
    full = compression.factor_keys(flat, hkv, hkv * d - compression.SUBSPACE_EXTRA)  # too wide: the full eigh
    monkeypatch.setattr(compression, "EIGEN_SOLVER", "eigh")
    assert torch.equal(full[0], compression.factor_keys(flat, hkv, hkv * d - compression.SUBSPACE_EXTRA)[0])


@given(t=st.integers(1, 30), seed=st.integers(0, 999))
def test_rope_after_rebuild_equals_rope_before_truncation_at_full_rank(t, seed):
    g = torch.Generator().manual_seed(seed)
    hkv, d, s = 2, 8, 64
    k_pre = torch.randn(1, hkv, s, d, generator=g)
    cos, sin = (x.float()[None, None] for x in cos_sin(torch.arange(s), d))
    u, sv = compression.low_rank_keys(k_pre[0], hkv * d)
    token_idx = torch.randint(0, s, (1, hkv, t), generator=g)
    rebuilt = naive.rebuild_keys(u[None], sv[None], token_idx)
    after = rope_half(rebuilt, naive.gather_positions(cos, token_idx), naive.gather_positions(sin, token_idx))
    before = torch.gather(rope_half(k_pre, cos, sin), 2, token_idx[..., None].expand(-1, -1, -1, d))
    assert_close(after, before, atol=1e-4, what="RoPE after rebuild")


def test_score_chunks_matches_a_loop_and_masks_unselectable():
    g = torch.Generator().manual_seed(0)
    b, hkv, group, n, c, d = 2, 2, 3, 2, 7, 8
    q = torch.randn(b, hkv * group, n, d, generator=g)
    lm = torch.randn(b, hkv, c, d, generator=g)
    sel = torch.rand(b, hkv, c, generator=g) > 0.3
    sel[..., 0] = True
    scores = naive.score_chunks(q, lm, sel, 0.5)
    for bi in range(b):
        for h in range(hkv):
            best = torch.full((c,), float("-inf"))
            for gi in range(group):
                logits = q[bi, h * group + gi] @ lm[bi, h].T * 0.5
                logits[:, ~sel[bi, h]] = float("-inf")
                best = torch.maximum(best, logits.softmax(-1).sum(0))
            best[~sel[bi, h]] = float("-inf")
            assert_close(scores[bi, h], best, atol=1e-6, what=f"scores b={bi} h={h}")


def test_gathers_return_the_indexed_rows():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(2, 3, 5, 4, 6, generator=g)
    idx = torch.randint(0, 5, (2, 3, 2), generator=g)
    out = naive.gather_value_chunks(v, idx, torch.device("cpu"))
    for b in range(2):
        for h in range(3):
            expected = torch.cat([v[b, h, i] for i in idx[b, h]])
            assert torch.equal(out[b, h], expected)
    table = torch.randn(2, 1, 9, 4, generator=g)
    pos = torch.randint(0, 9, (2, 3, 5), generator=g)
    rows = naive.gather_positions(table, pos)
    assert torch.equal(rows[1, 2, 3], table[1, 0, pos[1, 2, 3]])


def test_landmarks_and_outlier_measure():
    k = torch.randn(2, 12, 4)
    k[0, 4:8] = torch.tensor([1.0, 0, 0, 0])
    landmarks, min_cos = compression.chunk_landmarks(k, 4)
    assert_close(landmarks, k.view(2, 3, 4, 4).mean(2), atol=1e-6, what="landmarks")
    assert_close(min_cos[0, 1], torch.tensor(1.0), atol=1e-5, what="identical tokens agree with their mean")
    assert (min_cos < 1.0 + 1e-5).all()


def test_masked_attention_equals_sdpa_on_the_allowed_subset():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 1, 8, generator=g)
    k = torch.randn(1, 2, 10, 8, generator=g)
    v = torch.randn(1, 2, 10, 8, generator=g)
    allowed = torch.zeros(1, 2, 1, 10, dtype=torch.bool)
    allowed[0, 0, 0, [1, 3, 4]] = True
    allowed[0, 1, 0, [0, 9]] = True
    out = naive.masked_attention(q, k, v, allowed, 0.3)
    for h in range(4):
        kv = h // 2
        keep = allowed[0, kv, 0]
        w = (q[0, h] @ k[0, kv, keep].T * 0.3).softmax(-1)
        assert_close(out[0, h], w @ v[0, kv, keep], atol=1e-6, what=f"head {h}")


@given(b=st.integers(1, 2), hkv=st.integers(1, 3), group=st.sampled_from([1, 2, 4]), n=st.integers(1, 3),
       keys=st.integers(1, 40), seed=st.integers(0, 999))
def test_grouped_attention_equals_the_head_repeating_reference(b, hkv, group, n, keys, seed):
    from shadowkv_fx.kernels.grouped_attention import grouped_masked_attention

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * group, n, 8, generator=g)
    k, v = torch.randn(2, b, hkv, keys, 8, generator=g)
    allowed = torch.rand(b, hkv, n, keys, generator=g) < 0.6
    allowed[..., 0] = True  # every row attends somewhere
    want = naive.masked_attention(q, k, v, allowed, 0.3)
    assert_close(grouped_masked_attention(q, k, v, allowed, 0.3), want, atol=1e-5, what="grouped attention")
    shared = allowed[:, :, :1]  # a mask broadcast over query rows, as the decode path builds it
    assert_close(grouped_masked_attention(q, k, v, shared, 0.3), naive.masked_attention(q, k, v, shared, 0.3),
                 atol=1e-5, what="broadcast mask")


class FormCheckedState:
    """What ``rope_detection.settle`` reads and sets on a layer's state."""

    def __init__(self, k_pre, k_rot, tables):
        from shadowkv_fx import rope_detection

        self.rope_pending, self.rope_form = rope_detection.measure(k_pre, k_rot, tables), None

    def take_rope_form(self, form, fused_append):
        self.rope_form, self.rope_pending = form, None


def detect_rope_form(k_pre, k_rot, tables):
    """The form prefill names for these keys: ``rope_detection.measure``, then ``settle``."""
    from shadowkv_fx import rope_detection

    state = FormCheckedState(k_pre, k_rot, tables)
    rope_detection.settle([state])
    return state.rope_form


@pytest.mark.parametrize("module, form", [("llama", "rotate_half"), ("glm4", "interleaved")])
def test_rope_form_is_recognised_from_the_models_own_rope(module, form):
    """Prefill names the RoPE form by reproducing the model's own output; anything else is generic."""
    import importlib

    from shadowkv_fx.kernels.rope_forms import apply_rope

    hf = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    g = torch.Generator().manual_seed(3)
    k = torch.randn(2, 3, 11, 16, generator=g)
    rotary = 16 if module == "llama" else 8  # GLM-4 rotates part of the head
    angles = torch.rand(2, 11, rotary // 2, generator=g) * 6
    freqs = torch.cat([angles, angles], dim=-1)
    cos, sin = freqs.cos()[:, None], freqs.sin()[:, None]
    _, k_rot = hf.apply_rotary_pos_emb(k, k, cos[:, 0], sin[:, 0])
    assert detect_rope_form(k, k_rot, [cos, sin]) == form
    assert_close(apply_rope(k, cos, sin, form), k_rot, atol=1e-5, what=f"{form} RoPE")
    assert detect_rope_form(k, k_rot * 1.01, [cos, sin]) == "generic"
    assert detect_rope_form(k, k_rot, [cos]) == "generic"


def test_a_long_prompts_form_check_reads_a_spread_of_positions_not_all(monkeypatch):
    """Past ``FORM_CHECK_POSITIONS`` the check reads evenly spread positions (a 122K prompt's keys in float32 would be
    0.5 GB a layer): the form is still named, a wrong rotation still is not, and no form sees more positions."""
    from shadowkv_fx.kernels import rope_forms

    g = torch.Generator().manual_seed(5)
    s = 3 * rope_forms.FORM_CHECK_POSITIONS + 7
    k = torch.randn(1, 2, s, 8, generator=g)
    angles = torch.arange(s, dtype=torch.float32)[:, None] * torch.tensor([1.0, 0.01, 1e-4, 1e-6])
    freqs = torch.cat([angles, angles], dim=-1)
    cos, sin = freqs.cos()[None, None], freqs.sin()[None, None]
    k_rot = rope_half(k, cos, sin)
    read = []
    plain = rope_forms.apply_rope
    monkeypatch.setattr(rope_forms, "apply_rope", lambda x, *rest: read.append(x.shape[-2]) or plain(x, *rest))
    assert detect_rope_form(k, k_rot, [cos, sin]) == "rotate_half"
    assert read and max(read) <= rope_forms.FORM_CHECK_POSITIONS
    assert detect_rope_form(k, rope_half(k, cos, -sin), [cos, sin]) == "generic"
