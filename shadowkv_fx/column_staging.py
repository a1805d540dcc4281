"""Buffers that gather a prompt's pieces column by column (``[rows, *, columns, *]``), shared by the layers'
keys and values (``prefill_attention.stage_piece``) and their RoPE tables (``rope_tables.PieceTables``)."""
from __future__ import annotations

import torch


def column_buffers(parts, total: int) -> list[torch.Tensor]:
    """One empty buffer a part, shaped as the part with ``total`` columns."""
    return [t.new_empty(*t.shape[:2], total, t.shape[3]) for t in parts]


def write_columns(buffers, parts, start: int, end: int) -> list[torch.Tensor]:
    """``parts`` written into columns ``[start, end)`` of ``buffers``; returns the buffers up to ``end``."""
    for buf, part in zip(buffers, parts):
        buf[:, :, start:end] = part
    return [buf[:, :, :end] for buf in buffers]
