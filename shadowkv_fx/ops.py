"""``torch.ops.shadowkv``: the boundary between traced graphs and the ShadowKV cache/kernels.

A rewritten graph calls ``torch.ops.shadowkv.attention`` in place of each attention. The op is
opaque to dynamo/inductor (a fake impl gives its shape); at run time it reaches the cache that the
optimized model's ``forward`` made active for this step, and the RoPE subgraph the pass cut out
of the same site (registered under ``site_id``).
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Iterator

import torch

from shadowkv_fx.layer_state import RopeFn

_ROPE_FNS: dict[int, RopeFn] = {}
_SITE_IDS = itertools.count()
_ACTIVE: list = []


def register_rope(rope_fn: RopeFn) -> int:
    """Keep a site's key-RoPE subgraph; the returned id travels in the graph as an int."""
    site_id = next(_SITE_IDS)
    _ROPE_FNS[site_id] = rope_fn
    return site_id


def rope_fn(site_id: int) -> RopeFn:
    return _ROPE_FNS[site_id]


@contextlib.contextmanager
def active_cache(cache) -> Iterator[None]:
    """Make ``cache`` the one every ``shadowkv.attention`` call of this forward reads and fills."""
    _ACTIVE.append(cache)
    try:
        yield
    finally:
        _ACTIVE.pop()


def current_cache():
    if not _ACTIVE:
        raise RuntimeError(
            "torch.ops.shadowkv.attention ran outside an optimized model's forward: call the model "
            "returned by shadowkv_fx.optimize (or compiled with backend='shadowkv'), not its graph"
        )
    return _ACTIVE[-1]


@torch.library.custom_op("shadowkv::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k_pre: torch.Tensor,
    v: torch.Tensor,
    rope_inputs: list[torch.Tensor],
    layer_idx: int,
    site_id: int,
    scale: float,
) -> torch.Tensor:
    """ShadowKV attention of one layer.

    Args:
        q: ``[B, Hq, n, D]`` post-RoPE queries.
        k_pre: ``[B, Hkv, n, D]`` keys before RoPE (tapped from the graph).
        v: ``[B, Hkv, n, Dv]``.
        rope_inputs: per-position tensors ``[B|1, 1, n, c]`` the key RoPE reads (cos, sin, ...).
    Returns:
        ``[B, Hq, n, Dv]``, what the replaced attention returned.
    """
    return current_cache().attention(layer_idx, q, k_pre, v, list(rope_inputs), rope_fn(site_id), scale)


@attention.register_fake
def _(q, k_pre, v, rope_inputs, layer_idx, site_id, scale):
    return q.new_empty(*q.shape[:-1], v.shape[-1])
