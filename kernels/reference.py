"""Plain-PyTorch references for every ShadowKV kernel: the ground truth, and the CPU path.

Shapes: ``B`` batch, ``Hq``/``Hkv`` query/key-value heads, ``G = Hq // Hkv``, ``n`` new
query tokens, ``C`` chunks, ``L`` chunk size, ``T`` compressed tokens, ``r`` rank, ``D`` head dim.
"""
from __future__ import annotations

import torch


def chunk_tokens(chunk_idx: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Token indices of chunks: ``[..., k]`` chunk ids -> ``[..., k * chunk_size]`` token ids."""
    offsets = torch.arange(chunk_size, device=chunk_idx.device)
    return (chunk_idx[..., None] * chunk_size + offsets).flatten(-2)


# rows of the keys in float64 at a time while the Gram matrix and U are formed (32 MiB at W = 1024)
GRAM_ROWS = 4096


def low_rank_keys(k_pre: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of one sequence's pre-RoPE keys, in float32.

    Args:
        k_pre: ``[Hkv, T, D]``.
    Returns:
        ``U [T, rank]`` and ``SV [Hkv, rank, D]`` (``diag(s) V^T``) with ``U @ SV[h] ~= k_pre[h]``;
        zero-padded when ``min(T, Hkv*D) < rank``.
    """
    hkv, t, d = k_pre.shape
    flat = k_pre.permute(1, 0, 2).reshape(t, hkv * d)
    if t > 4 * hkv * d:
        u_r, s, vh = _tall_svd(flat, rank)
    else:
        u, s, vh = torch.linalg.svd(flat.float(), full_matrices=False)
        u_r = u.new_zeros(t, rank)
        u_r[:, : min(rank, s.numel())] = u[:, :rank]
    kept = min(rank, s.numel())
    sv = u_r.new_zeros(rank, hkv * d)
    sv[:kept] = s[:kept, None] * vh[:kept]
    return u_r, sv.view(rank, hkv, d).permute(1, 0, 2).contiguous()


def _tall_svd(flat: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of a tall ``[T, W]`` matrix through its ``W x W`` Gram matrix, in float64.

    Long prompts make ``T`` 100x ``W``; the Gram route costs one GEMM and a small eigh instead of
    a tall gesvd. Components below float32 resolution are dropped (their U columns stay zero).
    The rows go through float64 ``GRAM_ROWS`` at a time and only the first ``rank`` columns of U
    are formed: a whole float64 copy of a 122K-token prompt's keys and its full-width U would
    add ~3 GiB to the prefill working set.

    Returns ``U [T, rank]`` (float32), the singular values ``[W]`` and ``V^T [W, W]``.
    """
    t, w = flat.shape
    gram = flat.new_zeros(w, w, dtype=torch.float64)
    for start in range(0, t, GRAM_ROWS):
        block = flat[start : start + GRAM_ROWS].double()
        gram += block.T @ block
    eigvals, eigvecs = torch.linalg.eigh(gram)
    order = eigvals.flip(0).clamp_min(0).sqrt()
    v = eigvecs.flip(1)
    kept = min(rank, int((order > order[0] * 1e-7).sum()))  # order descends: the kept ones lead
    u = flat.new_zeros(t, rank, dtype=torch.float32)
    for start in range(0, t, GRAM_ROWS):
        block = flat[start : start + GRAM_ROWS].double()
        u[start : start + GRAM_ROWS, :kept] = (block @ v[:, :kept] / order[:kept]).float()
    return u, order.float(), v.T.float()


def chunk_landmarks(k_rot: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk mean of post-RoPE keys and each chunk's worst token agreement.

    Args:
        k_rot: ``[Hkv, C*L, D]``.
    Returns:
        ``landmarks [Hkv, C, D]`` and ``min_cosine [Hkv, C]`` (lowest cosine similarity between a
        chunk's landmark and its tokens: low means the mean represents the chunk badly).
    """
    hkv, t, d = k_rot.shape
    chunks = k_rot.float().view(hkv, t // chunk_size, chunk_size, d)
    landmarks = chunks.mean(dim=2)
    cosine = torch.nn.functional.cosine_similarity(chunks, landmarks.unsqueeze(2), dim=-1)
    return landmarks, cosine.min(dim=-1).values


def score_chunks(q: torch.Tensor, landmarks: torch.Tensor, selectable: torch.Tensor, scale: float) -> torch.Tensor:
    """Chunk relevance: softmax(q . landmarks) per query head, summed over tokens, max over the GQA group.

    Args:
        q: ``[B, Hq, n, D]`` post-RoPE queries.
        landmarks: ``[B, Hkv, C, D]``.
        selectable: ``[B, Hkv, C]`` bool; outlier and padding chunks are False.
    Returns:
        ``[B, Hkv, C]`` float32, ``-inf`` where not selectable.
    """
    b, hq, n, d = q.shape
    hkv = landmarks.shape[1]
    grouped = q.float().view(b, hkv, hq // hkv, n, d)
    logits = torch.einsum("bhgnd,bhcd->bhgnc", grouped, landmarks.float()) * scale
    logits = logits.masked_fill(~selectable[:, :, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    scores = probs.sum(dim=3).amax(dim=2)
    return scores.masked_fill(~selectable, float("-inf"))


def top_chunks(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best chunks per row and whether each pick is real.

    Args:
        scores: ``[B, Hkv, C]``; ``-inf`` marks chunks not to pick while k finite ones remain.
    Returns:
        ``indices [B, Hkv, k]`` int64 and ``picked [B, Hkv, k]`` bool (False where the score is not
        finite). With ``C < k`` the row is padded: those slots hold index 0, not picked.
    """
    c = scores.shape[-1]
    if c < k:
        scores = torch.nn.functional.pad(scores, (0, k - c), value=float("-inf"))
    top = torch.topk(scores, k, dim=-1)
    real = top.indices < c
    return top.indices.masked_fill(~real, 0), torch.isfinite(top.values) & real


def rebuild_keys(u: torch.Tensor, sv: torch.Tensor, token_idx: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE keys of chosen tokens from the low-rank factors: ``U[token_idx] @ SV``.

    Args:
        u: ``[B, T, r]``; sv: ``[B, Hkv, r, D]``; token_idx: ``[B, Hkv, N]`` int64.
    Returns:
        ``[B, Hkv, N, D]`` in ``sv.dtype``.
    """
    b, hkv, n = token_idx.shape
    rows = torch.gather(u.unsqueeze(1).expand(b, hkv, -1, -1), 2, token_idx.unsqueeze(-1).expand(-1, -1, -1, u.shape[-1]))
    return torch.matmul(rows.float(), sv.float()).to(sv.dtype)


def gather_value_chunks(v_chunks: torch.Tensor, chunk_idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Values of chosen chunks, read from (host) memory and moved to ``device``.

    Args:
        v_chunks: ``[B, Hkv, C, L, D]`` (pinned host memory when the model is on a GPU).
        chunk_idx: ``[B, Hkv, k]`` int64 on any device.
    Returns:
        ``[B, Hkv, k*L, D]`` on ``device``.
    """
    b, hkv, c, l, d = v_chunks.shape
    idx = chunk_idx.to(v_chunks.device)
    picked = torch.gather(v_chunks, 2, idx[..., None, None].expand(-1, -1, -1, l, d))
    return picked.reshape(b, hkv, -1, d).to(device, non_blocking=True)


def stable_slots(chunk_idx: torch.Tensor, picked: torch.Tensor, prev_idx: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Assign this step's chosen chunks to the slots of the selected region so that a chunk the
    previous step already held keeps its slot (its values stay where they are) and new chunks
    take the slots freed by chunks no longer chosen. Attention does not depend on key order.

    Args:
        chunk_idx: ``[B, Hkv, k]`` distinct chunk ids (top-k); ``picked``: same shape, bool.
        prev_idx: ``[B, Hkv, k]`` chunk held by each slot (-1: none).
    Returns:
        ``slot_idx`` (chunk of each slot), ``slot_picked`` (whether that pick is real) and
        ``fetch`` (the slot's values must be fetched: the chunk is new), all ``[B, Hkv, k]``.
    """
    k = chunk_idx.shape[-1]
    match = chunk_idx[..., :, None] == prev_idx[..., None, :]  # [.., chosen j, slot s]
    held = match.any(dim=-1)
    kept = match.any(dim=-2)
    held_slot = match.to(torch.int8).argmax(dim=-1)
    # free slot of rank r among free slots; column k collects the kept ones
    free_slot = torch.full((*chunk_idx.shape[:-1], k + 1), k, dtype=torch.long, device=chunk_idx.device)
    free_rank = torch.where(kept, k, torch.cumsum(~kept, dim=-1) - 1)
    free_slot.scatter_(-1, free_rank, torch.arange(k, device=chunk_idx.device).expand_as(chunk_idx))
    new_rank = (torch.cumsum(~held, dim=-1) - 1).clamp(min=0)
    slot_of = torch.where(held, held_slot, torch.gather(free_slot, -1, new_rank))
    slot_idx = torch.empty_like(chunk_idx).scatter_(-1, slot_of, chunk_idx)
    slot_picked = torch.empty_like(picked).scatter_(-1, slot_of, picked)
    fetch = torch.empty_like(held).scatter_(-1, slot_of, ~held)
    return slot_idx, slot_picked, fetch


def gather_fetching(v_chunks: torch.Tensor, chunk_idx: torch.Tensor, fetch: torch.Tensor, out: torch.Tensor
                    ) -> torch.Tensor:
    """``gather_value_chunks`` into ``out [B, Hkv, k*L, D]``, writing only the chunks where ``fetch``
    (the others already hold their values)."""
    b, hkv, c, l, d = v_chunks.shape
    values = gather_value_chunks(v_chunks, chunk_idx, out.device).view(b, hkv, -1, l, d)
    view = out.view(b, hkv, -1, l, d) if out.is_contiguous() else out.unflatten(2, (-1, l))
    view.copy_(torch.where(fetch[..., None, None], values, view))
    return out


def gather_positions(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows of a per-position table (cos/sin and the like) for per-head token positions.

    Args:
        table: ``[B, 1, S, c]``; positions: ``[B, Hkv, N]`` int64 (padded-prompt indices).
    Returns:
        ``[B, Hkv, N, c]``.
    """
    b, hkv, n = positions.shape
    rows = table[:, 0].unsqueeze(1).expand(b, hkv, -1, -1)
    return torch.gather(rows, 2, positions.unsqueeze(-1).expand(-1, -1, -1, table.shape[-1]))


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """One softmax over the given keys, GQA-aware.

    Args:
        q: ``[B, Hq, n, D]``; k, v: ``[B, Hkv, N, D]``.
        allowed: bool, broadcastable to ``[B, Hkv, n, N]``; every query row must allow one key.
    Returns:
        ``[B, Hq, n, D]``.
    """
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    mask = allowed.expand(b, hkv, n, k.shape[2])
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        mask = mask.repeat_interleave(group, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def decode_mask(key_valid: torch.Tensor, keys: int, tail_start: int, tail_fill: torch.Tensor, n: int,
                tail_first: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, Hkv, n, N]`` bool: what each of ``n`` new queries may attend in a ``[prefix | tail]`` buffer.

    Prefix keys by ``key_valid [B, Hkv, >= tail_start]``; tail slot ``t`` for query ``i`` iff
    ``tail_first[b] <= t <= fill - n + i`` (``tail_fill``: a 0-dim device tensor, never read on the
    host; ``tail_first [B]``: slots a row has folded into its compressed store, default none).
    """
    b, hkv = key_valid.shape[:2]
    prefix = key_valid[..., :tail_start].bool()[:, :, None, :].expand(b, hkv, n, tail_start)
    tail_pos = torch.arange(keys - tail_start, device=key_valid.device)
    query_pos = tail_fill.reshape(()) - n + torch.arange(n, device=key_valid.device)
    tail = (tail_pos[None, :] <= query_pos[:, None])[None, None].expand(b, hkv, n, -1)
    if tail_first is not None:
        tail = tail & (tail_pos >= tail_first.reshape(b, 1, 1, 1))
    return torch.cat([prefix, tail], dim=-1)


def decode_attention_reference(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, key_valid: torch.Tensor,
                               tail_start: int, tail_fill: torch.Tensor, scale: float,
                               tail_first: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch twin of ``decode_attention``: the explicit ``[B, Hkv, n, N]`` mask and one SDPA.

    Same arguments and result; no host sync either (the fill level stays a tensor).
    """
    mask = decode_mask(key_valid, k_buf.shape[2], tail_start, tail_fill, q.shape[2], tail_first)
    return masked_attention(q, k_buf, v_buf, mask, scale)
