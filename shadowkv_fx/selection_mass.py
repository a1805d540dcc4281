"""How well a prompt's landmarks choose its chunks: the pick a decode step would make for each of
the prompt's last queries, against the chunks that hold the most of their exact attention mass.

One computation for both places that measure it: the dense fallback's prefill check
(``dense_fallback.selection_recall``, behind ``ShadowKVConfig.dense_fallback_recall``) and the
diagnostics (``evaluation.diagnostics.chunk_diagnostics``). As in prefill, the last ``local_chunks``
chunks and the remainder stay dense and the ``outlier_chunks`` chunks whose keys agree least with
their landmark are kept dense, so neither is selectable; queries are post-RoPE and scored as
``kernels.naive.score_chunks`` scores a decode step.
"""
from __future__ import annotations

import torch

from shadowkv_fx.config import ShadowKVConfig
from shadowkv_fx.kernels.compression import chunk_landmarks, least_agreeing_chunks
from shadowkv_fx.kernels.naive import score_chunks


def prefill_selection(k_rot: torch.Tensor, config: ShadowKVConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The landmarks ``[Hkv, C, D]`` (float32) of a prompt's keys ``k_rot [Hkv, T, D]`` and which of
    its ``C`` compressible chunks a decode step may select ``[Hkv, C]``, as prefill builds them."""
    size = config.chunk_size
    chunks = k_rot.shape[1] // size - config.local_chunks
    landmarks, min_cos = chunk_landmarks(k_rot[:, : chunks * size].float(), size)
    selectable = torch.ones(k_rot.shape[0], chunks, dtype=torch.bool, device=k_rot.device)
    if config.outlier_chunks:
        selectable.scatter_(1, least_agreeing_chunks(min_cos, config.outlier_chunks), False)
    return landmarks, selectable


def top_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` highest entries of ``scores [..., C]``."""
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(k, dim=-1).indices, True)


def picked_chunks(q: torch.Tensor, landmarks: torch.Tensor, selectable: torch.Tensor, k: int,
                  scale: float) -> torch.Tensor:
    """``[Hkv, n, C]``: the ``k`` chunks a decode step picks for each query of ``q [Hq, n, D]``,
    each scored alone (``score_chunks``, the query heads of a KV head summed as the kernel does)."""
    hq, n, d = q.shape
    one_query = q.float().view(landmarks.shape[0], hq // landmarks.shape[0], n, d).permute(2, 0, 1, 3).reshape(
        n, hq, 1, d)
    scores = score_chunks(one_query, landmarks.expand(n, -1, -1, -1), selectable.expand(n, -1, -1), scale)
    return top_mask(scores, k).permute(1, 0, 2)


def chunk_mass(q: torch.Tensor, k_rot: torch.Tensor, selectable: torch.Tensor, chunk_size: int,
               scale: float) -> torch.Tensor:
    """``[Hkv, n, C]``: the exact causal attention of each of the prompt's last queries ``q [Hq, n, D]``
    over its keys ``k_rot [Hkv, T, D]``, summed over a KV head's query heads, per selectable chunk
    (0 where a chunk is not selectable). One KV head at a time: ``Hq/Hkv * n * T`` floats at once."""
    hkv, t, d = k_rot.shape
    n, chunks = q.shape[1], selectable.shape[1]
    grouped = q.float().view(hkv, -1, n, d)
    future = torch.arange(t, device=k_rot.device) > torch.arange(t - n, t, device=k_rot.device)[:, None]  # [n, T]
    mass = []
    for h in range(hkv):
        weights = torch.softmax((grouped[h] @ k_rot[h].float().T * scale).masked_fill(future, float("-inf")), -1)
        mass.append(weights[..., : chunks * chunk_size].reshape(-1, n, chunks, chunk_size).sum(dim=(0, 3)))
    return torch.stack(mass).masked_fill(~selectable[:, None], 0.0)


def best_chunks(mass: torch.Tensor, selectable: torch.Tensor, k: int) -> torch.Tensor:
    """``[Hkv, n, C]``: the ``k`` selectable chunks holding the most of each query's ``mass``."""
    return top_mask(mass.masked_fill(~selectable[:, None], -1.0), k)


def mass_recall(mass: torch.Tensor, picked: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """``[Hkv]``: the mass of the ``picked`` chunks over that of the ``best``, averaged over the queries."""
    return ((mass * picked).sum(-1) / (mass * best).sum(-1).clamp_min(1e-30)).mean(-1)
