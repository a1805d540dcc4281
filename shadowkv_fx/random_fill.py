"""A ShadowKV cache filled as a prefill would fill it, from random keys and values: large-batch
bench points need not pay a real prefill per sequence (decode cost does not depend on the values)."""
from __future__ import annotations

import torch


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
    from shadowkv_fx.preflight import check_batch_fits

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    tp_size = getattr(model, "_tp_size", None) or 1
    kv_heads = cfg.num_key_value_heads // tp_size
    device, dtype = model.device, next(model.parameters()).dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    cache.begin_step(torch.ones(batch, context, dtype=torch.bool, device=device), context)
    cache.value_room = check_batch_fits(cfg, cache.layout, cache.config, dtype, device, cache.tail_capacity, tp_size)
    positions = torch.arange(context, device=device)[None]
    cos, sin = (t[:, None].to(dtype) for t in model.model.rotary_emb(torch.empty(1, dtype=dtype, device=device), positions))
    for rows in cache.prefill_groups():
        cache.begin_group(rows, 0)
        for layer in range(len(cache.layers)):
            shape = (len(rows), kv_heads, context, head_dim)
            k_pre = torch.randn(shape, generator=gen, device=device, dtype=dtype)
            v = torch.randn(shape, generator=gen, device=device, dtype=dtype)
            cache.compress_group(layer, k_pre, _rotate_half_rope(k_pre, cos, sin), v, [cos, sin])
    cache.touched = set(range(len(cache.layers)))
    cache.end_step(context)
