"""Graph pieces a rewritten graph carries by key: each attention site's key-RoPE subgraph
(``ops.py``) and each token-wise region run in chunks (``token_chunk_op.py``).

A piece is kept under a hash of its code, and the key travels in the graph as a string, so a
graph inductor loads from its on-disk cache names the same function in any process that traced
the same model. A piece holds no state of its own (its weights and tables are inputs): pieces with
the same code compute the same function, so every layer of a model, and every model of one
architecture, shares one entry.
"""
from __future__ import annotations

import hashlib

import torch.fx as fx

_PIECES: dict[str, fx.GraphModule] = {}


def register(piece: fx.GraphModule) -> str:
    """Keep ``piece`` under a hash of its code and return the key."""
    key = hashlib.sha256(piece.code.encode()).hexdigest()[:16]
    _PIECES.setdefault(key, piece)
    return key


def lookup(key: str, what: str) -> fx.GraphModule:
    """The piece registered under ``key``; ``what`` names it in the error."""
    try:
        return _PIECES[key]
    except KeyError:
        raise RuntimeError(f"no {what} {key!r} in this process: re-run shadowkv_fx.optimize") from None
