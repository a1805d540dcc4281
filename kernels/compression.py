"""Prefill compression of one sequence's keys: the low-rank factors, the chunks and their landmarks.

What prefill (``LayerState.add_rows``) and folding (``fold.py``) compute once per prompt or fold,
in plain PyTorch on any device: one SVD and a few reductions, not a per-step kernel.

Shapes: ``Hkv`` key-value heads, ``T`` tokens, ``C`` chunks, ``L`` chunk size, ``r`` rank,
``D`` head dim.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from shadowkv_fx.kernels import key_codes


def chunk_tokens(chunk_idx: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Token indices of chunks: ``[..., k]`` chunk ids -> ``[..., k * chunk_size]`` token ids."""
    offsets = torch.arange(chunk_size, device=chunk_idx.device)
    return (chunk_idx[..., None] * chunk_size + offsets).flatten(-2)


# rows of the keys in float64 at a time while the Gram matrix and U are formed (32 MiB at W = 1024)
GRAM_ROWS = 4096
# how the Gram matrix's top eigenvectors are found: "subspace" (subspace iteration for the top rank + SUBSPACE_EXTRA,
# where that is at most W / 2; within 0.6% of the optimal fit error on SmolLM2's keys) or "eigh" (all W of them).
# On the H100 at W = 1024 (8B shape) the fp64 eigh takes 11.9 ms a layer, the subspace route 4.7 (fp32 eigh: 11.9):
# a 32K prefill 1.64 s against 1.45, dense 1.36 (benchmarks/RESULTS.md, "Prefill at batch")
EIGEN_SOLVER = "subspace"
SUBSPACE_EXTRA, SUBSPACE_ROUNDS = 16, 3


def low_rank_keys(k_pre: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of one sequence's pre-RoPE keys, in float32.

    Args:
        k_pre: ``[Hkv, T, D]``.
    Returns:
        ``U [T, rank]`` and ``SV [Hkv, rank, D]`` (``diag(s) V^T``) with ``U @ SV[h] ~= k_pre[h]``;
        zero-padded when ``min(T, Hkv*D) < rank``.
    """
    u, sv, _ = factor_keys(flatten_keys(k_pre), k_pre.shape[0], rank)
    return u, sv


def flatten_keys(k_pre: torch.Tensor) -> torch.Tensor:
    """``[Hkv, T, D]`` keys as a new ``[T, Hkv*D]`` matrix (a copy: the heads side by side)."""
    hkv, t, d = k_pre.shape
    flat = k_pre.new_empty(t, hkv * d)
    flat.view(t, hkv, d).copy_(k_pre.permute(1, 0, 2))
    return flat


def factor_keys(flat: torch.Tensor, hkv: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``low_rank_keys`` of ``flatten_keys``' matrix, and the fit error: the share of the keys' norm that
    the rank-``rank`` basis misses (0-d float32). ``torch.linalg`` reads a status back from the device here:
    prefill runs this off its compute stream and thread (``key_basis.py``)."""
    t, w = flat.shape
    if t > 4 * w:
        u_r, s, vh, energy = _tall_svd(flat, rank)
    else:
        flat32 = flat.float()
        u, s, vh = torch.linalg.svd(flat32, full_matrices=False)
        u_r = u.new_zeros(t, rank)
        u_r[:, : min(rank, s.numel())] = u[:, :rank]
        energy = flat32.square().sum()
    kept = min(rank, s.numel())
    sv = u_r.new_zeros(rank, w)
    sv[:kept] = s[:kept, None] * vh[:kept]
    # U's columns are orthonormal, so what SV misses of the keys' energy is the fit error
    fit_err = (1 - sv.square().sum() / energy.clamp_min(1e-30)).clamp_min(0).sqrt()
    return u_r, sv.view(rank, hkv, w // hkv).permute(1, 0, 2).contiguous(), fit_err


def _tall_svd(flat: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of a tall ``[T, W]`` matrix through its ``W x W`` Gram matrix, in float64.

    Long prompts make ``T`` 100x ``W``; the Gram route costs one GEMM and a small eigh instead of
    a tall gesvd. Components below float32 resolution are dropped (their U columns stay zero).
    The rows go through float64 ``GRAM_ROWS`` at a time and only the first ``rank`` columns of U
    are formed: a whole float64 copy of a 122K-token prompt's keys and its full-width U would
    add ~3 GiB to the prefill working set.

    Returns ``U [T, rank]`` (float32), the singular values ``[W]`` and ``V^T [W, W]`` (with the subspace solver
    only the top ``rank + SUBSPACE_EXTRA`` of them), and the keys' energy (the Gram matrix's trace, float32).
    """
    t, w = flat.shape
    gram = flat.new_zeros(w, w, dtype=torch.float64)
    for start in range(0, t, GRAM_ROWS):
        block = flat[start : start + GRAM_ROWS].double()
        gram += block.T @ block
    eigvals, v = _top_eigenpairs(gram, rank)
    order = eigvals.clamp_min(0).sqrt()
    r = min(rank, w)
    # a mask, not a count: reading how many components survive would be a host sync per layer
    inverse = torch.where(order[:r] > order[0] * 1e-7, 1 / order[:r].clamp_min(1e-300), 0.0)
    u = flat.new_zeros(t, rank, dtype=torch.float32)
    for start in range(0, t, GRAM_ROWS):
        block = flat[start : start + GRAM_ROWS].double()
        u[start : start + GRAM_ROWS, :r] = (block @ v[:, :r] * inverse).float()
    return u, order.float(), v.T.float(), gram.trace().float()


def _top_eigenpairs(gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues of a symmetric PSD ``gram [W, W]``, largest first, and their eigenvectors as columns: all W,
    or (``EIGEN_SOLVER == "subspace"``) the top ``rank + SUBSPACE_EXTRA`` by subspace iteration."""
    w = gram.shape[0]
    width = rank + SUBSPACE_EXTRA
    if EIGEN_SOLVER == "eigh" or 2 * width > w:
        eigvals, eigvecs = torch.linalg.eigh(gram)
        return eigvals.flip(0), eigvecs.flip(1)
    basis = _fixed_start(w, width, gram.device)
    for _ in range(SUBSPACE_ROUNDS):
        basis = torch.linalg.qr(gram @ basis)[0]
    eigvals, rotation = torch.linalg.eigh(basis.T @ gram @ basis)  # Rayleigh-Ritz in the subspace
    return eigvals.flip(0), (basis @ rotation).flip(1)


def _fixed_start(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """A ``[rows, cols]`` float64 matrix of scattered values in (-1, 1), the same on every device (no random
    generator, no host copy): the subspace iteration gives the same basis for the same keys on a CPU and a GPU."""
    n = torch.arange(rows * cols, device=device, dtype=torch.float64).view(rows, cols)
    return (torch.sin(n * 12.9898 + 78.233) * 43758.5453).frac()


def chunk_landmarks(k_rot: torch.Tensor, chunk_size: int, runs: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk mean of post-RoPE keys (or of each of its ``runs`` runs) and each chunk's worst
    token agreement with its mean.

    Args:
        k_rot: ``[Hkv, C*L, D]``.
        runs: landmarks per chunk (``ShadowKVConfig.landmark_runs``), dividing ``chunk_size``.
    Returns:
        ``landmarks [Hkv, C, runs*D]`` (a chunk's run means side by side) and ``min_cosine [Hkv, C]``
        (lowest cosine similarity between a chunk's mean and its tokens: low means the mean represents
        the chunk badly).
    """
    hkv, t, d = k_rot.shape
    chunks = k_rot.float().view(hkv, t // chunk_size, chunk_size, d)
    mean = chunks.mean(dim=2)
    cosine = torch.nn.functional.cosine_similarity(chunks, mean.unsqueeze(2), dim=-1)
    if runs == 1:
        return mean, cosine.min(dim=-1).values
    landmarks = chunks.view(hkv, t // chunk_size, runs, chunk_size // runs, d).mean(dim=3)
    return landmarks.flatten(2), cosine.min(dim=-1).values


class CompressedPrompt(NamedTuple):
    """``compress_prompt``'s result (``O`` outlier chunks per head)."""

    u: torch.Tensor | None  # [T, r] float32 (None: factored elsewhere, as sv and fit_err)
    sv: torch.Tensor | None  # [Hkv, r, D] float32
    landmarks: torch.Tensor  # [Hkv, C, runs*D] float32 (or key codes)
    outliers: torch.Tensor  # [Hkv, O] long, the chunks with the lowest min-cosine
    outlier_cos: torch.Tensor  # [Hkv, O] float32, their min-cosines
    fit_err: torch.Tensor | None  # 0-d float32, the share of the keys' norm the rank-r basis misses
    outlier_k: torch.Tensor  # [Hkv, O*L, D] post-RoPE keys of the outlier chunks
    outlier_v: torch.Tensor  # [Hkv, O*L, Dv]
    code_scale: torch.Tensor | None = None  # [Hkv, 2, D] float32 with key codes: landmarks are [Hkv, C, L*D/2] uint8


def least_agreeing_chunks(min_cos: torch.Tensor, count: int) -> torch.Tensor:
    """``[Hkv, count]`` ids of the chunks whose keys agree least with their landmark (lowest
    ``min_cos [Hkv, C]``): kept dense, never selected."""
    return torch.topk(-min_cos, count, dim=-1).indices


def compress_prompt(k_pre: torch.Tensor, k_rot: torch.Tensor, v: torch.Tensor, rank: int, chunk_size: int,
                    outlier_chunks: int, landmark_runs: int = 1, key_code_bits: int = 0,
                    basis: bool = True) -> CompressedPrompt:
    """One sequence's chunked prompt ``k_pre, k_rot: [Hkv, C*L, D]``, ``v: [Hkv, C*L, Dv]``: low-rank
    keys, landmarks (with ``key_code_bits``, every key's codes in their place), and the outlier
    chunks kept dense (chosen by the chunk means either way). ``basis=False``: ``u``, ``sv`` and
    ``fit_err`` are None, for the caller to factor the keys elsewhere (``key_basis.py``)."""
    u = sv = fit_err = None
    if basis:
        u, sv, fit_err = factor_keys(flatten_keys(k_pre), k_pre.shape[0], rank)
    landmarks, min_cos = chunk_landmarks(k_rot, chunk_size, landmark_runs)
    code_scale = None
    if key_code_bits:
        code_scale = key_codes.fit_scale(k_rot)
        landmarks = key_codes.encode(k_rot, code_scale, chunk_size)
    outliers = least_agreeing_chunks(min_cos, outlier_chunks)
    token_idx = chunk_tokens(outliers, chunk_size)[..., None]
    return CompressedPrompt(u, sv, landmarks, outliers, min_cos.gather(1, outliers), fit_err,
                            torch.gather(k_rot, 1, token_idx.expand(-1, -1, k_rot.shape[-1])),
                            torch.gather(v, 1, token_idx.expand(-1, -1, v.shape[-1])), code_scale)
