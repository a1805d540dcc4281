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

