"""Per-layer diagnostics: the model's own q/k, exact answers on planted keys, the limits (full rank, full budget)."""
from __future__ import annotations

import math

import pytest
import torch

from shadowkv_fx.config import ShadowKVConfig
from shadowkv_fx.evaluation import diagnostics
from shadowkv_fx.evaluation.diagnostics import chunk_diagnostics, layer_diagnostics, plot_diagnostics
from tests.models import assert_close, full_rank, tiny_pair

T = 100  # 25 chunks of 4: 24 compressible, one local


def _config(**kw) -> ShadowKVConfig:
    base = dict(rank=8, chunk_size=4, local_chunks=1, outlier_chunks=2, sparse_budget=16)
    return ShadowKVConfig(**{**base, **kw})


def _ids(vocab: int = 96) -> torch.Tensor:
    return torch.randint(3, vocab, (1, T), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def llama():
    return tiny_pair("llama", peaked=True)[0]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
def test_recomputed_keys_are_the_keys_the_model_caches(arch):
    # A RoPE, norm or projection slip in the recomputation would make every diagnostic measure other keys.
    model = tiny_pair(arch)[0]
    ids = _ids()
    seen = {}

    def grab(index):
        def hook(module, args, kwargs):
            seen[index] = diagnostics._project(module, kwargs.get("hidden_states", args[0] if args else None),
                                               *kwargs["position_embeddings"])
        return hook

    handles = [layer.self_attn.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    for handle in handles:
        handle.remove()
    for i, (k_pre, q_rot, k_rot) in seen.items():
        assert_close(k_rot, cache.layers[i].keys[0], atol=1e-5, what=f"{arch} layer {i} post-RoPE keys")
        assert q_rot.shape[0] == model.config.num_attention_heads
        assert not torch.allclose(k_pre[:, 1:], k_rot[:, 1:])  # RoPE did rotate them


def test_full_rank_and_full_budget_are_exact(llama):
    chunks = T // 4 - 1
    config = _config(rank=full_rank(llama), outlier_chunks=0, sparse_budget=chunks * 4)
    rows = layer_diagnostics(llama, _ids(), config, queries=8)
    assert [(r["layer"], r["kv_head"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for row in rows:
        assert row["rank_error"] < 1e-4
        assert row["recall"] == 1.0 and row["mass_recall"] == pytest.approx(1.0)
        assert row["coverage"] == pytest.approx(1.0)  # every selectable chunk picked: nothing missed
        assert row["select_chunks"] == chunks == row["chunks"]
    assert not any(layer.self_attn._forward_pre_hooks for layer in llama.model.layers)  # hooks removed


def test_smaller_rank_and_budget_cost_accuracy(llama):
    ids = _ids()
    errors = [[r["rank_error"] for r in layer_diagnostics(llama, ids, _config(rank=rank), queries=4)] for rank in (2, 8, 24)]
    assert all(a > b > c for a, b, c in zip(*errors))
    rows = layer_diagnostics(llama, ids, _config(sparse_budget=4), queries=4)
    assert all(r["select_chunks"] == 1 for r in rows)
    wider = layer_diagnostics(llama, ids, _config(sparse_budget=16), queries=4)
    assert all(0.0 < a["coverage"] < b["coverage"] < 1.0 for a, b in zip(rows, wider))  # more chunks, less missed
    assert all(0.0 <= r["recall"] <= 1.0 and 0.0 <= r["mass_recall"] <= 1.0 + 1e-6 for r in rows)
    assert all(0.0 < r["landmark_entropy"] <= 1.0 + 1e-6 and r["landmark_max_over_mean"] >= 1.0 for r in rows)


def _planted(d: int = 8, chunks: int = 10, size: int = 4):
    """One KV head, every key ``0.5 e1`` plus: 2 e0 for chunk 3's four (its mean too), 3 e0 for two of
    chunk 6 and -3 e0 for its other two (mean without e0), small noise elsewhere; the last position's
    query is 10 e0."""
    g = torch.Generator().manual_seed(1)
    t = (chunks + 1) * size
    e0, e1 = torch.eye(d)[:2]
    keys = 0.5 * e1 + 0.01 * torch.randn(1, t, d, generator=g)
    keys[0, 3 * size : 4 * size] += 2 * e0
    keys[0, 6 * size : 7 * size : 2] += 3 * e0
    keys[0, 6 * size + 1 : 7 * size : 2] -= 3 * e0
    q = 0.01 * torch.randn(1, 1, d, generator=g)
    q[0, 0, 0] = 10.0
    return q, keys, 1 / math.sqrt(d)


def test_planted_chunk_the_landmark_mean_hides_is_missed():
    q, keys, scale = _planted()
    # Exact attention sits on chunk 6 (two keys at 3 e0 beat four at 2 e0); its landmark is ~0,
    # so the landmark scores pick chunk 3 at a one-chunk budget.
    row, = chunk_diagnostics(q, keys, keys, _config(outlier_chunks=0, sparse_budget=4), scale)
    assert row["recall"] == 0.0
    assert row["mass_recall"] < 0.2
    # Kept dense as an outlier (its tokens disagree most with its mean), chunk 6 leaves the choice
    # to chunk 3, which the landmarks find.
    row, = chunk_diagnostics(q, keys, keys, _config(outlier_chunks=1, sparse_budget=4), scale)
    assert row["recall"] == 1.0 and row["mass_recall"] == pytest.approx(1.0)
    assert row["landmark_max_over_mean"] > 5  # one chunk stands out: far from flat


def test_planted_rank_two_keys_have_the_known_rank_one_error():
    g = torch.Generator().manual_seed(2)
    basis, _ = torch.linalg.qr(torch.randn(44, 2, generator=g))
    directions, _ = torch.linalg.qr(torch.randn(8, 2, generator=g))
    keys = (basis * torch.tensor([3.0, 1.0])) @ directions.T  # singular values 3 and 1
    q = torch.randn(1, 1, 8, generator=g)
    rank1, = chunk_diagnostics(q, keys[None], keys[None], _config(rank=1, outlier_chunks=0), 0.35)
    rank2, = chunk_diagnostics(q, keys[None], keys[None], _config(rank=2, outlier_chunks=0), 0.35)
    # the keys are the compressible 40 rows of a 44-row rank-2 matrix: compare on those rows
    rows = keys[:40]
    s = torch.linalg.svdvals(rows)
    assert rank1["rank_error"] == pytest.approx(float(s[1] / s.norm()), rel=1e-3)
    assert rank2["rank_error"] < 1e-5


def test_bad_input_is_rejected(llama):
    with pytest.raises(ValueError, match="one sequence"):
        layer_diagnostics(llama, _ids().repeat(2, 1), _config())
    with pytest.raises(ValueError, match="longer prompt"):
        layer_diagnostics(llama, _ids()[:, :12], _config())
    with pytest.raises(TypeError, match="ShadowKVConfig"):
        layer_diagnostics(llama, _ids(), {"rank": 8})


def test_plot_writes_a_png(llama, tmp_path):
    rows = layer_diagnostics(llama, _ids(), _config(), queries=4)
    path = plot_diagnostics(rows, tmp_path / "diag.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        plot_diagnostics([], tmp_path / "empty.png")


def test_int8_landmarks_can_flip_a_near_tie_and_keep_a_clear_pick():
    """Chunk 1's key leads chunk 0's on the queried dim by 0.0005, less than int8's half step for
    either (their scales differ): int8 landmarks pick chunk 0 instead. A clear lead survives."""
    d, size = 8, 4

    def keys_of(first: list[float], second: list[float]) -> torch.Tensor:
        filler = torch.zeros(d)
        filler[0] = 0.1
        rows = [torch.tensor(first + [0.0] * (d - 2)), torch.tensor(second + [0.0] * (d - 2))] + [filler] * 4
        return torch.stack([r for r in rows for _ in range(size)])[None]  # [1, 6 chunks * size, d]

    q = torch.zeros(1, 1, d)
    q[0, 0, 1] = 1.0
    config = _config(outlier_chunks=0, sparse_budget=size)
    near = keys_of([1.0, 0.3035], [0.9, 0.3040])
    row, = chunk_diagnostics(q, near, near, config, 1.0)
    assert row["select_chunks"] == 1 and row["recall"] == 1.0  # the exact pick, chunk 1
    assert row["landmark8_overlap"] == 0.0 and row["landmark8_same_set"] == 0.0
    assert row["landmark8_mass_recall"] < row["mass_recall"] == pytest.approx(1.0)
    clear = keys_of([1.0, 0.2], [0.9, 0.3040])
    row, = chunk_diagnostics(q, clear, clear, config, 1.0)
    assert row["landmark8_overlap"] == 1.0 and row["landmark8_same_set"] == 1.0
