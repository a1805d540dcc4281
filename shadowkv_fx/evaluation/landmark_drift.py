"""How often 8-bit landmarks (``ShadowKVConfig.landmark_bits=8``) would select other chunks than
the model's own 16-bit ones, measured at the very same decode states.

Comparing two generations instead would count every selection after the first differing token
as a difference; here each decode step of a 16-bit run also scores its state's landmarks
quantised (``quantize.quantize``, as an 8-bit cache stores them) and compares the two top-k sets.

Usage (eager decode steps: with CUDA graphs the step's Python runs only at capture)::

    with landmark_selection_drift() as drift:
        model.generate(ids, max_new_tokens=64)   # optimized with landmark_bits=16
    print(drift.fraction, drift.chunk_fraction, drift.step_fraction)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch

from shadowkv_fx import decode_step
from shadowkv_fx.kernels import dispatch, quantize


def chosen_sets(chunk_idx: torch.Tensor, picked: torch.Tensor, chunks: int) -> torch.Tensor:
    """``[B, Hkv, C]`` bool: the chunks a selection really picks (``chunk_idx``/``picked [B, Hkv, k]``)."""
    counts = torch.zeros(*chunk_idx.shape[:2], chunks, device=chunk_idx.device)
    return counts.scatter_add_(2, chunk_idx, picked.float()) > 0


def selection_change(state, q: torch.Tensor, scale: float, chunk_idx: torch.Tensor,
                     picked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How the top-k of ``state``'s landmarks quantised to int8 differs from ``chunk_idx``/``picked``,
    the step's selection from its 16-bit landmarks: ``(swapped, chosen)``, both ``[B, Hkv]`` long,
    the chunks the 16-bit selection picks that the 8-bit one does not, and the chunks it picks."""
    codes, scales = quantize.quantize(state.landmarks, 1)
    scores = decode_step.chunk_scores(q, codes, state.selectable, scale, scales, state.config)  # as a step scores
    idx8, picked8 = dispatch.top_chunks(scores, state.select_k)
    chunks = state.landmarks.shape[2]
    ours = chosen_sets(chunk_idx, picked, chunks)
    return (ours & ~chosen_sets(idx8, picked8, chunks)).sum(-1), ours.sum(-1)


@dataclass
class SelectionDrift:
    """Selections compared so far: one per decode step, layer, sequence and KV head."""

    compared: int = 0
    differing: int = 0
    chunks_chosen: int = 0  # chunks the 16-bit selections picked
    chunks_swapped: int = 0  # of those, the ones the 8-bit selections did not pick
    steps: list[bool] = field(default_factory=list)  # per (decode step, layer): any of its selections differs

    @property
    def fraction(self) -> float:
        """Share of the selections (step, layer, sequence, KV head) whose chunk set differs."""
        return self.differing / max(self.compared, 1)

    @property
    def chunk_fraction(self) -> float:
        """Share of the chosen chunks that 8-bit landmarks would swap for others: with many picks
        a set differs as soon as one near-tie at the top-k boundary flips, so this is the finer measure."""
        return self.chunks_swapped / max(self.chunks_chosen, 1)

    @property
    def step_fraction(self) -> float:
        """Share of the (step, layer) selections in which any sequence or KV head picks differently."""
        return sum(self.steps) / max(len(self.steps), 1)


@contextlib.contextmanager
def landmark_selection_drift() -> Iterator[SelectionDrift]:
    """Within the block, every decode step of a cache with 16-bit landmarks also counts how its
    selection would change with 8-bit ones (``SelectionDrift``); the selection used is unchanged.
    Steps that rank chunks by key codes (``key_code_bits``) have no landmarks and are not counted."""
    drift = SelectionDrift()
    plain = decode_step.select

    def select(state, q, scale):
        chunk_idx, picked = plain(state, q, scale)
        if state.landmark_scale is None and not state.config.key_code_bits:  # 16-bit landmarks, not key codes
            swapped, chosen = selection_change(state, q, scale, chunk_idx, picked)
            drift.compared += swapped.numel()
            drift.differing += int((swapped > 0).sum())
            drift.chunks_chosen += int(chosen.sum())
            drift.chunks_swapped += int(swapped.sum())
            drift.steps.append(bool((swapped > 0).any()))
        return chunk_idx, picked

    decode_step.select = select
    try:
        yield drift
    finally:
        decode_step.select = plain
