"""Per-layer diagnostics of ShadowKV's approximations, from one dense prefill (issue #32).

ShadowKV approximates twice: the pre-RoPE keys by a rank-``r`` factorisation, and each chunk of
``chunk_size`` keys by its mean (the landmark) when it picks the chunks a decode step attends. Tasks
that need much of the context at once suffer where either is poor. For each layer and KV head this
measures, on the unmodified model (no ShadowKV needed):

* ``rank_error``: ``||K - U SV|| / ||K||`` of the compressed prompt's pre-RoPE keys, with the same
  joint factorisation over heads as prefill (``kernels.compression.low_rank_keys``);
* ``landmark_entropy``: entropy of ``softmax(q . landmarks)`` over the selectable chunks, divided
  by its maximum ``log C`` (1 = flat: the landmarks cannot tell chunks apart), averaged over the
  query heads and the last ``queries`` prompt queries, and ``landmark_max_over_mean`` (1 = flat);
  ``exact_entropy`` is the same entropy of the exact attention mass per chunk, so a flat landmark
  score can be told from attention that is itself spread out;
* ``recall``: per query, the share of the ``k`` chunks holding most exact attention mass (summed
  over the KV head's query heads) that the landmark scores pick among their top ``k``, ``k`` being
  the budget's chunk count (``ShadowKVConfig.select_chunks``); ``mass_recall``: the exact mass of
  the picked chunks over that of the best ``k``; ``coverage``: the share of the exact attention
  (of the whole prompt, per query head) that the best ``k`` chunks with the dense tokens hold, what a
  selection as good as the best keeps at this budget (how concentrated the layer's attention is);
* ``landmark8_overlap``: the share of those ``k`` chunks that int8 landmarks (``landmark_bits=8``)
  pick as well, ``landmark8_same_set``: the share of queries whose whole pick is unchanged, and
  ``landmark8_mass_recall``: ``mass_recall`` of the int8 pick.

As in prefill, the last ``local_chunks`` chunks and the remainder stay dense and the
``outlier_chunks`` chunks whose keys agree least with their landmark are kept dense, so neither
is selectable. Queries are post-RoPE, scored as ``kernels.naive.score_chunks`` scores a decode step.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Sequence

import torch

from ..config import ShadowKVConfig
from ..kernels.compression import low_rank_keys
from ..kernels.quantize import dequantize, quantize
from ..selection_mass import best_chunks, chunk_mass, mass_recall, picked_chunks, prefill_selection

__all__ = ["layer_diagnostics", "chunk_diagnostics", "plot_diagnostics"]


def _normalised_entropy(p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Entropy of the distributions ``p [..., C]`` over the ``mask [..., C]`` entries, over ``log`` of their count."""
    p = torch.where(mask, p, 0.0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    return entropy / max(math.log(max(int(mask.sum(-1).max()), 2)), 1e-30)


@torch.no_grad()
def chunk_diagnostics(q_rot: torch.Tensor, k_pre: torch.Tensor, k_rot: torch.Tensor, config: ShadowKVConfig,
                      scale: float) -> list[dict]:
    """The diagnostics of one layer of one sequence, per KV head.

    Parameters
    ----------
    q_rot:
        ``[Hq, n, D]`` post-RoPE queries of the last ``n`` prompt positions.
    k_pre, k_rot:
        ``[Hkv, T, D]`` pre- and post-RoPE keys of the whole prompt.
    config:
        ``rank``, ``chunk_size``, ``local_chunks``, ``outlier_chunks`` and ``sparse_budget`` are used.
    scale:
        Attention scale (``1/sqrt(D)`` for most models).

    Returns
    -------
    list[dict]
        One row per KV head: ``kv_head``, ``tokens``, ``chunks``, ``outliers``, ``select_chunks``,
        ``rank``, ``rank_error``, ``landmark_entropy``, ``landmark_max_over_mean``,
        ``exact_entropy``, ``recall``, ``mass_recall``, ``coverage``, ``landmark8_overlap``, ``landmark8_same_set``,
        ``landmark8_mass_recall``, ``queries``.
    """
    hq, n, d = q_rot.shape
    hkv, t, _ = k_pre.shape
    if hq % hkv or k_rot.shape != k_pre.shape or n > t:
        raise ValueError(f"shapes do not fit: q_rot {tuple(q_rot.shape)}, k_pre {tuple(k_pre.shape)}, "
                         f"k_rot {tuple(k_rot.shape)} (need Hq a multiple of Hkv and n <= T)")
    size = config.chunk_size
    chunks = t // size - config.local_chunks
    if chunks <= config.outlier_chunks:
        raise ValueError(f"a {t}-token prompt has {max(chunks, 0)} compressible chunks of {size}, not more than "
                         f"outlier_chunks={config.outlier_chunks}: use a longer prompt or fewer outlier/local chunks")
    k_pre_c = k_pre[:, : chunks * size].float()
    u, sv = low_rank_keys(k_pre_c, config.rank)
    rebuilt = torch.einsum("tr,hrd->htd", u, sv)
    rank_error = (k_pre_c - rebuilt).flatten(1).norm(dim=1) / k_pre_c.flatten(1).norm(dim=1).clamp_min(1e-30)

    landmarks, selectable = prefill_selection(k_rot, config)
    k = config.select_chunks(chunks)
    # landmark probabilities per query head and query: [Hkv, G, n, C]; a decode step scores one query
    logits = torch.einsum("hgnd,hcd->hgnc", q_rot.float().view(hkv, hq // hkv, n, d), landmarks) * scale
    probs = torch.softmax(logits.masked_fill(~selectable[:, None, None], float("-inf")), dim=-1)
    picked = picked_chunks(q_rot, landmarks, selectable, k, scale)  # [Hkv, n, C]
    # the same pick from int8 landmarks (landmark_bits=8: one scale per chunk and KV head)
    codes, steps = quantize(landmarks, 1)
    picked8 = picked_chunks(q_rot, dequantize(codes, steps), selectable, k, scale)

    mass = chunk_mass(q_rot, k_rot, selectable, size, scale)  # exact causal attention of the last n queries
    best = best_chunks(mass, selectable, k)

    recall = (picked & best).sum(-1).float().mean(-1) / k
    # mass sums the group's query heads: each holds 1, of which the unpicked selectable chunks miss some
    coverage = 1.0 - (mass * ~best).sum(-1).mean(-1) / (hq // hkv)
    overlap8 = (picked & picked8).sum(-1).float().mean(-1) / k
    recall_mass, recall_mass8 = mass_recall(mass, picked, best), mass_recall(mass, picked8, best)
    same8 = (picked == picked8).all(-1).float().mean(-1)
    sel = selectable[:, None, None].expand_as(probs)
    flat = _normalised_entropy(probs, sel).mean(dim=(1, 2))
    max_over_mean = (probs.amax(-1) * selectable.sum(-1)[:, None, None]).mean(dim=(1, 2))
    exact = _normalised_entropy(mass, selectable[:, None].expand_as(mass)).mean(-1)
    return [
        {"kv_head": h, "tokens": t, "chunks": chunks, "outliers": config.outlier_chunks, "select_chunks": k,
         "rank": config.rank, "rank_error": float(rank_error[h]), "landmark_entropy": float(flat[h]),
         "landmark_max_over_mean": float(max_over_mean[h]), "exact_entropy": float(exact[h]),
         "recall": float(recall[h]), "mass_recall": float(recall_mass[h]), "coverage": float(coverage[h]),
         "landmark8_overlap": float(overlap8[h]),
         "landmark8_same_set": float(same8[h]), "landmark8_mass_recall": float(recall_mass8[h]), "queries": n}
        for h in range(hkv)
    ]


def _attention_modules(model) -> list:
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise TypeError(f"{type(model).__name__} has no model.layers[i].self_attn: layer_diagnostics reads the "
                        "attention inputs of Hugging Face decoder layers")
    return [layer.self_attn for layer in layers]


def _project(attn, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Pre-RoPE keys and post-RoPE queries and keys ``[H, T, D]`` of one attention module's input."""
    d = attn.head_dim
    shape = (*hidden.shape[:-1], -1, d)
    if hasattr(attn, "qkv_proj"):  # Phi-3: one fused projection
        qkv = attn.qkv_proj(hidden)
        q_width = attn.config.num_attention_heads * d
        q, k = qkv[..., :q_width], qkv[..., q_width : q_width + attn.config.num_key_value_heads * d]
    else:
        q, k = attn.q_proj(hidden), attn.k_proj(hidden)
    q, k = q.view(shape), k.view(shape)
    if hasattr(attn, "q_norm"):  # Qwen3: per-head norms before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    # the model's own RoPE (partial, interleaved or not), as its forward applies it
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    q_rot, k_rot = rope(q, k, cos, sin)
    return k[0], q_rot[0], k_rot[0]


@torch.no_grad()
def layer_diagnostics(model, input_ids: torch.Tensor, config: ShadowKVConfig = ShadowKVConfig(),
                      queries: int = 16) -> list[dict]:
    """Per layer and KV head: rank-``r`` key error, landmark flatness and chunk recall at the budget.

    One dense prefill of ``input_ids`` through the unmodified model; a forward pre-hook on each
    attention module recomputes its queries and keys (projections, norms and the model's RoPE)
    and measures them (:func:`chunk_diagnostics`) before the layer runs.

    Parameters
    ----------
    model:
        Hugging Face decoder (Llama, Mistral, Qwen2/3, Phi-3, GLM-4 and the like).
    input_ids:
        ``[1, T]`` prompt, longer than ``(local_chunks + outlier_chunks + 1) * chunk_size``.
    config:
        ShadowKV knobs to diagnose (``rank``, ``chunk_size``, ``sparse_budget`` ...).
    queries:
        Last prompt positions whose queries stand for the decode steps.

    Returns
    -------
    list[dict]
        :func:`chunk_diagnostics` rows with ``layer`` added, layer by layer.
    """
    if not isinstance(config, ShadowKVConfig):
        raise TypeError(f"config must be a ShadowKVConfig, got {type(config).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, T] (one sequence, no padding), got {tuple(input_ids.shape)}")
    t, size = input_ids.shape[1], config.chunk_size
    if t // size - config.local_chunks <= config.outlier_chunks:
        raise ValueError(f"a {t}-token prompt has {max(t // size - config.local_chunks, 0)} compressible chunks of "
                         f"{size}, not more than outlier_chunks={config.outlier_chunks}: use a longer prompt or "
                         "fewer outlier/local chunks")
    if not 1 <= queries <= t:
        raise ValueError(f"queries must be in [1, T={t}], got {queries}")
    rows: list[dict] = []
    handles = []

    def hook(index, attn):
        def measure(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            position = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
            if position is None:
                raise TypeError(f"{type(attn).__name__} got no position_embeddings (cos, sin): not a supported "
                                "Hugging Face attention module")
            k_pre, q_rot, k_rot = _project(attn, hidden, *position)
            scale = getattr(attn, "scaling", attn.head_dim ** -0.5)
            for row in chunk_diagnostics(q_rot[:, -queries:], k_pre, k_rot, config, scale):
                rows.append({"layer": index, **row})

        return measure

    for index, attn in enumerate(_attention_modules(model)):
        handles.append(attn.register_forward_pre_hook(hook(index, attn), with_kwargs=True))
    try:
        model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return rows


def plot_diagnostics(rows: Sequence[dict], path: str | Path) -> Path:
    """Three panels against the layer: rank error, landmark flatness, chunk recall; a line for the
    mean over KV heads, dots for each head.

    Returns
    -------
    Path
        ``path`` (PNG).
    """
    from .plots import _pyplot

    if not rows:
        raise ValueError("no diagnostics rows to plot")
    plt = _pyplot()
    layers = sorted({r["layer"] for r in rows})
    panels = [
        ("rank_error", [("rank_error", "rank-%d key error" % rows[0]["rank"])], "relative error"),
        ("flatness", [("landmark_entropy", "landmark scores"), ("exact_entropy", "exact attention mass")],
         "entropy / log(chunks)"),
        ("recall", [("recall", "chunk recall"), ("mass_recall", "attention-mass recall")], "at the budget"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for ax, (title, series, ylabel) in zip(axes, panels):
        for key, label in series:
            means = [sum(r[key] for r in rows if r["layer"] == layer) / sum(r["layer"] == layer for r in rows)
                     for layer in layers]
            line, = ax.plot(layers, means, marker="o", markersize=3, label=label)
            ax.scatter([r["layer"] for r in rows], [r[key] for r in rows], s=6, alpha=0.35, color=line.get_color())
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    first = rows[0]
    fig.suptitle(f"{first['tokens']} tokens, {first['chunks']} chunks, {first['select_chunks']} selected, "
                 f"{first['outliers']} outliers, last {first['queries']} queries", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
