"""A ShadowKV cache filled as a prefill would fill it, without a prefill per sequence: large-batch
bench points need not pay one (at 122K, ~11 s a sequence on an H100).

- ``fill_random``: random keys and values. Decode's arithmetic does not depend on them, but its
  bytes do: which chunks a step picks, so how many values it finds already on the GPU, follows the
  keys, and random keys give a few percent of value hits where a real prefill gives ~70%.
- ``fill_replicated``: one prompt through the model, its keys and values then compressed into
  every row: the state a real prefill of ``batch`` copies of that prompt builds, hits included.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FILLS = ("random", "replicate")


@dataclass(frozen=True)
class FillAbove:
    """How bench fills a ShadowKV point's cache: a real prefill up to batch ``batch`` (None: always),
    above it ``kind``, one of ``FILLS``."""

    batch: int | None = None
    kind: str = "random"

    def __post_init__(self):
        if self.kind not in FILLS:
            raise ValueError(f"fill must be one of {FILLS}, got {self.kind!r}")

    def for_batch(self, batch: int) -> str:
        """"prefill", "random" or "replicate"."""
        return "prefill" if self.batch is None or batch <= self.batch else self.kind


def _rotate_half_rope(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = k.shape[-1] // 2
    return k * cos + torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin


def fill_random(model, cache, batch: int, context: int, seed: int = 0) -> None:
    """Fill ``cache`` as a prefill of ``batch`` prompts of ``context`` tokens would, from random
    pre-RoPE keys and values through the same compression path (group by group: SVD, landmarks,
    outliers, values to host or spare HBM), skipping the model's forward.

    Decode cost does not depend on the values in the cache, so large-batch points need not pay a
    real prefill per sequence. RoPE is the Llama rotate-half form at the model's own tables.
    """
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = cfg.num_key_value_heads // (getattr(model, "_tp_size", None) or 1)
    device, dtype = model.device, next(model.parameters()).dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    positions = torch.arange(context, device=device)[None]
    tables = [t[:, None].to(dtype) for t in model.model.rotary_emb(torch.empty(1, dtype=dtype, device=device), positions)]

    def random_kv(rows: list[int], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (len(rows), kv_heads, context, head_dim)
        return tuple(torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(2))

    _compress_rows(model, cache, batch, context, dtype, tables, random_kv)


def _compress_rows(model, cache, batch: int, context: int, dtype: torch.dtype, tables: list[torch.Tensor],
                   kv) -> None:
    """Fill ``cache`` with ``batch`` prompts of ``context`` tokens through the prefill's compression
    path, group by group, from ``kv(rows, layer) -> (k_pre, v)`` rotated by the rotate-half
    ``tables`` (cos, sin)."""
    from shadowkv_fx.preflight import check_batch_fits

    device = tables[0].device
    cache.begin_step(torch.ones(batch, context, dtype=torch.bool, device=device), context)
    cache.value_room = check_batch_fits(model.config, cache.layout, cache.config, dtype, device, cache.tail_capacity,
                                        getattr(model, "_tp_size", None) or 1)
    cos, sin = tables
    for rows in cache.prefill_groups():
        cache.begin_group(rows, 0)
        for layer in range(len(cache.layers)):
            k_pre, v = kv(rows, layer)
            cache.compress_group(layer, k_pre, _rotate_half_rope(k_pre, cos, sin), v, tables)
    cache.touched = set(range(len(cache.layers)))
    cache.end_step(context)


def fill_replicated(model, cache, ids: torch.Tensor, batch: int) -> torch.Tensor:
    """Fill ``cache`` as a real prefill of ``batch`` copies of the one prompt ``ids [1, S]`` would,
    for the cost of one: the prompt goes through the model once, into a scratch cache whose
    ``compress_group`` also keeps each layer's pre-RoPE keys and values in pinned host memory; each
    group of ``cache``'s rows is then compressed from them (keys rotated by the model's rotate-half
    tables, as the prefill rotated them). Returns the prompt's next token for
    every row ``[batch, 1]``. Prefill time is that of one sequence and is not a batch's."""
    from shadowkv_fx.cache import ShadowKVCache

    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"fill_replicated takes one prompt [1, S], got shape {tuple(ids.shape)}")
    context = ids.shape[1]
    kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    tables: list[torch.Tensor] = []
    scratch = ShadowKVCache(len(cache.layers), cache.config)
    compress = scratch.compress_group

    def keep(layer_idx, k_pre, k_rot, v, rope_tables, keep_dense=frozenset()):
        compress(layer_idx, k_pre, k_rot, v, rope_tables, keep_dense)  # the scratch prefill ends as any does
        pinned = ids.device.type == "cuda"
        kept[layer_idx] = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned).copy_(t) for t in (k_pre, v))
        if not tables:
            if len(rope_tables) != 2:
                raise ValueError("fill_replicated rotates keys with rotate-half (cos, sin) tables; this model's RoPE "
                                 f"takes {len(rope_tables)} inputs")
            tables.extend(t[:1].clone() for t in rope_tables)

    scratch.compress_group = keep
    with torch.no_grad():
        logits = model(ids, cache=scratch, logits_to_keep=1).logits
    # scratch -> keep -> compress -> scratch is a cycle: break it so the scratch's state and its values
    # in spare HBM go now, before the batch's fit check counts free memory, not at some later gc
    del scratch.compress_group
    scratch = compress = keep = None  # noqa: F841 (dropping the references is the point)

    def recorded_kv(rows: list[int], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(t.to(ids.device, non_blocking=True).expand(len(rows), -1, -1, -1) for t in kept[layer])

    _compress_rows(model, cache, batch, context, kept[0][0].dtype, tables, recorded_kv)
    return logits[:, -1].argmax(-1, keepdim=True).expand(batch, 1)
