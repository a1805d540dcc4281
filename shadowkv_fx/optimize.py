"""``shadowkv_fx.optimize(model)``: ShadowKV for an unmodified Hugging Face causal LM, in place."""
from __future__ import annotations

import functools
import logging
from typing import Callable

import torch

from shadowkv_fx import cuda_graph
from shadowkv_fx.cache import ShadowKVCache, prompt_mask
from shadowkv_fx.config import ShadowKVConfig
from shadowkv_fx.ops import active_cache
from shadowkv_fx.passes.rewrite import PassReport, shadowkv_pass

log = logging.getLogger(__name__)
RECOMPILE_LIMIT = 64


class UnsupportedModelError(ValueError):
    """The model's attention cannot be run by ShadowKV; the message says why."""


def graph_backend(config: ShadowKVConfig, reports: list[PassReport], compile_graph: Callable | None = None):
    """A dynamo backend that runs the ShadowKV pass, then ``compile_graph`` (or eager FX)."""

    def backend(gm: torch.fx.GraphModule, example_inputs):
        report = shadowkv_pass(gm, enabled=config.enabled)
        reports.append(report)
        if report.skipped:
            raise UnsupportedModelError(f"ShadowKV cannot rewrite this model: {report}")
        if compile_graph is not None:
            return compile_graph(gm, example_inputs)
        return gm.forward

    return backend


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


class ShadowKVRuntime:
    """What ``optimize`` attaches to a model: its config, the compiled inner forward, pass reports."""

    def __init__(self, model, config: ShadowKVConfig, compile_graph: Callable | None = None, compile_kwargs=None,
                 cuda_graphs: bool = False):
        self.config = config
        self.cuda_graphs = cuda_graphs
        self.reports: list[PassReport] = []
        self.num_layers = model.config.num_hidden_layers
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.original_forward = model.forward
        self.original_generate = model.generate
        self.inner = torch.compile(
            self.original_forward,
            backend=graph_backend(config, self.reports, compile_graph),
            fullgraph=True,
            **(compile_kwargs or {}),
        )

    def new_cache(self, tail_capacity: int = 64) -> ShadowKVCache:
        return ShadowKVCache(self.num_layers, self.config, tail_capacity)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                inputs_embeds=None, cache_position=None, **kwargs):
        if inputs_embeds is not None:
            raise ValueError("ShadowKV takes input_ids, not inputs_embeds")
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError("empty prompt: input_ids must be [batch, seq] with seq >= 1")
        if not self.config.enabled:
            return self._dense(input_ids, attention_mask, position_ids, past_key_values, use_cache, cache_position, **kwargs)
        cache = past_key_values if past_key_values is not None else self.new_cache()
        if not isinstance(cache, ShadowKVCache):
            raise TypeError(
                f"past_key_values is a {type(cache).__name__}; an optimized model needs a ShadowKVCache "
                "(leave it out and one is made)"
            )
        n = input_ids.shape[1]
        if cache.layout is None:
            key_valid = prompt_mask(attention_mask, input_ids.shape, input_ids.device)
            self._check_length(int(key_valid.sum(dim=1).max()))
            cache.begin_step(key_valid, n)
            if position_ids is None:
                position_ids = (key_valid.long().cumsum(dim=1) - 1).clamp(min=0)
        else:
            if attention_mask is not None and not bool(attention_mask[:, -n:].bool().all()):
                raise ValueError("padding inside generated tokens is not supported by ShadowKV")
            if position_ids is None:
                self._check_length(cache.max_position(n))
                position_ids = cache.next_positions(n, input_ids.device)
            else:
                self._check_length(int(position_ids.max()) + 1)
            cache.begin_step(None, n)
        step = functools.partial(self.inner, use_cache=False, **kwargs)
        replayed = False
        try:
            with active_cache(cache), torch.no_grad(), torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                if cache.phase == "decode" and self.cuda_graphs and cuda_graph.capturable(input_ids, kwargs):
                    key = (tuple(input_ids.shape), tuple(sorted(kwargs.items())))
                    out, replayed = cuda_graph.run_decode_step(cache, step, input_ids, position_ids, key)
                else:
                    out = step(input_ids=input_ids, position_ids=position_ids)
        except BaseException:
            cache.rollback()
            raise
        cache.end_step(n, replayed)
        out.past_key_values = cache
        return out

    def _dense(self, input_ids, attention_mask, position_ids, past_key_values, use_cache, cache_position, **kwargs):
        return self.original_forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, use_cache=use_cache, cache_position=cache_position, **kwargs,
        )

    def _check_length(self, positions: int) -> None:
        if self.max_positions is not None and positions > self.max_positions:
            raise ValueError(
                f"sequence of {positions} positions is past the model's context "
                f"(max_position_embeddings={self.max_positions}): shorten the prompt or max_new_tokens"
            )

    def generate(self, *args, **kwargs):
        if kwargs.get("num_beams", 1) > 1:
            raise NotImplementedError("ShadowKV does not support beam search (num_beams > 1)")
        if self.config.enabled and kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = self.new_cache(self._new_tokens(kwargs))
        return self.original_generate(*args, **kwargs)

    def _new_tokens(self, kwargs) -> int:
        """Room for every token ``generate`` may add, so the tail never moves mid-generation."""
        config = kwargs.get("generation_config") or self.original_generate.__self__.generation_config
        tokens = kwargs.get("max_new_tokens") or config.max_new_tokens
        if tokens is None:
            tokens = kwargs.get("max_length") or config.max_length or 64
        return max(1, min(int(tokens), self.max_positions or int(tokens)))


def optimize(model: torch.nn.Module, config: ShadowKVConfig | None = None, *, compile_graph: Callable | None = None,
             compile_kwargs: dict | None = None, cuda_graphs: bool = False, validate: bool = True) -> torch.nn.Module:
    """Make ``model.generate`` / ``model(...)`` run ShadowKV. Modifies ``model`` in place and returns it.

    Args:
        model: an eval-mode ``transformers`` causal LM with rotary position embeddings.
        config: ShadowKV knobs; the defaults are the paper's.
        compile_graph: optional ``(gm, example_inputs) -> callable`` run after the pass
            (``torch.compile(backend="shadowkv")`` passes inductor here).
        cuda_graphs: on a GPU, capture each decode step as one CUDA graph and replay it
            (``torch.compile(..., backend="shadowkv", mode="reduce-overhead")`` turns this on).
        validate: trace once now so an unsupported model fails here, not at generate().
    Raises:
        UnsupportedModelError: no rewritable attention (e.g. learned positions), sliding window, ...
        ValueError: bad config for this model (rank > H_kv * D), model optimized twice.
    """
    config = config or ShadowKVConfig()
    _check_supported(model)
    runtime = ShadowKVRuntime(model, config, compile_graph, compile_kwargs, cuda_graphs)
    model._shadowkv = runtime
    model.forward = _delegate(runtime.original_forward, runtime.forward)
    model.generate = _delegate(runtime.original_generate, runtime.generate)
    try:
        if validate and config.enabled:
            _validate(model, runtime)
        _check_rank(model.config, config)
    except Exception:
        restore(model)
        raise
    return model


def _check_rank(cfg, config: ShadowKVConfig) -> None:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if config.rank > kv_heads * head_dim:
        raise ValueError(f"rank={config.rank} > H_kv * D = {kv_heads} * {head_dim}: use rank <= {kv_heads * head_dim}")


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
    try:
        with torch.no_grad():
            model(ids)
    except torch._dynamo.exc.BackendCompilerFailed as exc:
        cause = getattr(exc, "inner_exception", None) or exc.__cause__ or exc
        if isinstance(cause, UnsupportedModelError):
            raise UnsupportedModelError(f"{type(model).__name__}: {cause}") from None
        raise
    report = runtime.reports[-1]
    if report.rewritten != runtime.num_layers:
        raise UnsupportedModelError(
            f"{type(model).__name__}: found {report.rewritten} rewritable attention sites for "
            f"{runtime.num_layers} layers. {report if report.matched else 'No attention (SDPA or softmax) found.'}"
        )


def restore(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``optimize``: the model's own forward and generate again (dense attention)."""
    if getattr(model, "_shadowkv", None) is None:
        raise ValueError("this model was not optimized by shadowkv_fx")
    del model.forward, model.generate
    model._shadowkv = None
    return model


def pass_report(model) -> PassReport:
    """The last pass report of an optimized model."""
    return model._shadowkv.reports[-1]
