"""``torch.ops.shadowkv``: the boundary between traced graphs and the ShadowKV cache/kernels.

A rewritten graph calls ``torch.ops.shadowkv.attention`` in place of each attention. The op is
opaque to dynamo/inductor (a fake impl gives its shape); at run time it reaches the cache that the
optimized model's ``forward`` made active for this step, and the RoPE subgraph the pass cut out
of the same site (``graph_registry``, under ``rope_key``).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

from shadowkv_fx import graph_registry
from shadowkv_fx.regions import layer_offset



class _ActiveCaches(threading.local):
    """The caches of the forwards running on this thread, innermost last.

    Per thread, never per process: two threads generating at once (one model or several) each
    reach their own cache. A captured CUDA graph runs no Python, so replays need none of this.
    """

    def __init__(self) -> None:
        self.stack: list = []


_ACTIVE = _ActiveCaches()


@contextlib.contextmanager
def active_cache(cache) -> Iterator[None]:
    """Make ``cache`` the one every ``shadowkv.attention`` call of this forward reads and fills."""
    _ACTIVE.stack.append(cache)
    try:
        yield
    finally:
        _ACTIVE.stack.pop()


def has_active_cache() -> bool:
    """Whether an optimized model's ShadowKV forward runs on this thread."""
    return bool(_ACTIVE.stack)


def current_cache():
    if not _ACTIVE.stack:
        raise RuntimeError(
            "torch.ops.shadowkv.attention ran outside an optimized model's forward: call the model "
            "returned by shadowkv_fx.optimize (or compiled with backend='shadowkv'), not its graph"
        )
    return _ACTIVE.stack[-1]


# The op reads and writes cache state that is not a graph input: a graph recorded by inductor's
# cudagraph trees would replay against whichever cache it first saw. Inductor leaves it out; the
# runtime captures whole decode steps per cache instead (cuda_graph.py).
_TAGS = [t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t is not None]


@torch.library.custom_op("shadowkv::attention", mutates_args=(), tags=_TAGS)
def attention(
    q: torch.Tensor,
    k_pre: torch.Tensor,
    v: torch.Tensor,
    rope_inputs: list[torch.Tensor],
    layer_idx: int,
    rope_key: str,
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
    # a regionally compiled layer's graph holds site 0: the layer running says which layer it is
    rope = graph_registry.lookup(rope_key, "key-RoPE function")
    out = current_cache().attention(layer_idx + layer_offset(), q, k_pre, v, list(rope_inputs), rope, scale)
    return out.contiguous()  # the fake impl promises a contiguous result


@attention.register_fake
def _(q, k_pre, v, rope_inputs, layer_idx, rope_key, scale):
    return q.new_empty(*q.shape[:-1], v.shape[-1])
