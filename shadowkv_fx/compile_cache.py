"""One folder that keeps what compiling costs, so a second process starts in seconds.

Inductor's FX-graph cache (generated kernels and wrapper code), AOTAutograd's cache and the Triton
kernel cache (inductor's and the ShadowKV kernels') all go under the folder. Dynamo still traces in
every process: with the regional compile (``regions.py``) that is one decoder layer, a second or
two. The ShadowKV pass's source is part of inductor's key (``backend.ShadowKVInductorKey``), so
a changed pass never loads a stale graph.

The folder is process-wide, as torch's caches are: the last one named wins.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)
ENV = "SHADOWKV_COMPILE_CACHE"


def use_compile_cache(folder: str | os.PathLike) -> Path:
    """Keep this process's compile caches in ``folder`` (made if missing) and return its path."""
    path = Path(folder).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ValueError(f"compile cache {path} is a file: name a folder")
    path.mkdir(parents=True, exist_ok=True)
    inductor, triton = str(path / "inductor"), str(path / "triton")
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") != inductor or os.environ.get("TRITON_CACHE_DIR") != triton:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor
        os.environ["TRITON_CACHE_DIR"] = triton
        from torch._inductor import utils

        if hasattr(utils, "clear_caches"):  # torch >= 2.12
            utils.clear_caches()  # in-memory lookups keyed by the previous folder
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    log.info("compile cache: %s", path)
    return path


def from_environment() -> Path | None:
    """``use_compile_cache($SHADOWKV_COMPILE_CACHE)`` where that variable is set."""
    folder = os.environ.get(ENV)
    return use_compile_cache(folder) if folder else None


def cache_counters() -> dict[str, int]:
    """Inductor's FX-graph cache hits and misses in this process so far."""
    from torch._dynamo.utils import counters

    return {k: int(counters["inductor"][f"fxgraph_cache_{k}"]) for k in ("hit", "miss", "bypass")}
