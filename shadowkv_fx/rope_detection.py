"""Which RoPE form a layer's keys follow, found at prefill with no host sync per layer (issue #23).

A layer's prefill only queues device-side checks (``PendingForm``: each known form's error, and
whether the fused append reproduces the keys bit for bit in that form); ``settle`` reads every
layer's in one host read a device when the prefill forward ends (``ShadowKVCache.end_step``, which
every path that fills a cache reaches), and sets each state's ``rope_form`` and ``fused_append``.
A state never settled decodes with the model's own RoPE function: slower, never wrong.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from shadowkv_fx.kernels import dispatch
from shadowkv_fx.kernels.rope_forms import FORMS, form_from_errors, rope_form_errors


class PendingForm(NamedTuple):
    errors: torch.Tensor | None  # [len(FORMS)] rope_form_errors; None: the tables fit no form
    exact: tuple[torch.Tensor | None, ...]  # per form, dispatch.rotates_like_flag (None: no fused append there)
    dtype: torch.dtype


def measure(k_pre: torch.Tensor, k_rot: torch.Tensor, tables: list[torch.Tensor]) -> PendingForm:
    """Queue one layer's checks: keys ``[1, Hkv, S, D]`` and tables ``[1, 1, S, c]`` (``settle`` reads them)."""
    errors = rope_form_errors(k_pre, k_rot, tables)
    exact = tuple(None if errors is None else dispatch.rotates_like_flag(k_pre, k_rot, tables, form)
                  for form in FORMS)
    return PendingForm(errors, exact, k_rot.dtype)


def settle(states) -> None:
    """Each state of ``states`` with a queued check gets its ``rope_form`` and ``fused_append``."""
    pending = [state for state in states if state.rope_pending is not None]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for state in pending:
        errors, exact, _ = state.rope_pending
        if errors is not None:
            flags = [errors.new_zeros(()) if flag is None else flag.float() for flag in exact]
            by_device.setdefault(errors.device, []).extend([errors.float(), torch.stack(flags)])
    read = {device: iter(torch.cat(parts).tolist()) for device, parts in by_device.items()}  # the host read
    for state in pending:
        errors, _, dtype = state.rope_pending
        if errors is None:
            state.take_rope_form("generic", False)
            continue
        values = read[errors.device]
        errs, flags = [next(values) for _ in FORMS], [next(values) for _ in FORMS]
        form = form_from_errors(errs, dtype)
        state.take_rope_form(form, form in FORMS and flags[FORMS.index(form)] == 1.0)
