"""Value reuse at decode (``reuse_values``): which slot of the selected region each chosen chunk
takes, so that only new chunks are fetched (``dispatch.gather_value_chunks`` with ``fetch``)."""
from __future__ import annotations

import torch


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
