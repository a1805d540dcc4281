"""``shadowkv_fx.optimize(model)``: ShadowKV for an unmodified Hugging Face causal LM, in place."""
from __future__ import annotations

import copy
import functools
import os
from typing import Callable

import torch

from shadowkv_fx import compat, regions
from shadowkv_fx.compile_cache import from_environment, use_compile_cache
from shadowkv_fx.config import ShadowKVConfig
from shadowkv_fx.graph_compile import UnsupportedModelError
from shadowkv_fx.passes.report import PassReport
from shadowkv_fx.preflight import head_shape
from shadowkv_fx.runtime import ShadowKVRuntime

__all__ = ["UnsupportedModelError", "optimize", "pass_report", "restore"]


def _check_supported(model: torch.nn.Module) -> None:
    if getattr(model, "_shadowkv", None) is not None:
        raise ValueError("shadowkv_fx.optimize was already applied to this model; optimize it once")
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "generate"):
        raise UnsupportedModelError("shadowkv_fx.optimize needs a transformers causal LM (with .config and .generate)")
    if getattr(cfg, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{type(model).__name__} is an encoder-decoder model; ShadowKV serves decoder-only LMs")
    layer_types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise UnsupportedModelError(
            f"{type(model).__name__} has non-full attention layers ({sorted(set(layer_types))}); "
            "ShadowKV supports full causal attention only"
        )
    if model.training:
        raise ValueError("call model.eval() before shadowkv_fx.optimize (ShadowKV is for inference)")


def optimize(model: torch.nn.Module, config: ShadowKVConfig | None = None, *, compile_graph: Callable | None = None,
             compile_kwargs: dict | None = None, cuda_graphs: bool = False, validate: bool = True,
             regional: bool = True, compile_cache: str | os.PathLike | None = None) -> torch.nn.Module:
    """Make ``model.generate`` / ``model(...)`` / ``model.generate_batch`` run ShadowKV. Modifies ``model`` in place
    and returns it.

    Args:
        model: an eval-mode ``transformers`` causal LM with rotary position embeddings.
        config: ShadowKV knobs; the defaults are the paper's.
        compile_graph: optional ``(gm, example_inputs) -> callable`` run after the pass
            (``torch.compile(backend="shadowkv")`` passes inductor here).
        cuda_graphs: on a GPU, capture each decode step as one CUDA graph and replay it
            (``torch.compile(..., backend="shadowkv", mode="reduce-overhead")`` turns this on).
        validate: trace once now so an unsupported model fails here, not at generate().
        regional: compile one decoder layer and run it for every layer (seconds to the first
            token, not minutes); False compiles the whole forward as one graph.
        compile_cache: a folder for the compile caches (``compile_cache.use_compile_cache``), so
            another process compiles nothing again; default ``$SHADOWKV_COMPILE_CACHE``, else torch's.
    Raises:
        UnsupportedModelError: no rewritable attention (e.g. learned positions), sliding window, ...
        ValueError: bad config for this model (rank > H_kv * D), model optimized twice.
    """
    config = config or ShadowKVConfig()
    if compile_cache is not None:
        use_compile_cache(compile_cache)
    else:
        from_environment()
    compat.warn_if_untested()
    _check_supported(model)
    runtime = ShadowKVRuntime(model, config, compile_graph, compile_kwargs, cuda_graphs, regional)
    model._shadowkv = runtime
    if runtime.regional is not None:
        runtime.regional.install()
    model.forward = _delegate(runtime.original_forward, runtime.forward)
    model.generate = _delegate(runtime.original_generate, runtime.generate)
    model.generate_batch = _delegate(runtime.original_generate_batch or runtime.generate_batch, runtime.generate_batch)
    model.__deepcopy__ = functools.partial(_deepcopy_optimized, model)
    try:
        if validate and config.enabled:
            _validate(model, runtime)
        # after the trace: a model the pass cannot serve (no RoPE, as GPT-2) is refused for that,
        # not first for a rank that no rank would fix
        _check_heads(model, config)
    except Exception:
        restore(model)
        raise
    return model


_RUNTIME_ATTRS = ("_shadowkv", "forward", "generate", "generate_batch", "__deepcopy__")


def _deepcopy_optimized(model: torch.nn.Module, memo: dict) -> torch.nn.Module:
    """``copy.deepcopy`` of an optimized model: an independent model, optimized the same way.

    A plain deep copy would keep the original's compiled forward (functions copy by reference),
    so the copy would run the original's weights and caches.
    """
    copied = type(model).__new__(type(model))
    memo[id(model)] = copied
    runtime = model._shadowkv
    for call in runtime.regional.calls if runtime.regional else ():
        memo[id(call)] = None  # the copy's layers get calls of their own below
    for name, value in model.__dict__.items():
        if name not in _RUNTIME_ATTRS:
            copied.__dict__[name] = copy.deepcopy(value, memo)
    if runtime.regional is not None:
        regions.remove_calls(regions.decoder_layers(copied))
    return optimize(copied, runtime.config, compile_graph=runtime.compile_graph,
                    compile_kwargs=runtime.compile_kwargs, cuda_graphs=runtime.cuda_graphs, validate=False,
                    regional=runtime.regional is not None)


def _check_heads(model, config: ShadowKVConfig) -> None:
    """Rank and tensor-parallel split, per rank: ShadowKV state is sharded by KV head."""
    cfg = model.config
    _, kv_heads, head_dim = head_shape(cfg)
    world = getattr(model, "_tp_size", None) or 1
    if kv_heads % world:
        raise ValueError(
            f"{kv_heads} KV heads cannot be split over {world} tensor-parallel ranks: ShadowKV shards its state by "
            f"KV head; use a world size that divides {kv_heads}"
        )
    local = kv_heads // world
    if config.rank > local * head_dim:
        where = f" on each of {world} tensor-parallel ranks" if world > 1 else ""
        raise ValueError(f"rank={config.rank} > H_kv * D = {local} * {head_dim}{where}: use rank <= {local * head_dim}")


def _delegate(original: Callable, replacement: Callable) -> Callable:
    """A plain function with ``original``'s signature (generate() inspects forward's parameters)."""

    @functools.wraps(original)
    def call(*args, **kwargs):
        return replacement(*args, **kwargs)

    # An outer torch.compile (an OptimizedModule around this model) must not trace the cache
    # bookkeeping: the inner, already compiled forward is the graph.
    return torch._dynamo.disable(call)


def _validate(model, runtime: ShadowKVRuntime) -> None:
    device = next(model.parameters()).device
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    probe = runtime.new_cache()
    probe.warn_short_prompts = False  # two tokens are too short to compress on purpose
    try:
        with torch.no_grad(), runtime.inner.silenced():
            model(ids, **{compat.CACHE_ARG: probe})
    except torch._dynamo.exc.BackendCompilerFailed as exc:
        cause = getattr(exc, "inner_exception", None) or exc.__cause__ or exc
        if isinstance(cause, UnsupportedModelError):
            raise UnsupportedModelError(f"{type(model).__name__}: {cause}") from None
        raise
    report = runtime.report
    if report.rewritten != runtime.num_layers:
        raise UnsupportedModelError(
            f"{type(model).__name__}: found {report.rewritten} rewritable attention sites for "
            f"{runtime.num_layers} layers. {report if report.matched else 'No attention (SDPA or softmax) found.'}"
        )


def restore(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``optimize``: the model's own forward and generate again (dense attention)."""
    if getattr(model, "_shadowkv", None) is None:
        raise ValueError("this model was not optimized by shadowkv_fx")
    if model._shadowkv.regional is not None:
        model._shadowkv.regional.remove()
    del model.forward, model.generate, model.generate_batch, model.__deepcopy__
    model._shadowkv = None
    return model


def pass_report(model) -> PassReport:
    """The last pass report of an optimized model: per attention site, matched / rewritten / skipped and why."""
    runtime = getattr(model, "_shadowkv", None)
    if runtime is None:
        state = "was restored" if hasattr(model, "_shadowkv") else "was never optimized"
        raise ValueError(f"this {type(model).__name__} {state}, so it has no pass report: "
                         "call shadowkv_fx.optimize(model) first")
    if not runtime.reports:
        raise ValueError("no graph was traced yet (optimize(..., validate=False) or enabled=False): "
                         "run the model once (a forward or generate), then ask for the report")
    return runtime.report
