"""``torch.ops.shadowkv.token_chunked``: a token-wise region of a graph, run a chunk of tokens at a time.

``passes/token_chunks.py`` cuts each token-wise region (a model's MLP) out of a traced graph as a
standalone ``(x, *params) -> out`` module and calls this op in its place. The region is kept in a
process registry under a hash of its code; the key travels in the graph as a string, as the key-RoPE
functions of ``ops.py`` do, so a graph inductor loads from its on-disk cache names the same region in
any process that traced the same model.
"""
from __future__ import annotations

import torch

from shadowkv_fx import graph_registry

def run_in_chunks(region, x: torch.Tensor, params: list[torch.Tensor], chunk_tokens: int, out_features: int,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """``region(x, *params)`` computed ``chunk_tokens`` tokens at a time into one output.

    Parameters
    ----------
    region
        ``(x [B, s, H], *params) -> [B, s, out_features]``, the same function of each token.
    x
        ``[B, S, H]``.

    Returns
    -------
    torch.Tensor
        ``[B, S, out_features]`` of ``out_dtype``, contiguous. Only one chunk's intermediates
        (``[B, chunk_tokens, intermediate]``) are alive at a time.
    """
    tokens = x.shape[-2]
    if tokens <= chunk_tokens:
        return region(x, *params).contiguous()  # the fake impl promises a contiguous result
    out = x.new_empty(*x.shape[:-1], out_features, dtype=out_dtype)
    for start in range(0, tokens, chunk_tokens):
        piece = slice(start, min(tokens, start + chunk_tokens))
        out[..., piece, :].copy_(region(x[..., piece, :], *params))
    return out


@torch.library.custom_op("shadowkv::token_chunked", mutates_args=())
def token_chunked(
    x: torch.Tensor,
    params: list[torch.Tensor],
    region_key: str,
    chunk_tokens: int,
    out_features: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """A token-wise region (registered under ``region_key``) over ``x``, ``chunk_tokens`` tokens at a time.

    Args:
        x: ``[B, S, H]`` the region's one activation input.
        params: the region's weights and biases, in the order of its placeholders after ``x``.
        out_features: width of the region's output (its last linear's ``out_features``).
        out_dtype: dtype of the region's output.
    Returns:
        ``[B, S, out_features]``, what the region computed on the whole ``x``.
    """
    region = graph_registry.lookup(region_key, "token-wise region")
    return run_in_chunks(region, x, list(params), chunk_tokens, out_features, out_dtype)


@token_chunked.register_fake
def _(x, params, region_key, chunk_tokens, out_features, out_dtype):
    return x.new_empty(*x.shape[:-1], out_features, dtype=out_dtype)
