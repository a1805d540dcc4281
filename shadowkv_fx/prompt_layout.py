"""Where each prompt of a left-padded batch sits, and the sizes of the state that follow from it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from shadowkv_fx.config import ShadowKVConfig


@dataclass
class PromptLayout:
    """Where each sequence's prompt sits in the left-padded batch (shared by all layers).

    ``pad[b]`` leading pad tokens, ``lengths[b]`` real tokens, ``chunks[b]`` compressed chunks
    (0: the prompt is too short to compress and decodes densely).
    """

    pad: list[int]
    lengths: list[int]
    chunks: list[int]
    padded_len: int

    @classmethod
    def from_mask(cls, key_valid: torch.Tensor, config: ShadowKVConfig) -> "PromptLayout":
        lengths = key_valid.sum(dim=1).tolist()
        padded_len = key_valid.shape[1]
        chunks = []
        for n in lengths:
            c = n // config.chunk_size - config.local_chunks
            chunks.append(c if c >= config.outlier_chunks + 1 else 0)
        return cls([padded_len - n for n in lengths], lengths, chunks, padded_len)

    @property
    def max_chunks(self) -> int:
        return max(self.chunks)


def store_chunks(lengths: list[int], generated: int, chunk_size: int) -> int:
    """Chunks per row a folding store is preallocated for: every prompt token and ``generated``
    more may fold (``fold.py``)."""
    return -(-(max(lengths) + generated) // chunk_size)


def tail_slots(config: ShadowKVConfig, prompt_chunks: list[int], generated: int) -> int:
    """Dense tail slots the decode buffers need for ``generated`` tokens: when every row folds the
    tail is compacted and never holds more than the fold window; a row that never folds (its
    prompt too short to compress) keeps every token it generates."""
    if config.folds and all(prompt_chunks):
        return min(generated, config.fold_window)
    return generated
