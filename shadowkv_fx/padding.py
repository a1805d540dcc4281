"""Prompt padding: ShadowKV lays each prompt out left-padded; right-padded batches are moved there
and their outputs moved back."""
from __future__ import annotations

from typing import Any

import torch


class Realignment:
    """Moves each row's real tokens to the right end (left padding), and outputs back.

    Many tokenizers pad on the right; ShadowKV lays each prompt out left-padded. ``shift[b]`` is
    how far row ``b`` moves right.
    """

    def __init__(self, shift: torch.Tensor) -> None:
        self.shift = shift

    def _index(self, width: int, device, inverse: bool = False) -> torch.Tensor:
        cols = torch.arange(width, device=device)
        shift = self.shift.to(device)[:, None]
        return (cols + shift) % width if inverse else (cols - shift) % width

    def to_left(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, S, ...]`` in the caller's layout -> left-padded layout."""
        return torch.gather(t, 1, self._index(t.shape[1], t.device).view(*t.shape[:2], *([1] * (t.dim() - 2))).expand_as(t))

    def to_caller(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, S, ...]`` in the left-padded layout -> the caller's layout."""
        idx = self._index(t.shape[1], t.device, inverse=True)
        return torch.gather(t, 1, idx.view(*t.shape[:2], *([1] * (t.dim() - 2))).expand_as(t))

    def outputs_to_caller(self, out, seq_len: int) -> None:
        """Per-position outputs covering the whole prompt go back to the caller's layout.

        Outputs cut to the last positions (``logits_to_keep``, what ``generate`` asks for) stay as
        computed: their last position is each sequence's last real token, which is what a caller
        of a right-padded batch needs to continue it.
        """
        for name in ("logits", "hidden_states"):
            value = getattr(out, name, None)
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == seq_len:
                setattr(out, name, self.to_caller(value))


def prompt_layout(attention_mask: torch.Tensor | None, input_ids_shape: torch.Size,
                  device: Any) -> tuple[torch.Tensor, Realignment | None]:
    """Validate a 2-D prompt mask; return the left-padded key mask ``[B, S]`` and the realignment
    that takes right-padded rows there (None when the batch already is left-padded)."""
    b, s = input_ids_shape
    if attention_mask is None:
        return torch.ones(b, s, dtype=torch.bool, device=device), None
    mask = attention_mask.to(torch.bool)
    if mask.dim() != 2 or tuple(mask.shape) != (b, s):
        raise ValueError(f"attention_mask must be 2-D [batch, seq] = {(b, s)}, got {tuple(mask.shape)}")
    lengths = mask.sum(dim=1)
    empty = (lengths == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"empty prompt in batch rows {empty}: every sequence needs at least one token")
    # the real tokens of a row must be one run: first real column + length = end of the run
    first = mask.int().argmax(dim=1)
    cols = torch.arange(s, device=mask.device)
    run = (cols >= first[:, None]) & (cols < (first + lengths)[:, None])
    if not torch.equal(run, mask):
        raise ValueError(
            "attention_mask has padding between real tokens: ShadowKV needs each prompt's tokens "
            "contiguous (left or right padding)"
        )
    shift = s - (first + lengths)
    left = cols >= (s - lengths)[:, None]
    if not bool(shift.any()):
        return left, None
    return left, Realignment(shift)


