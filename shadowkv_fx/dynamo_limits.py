"""Dynamo's recompile limit, raised while optimized forwards run, on every thread at once.

A ShadowKV model compiles a handful of graphs per code object (prefill, decode per batch size, one
set per optimized copy of a model), more than dynamo's default of 8 allows for one code object.
"""
from __future__ import annotations

import contextlib
import functools
import threading

import torch

RECOMPILE_LIMIT = 64
_LIMIT_LOCK = threading.Lock()
_LIMIT_USERS = 0


@functools.cache
def _thread_local_config() -> bool:
    """Whether dynamo's config values are per thread (torch >= 2.13 keeps them in a ContextVar)."""
    seen = []
    with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit + 1):
        probe = threading.Thread(target=lambda: seen.append(torch._dynamo.config.recompile_limit))
        probe.start()
        probe.join()
        return seen[0] != torch._dynamo.config.recompile_limit


@contextlib.contextmanager
def recompile_limit(limit: int):
    """Raise dynamo's recompile limit while any optimized forward runs, on any thread.

    Where the config is per thread, each thread patches its own. Where it is process-wide,
    ``torch._dynamo.config.patch`` saves and restores one value: two threads nesting it out of order
    would leave one compiling under the other's limit, so a count of users decides instead.
    """
    global _LIMIT_USERS
    if _thread_local_config():
        with torch._dynamo.config.patch(recompile_limit=max(limit, torch._dynamo.config.recompile_limit)):
            yield
        return
    with _LIMIT_LOCK:
        if _LIMIT_USERS == 0:
            recompile_limit.saved = torch._dynamo.config.recompile_limit
            torch._dynamo.config.recompile_limit = max(limit, recompile_limit.saved)
        _LIMIT_USERS += 1
    try:
        yield
    finally:
        with _LIMIT_LOCK:
            _LIMIT_USERS -= 1
            if _LIMIT_USERS == 0:
                torch._dynamo.config.recompile_limit = recompile_limit.saved
