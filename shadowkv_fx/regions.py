"""Regional compilation: one compiled decoder layer serves every layer of the model.

Compiling the whole forward traces and compiles every decoder layer again (30-32 copies of the
same code): minutes before the first token of an 8B model. Decoder layers of one class share their
code, and with dynamo's inlined built-in modules their weights are graph inputs, so one graph
compiled for layer 0 runs layers 1..N-1 as well (the approach of accelerate's ``compile_regions``
and vLLM's piecewise compile). The rest of the forward (embedding, RoPE tables, masks, final norm,
LM head) runs eagerly around the compiled layers; a captured decode step replays it all the same.

A layer graph holds one attention site, rewritten to ``torch.ops.shadowkv.attention`` with site
index 0; the op adds the index of the layer running (``layer_offset()``), which the per-layer call
sets. Prefill graphs are compiled with a symbolic batch and sequence length up front, so a new
prompt length never compiles again.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

import torch


class _Scope(threading.local):
    def __init__(self) -> None:
        self.layer = 0
        self.eager = False  # layers run their own forward (hooks inside them: hooks.py)


_SCOPE = _Scope()


def layer_offset() -> int:
    """The index of the decoder layer whose compiled region runs now on this thread (0 outside one)."""
    return _SCOPE.layer


@contextlib.contextmanager
def layer_scope(index: int) -> Iterator[None]:
    saved, _SCOPE.layer = _SCOPE.layer, index
    try:
        yield
    finally:
        _SCOPE.layer = saved


@contextlib.contextmanager
def eager_layers() -> Iterator[None]:
    """Decoder layers run their own forward eagerly on this thread (still telling which layer runs):
    a hook inside a layer must run in Python, so only its attention is compiled (hooks.py)."""
    saved, _SCOPE.eager = _SCOPE.eager, True
    try:
        yield
    finally:
        _SCOPE.eager = saved


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's decoder layers: a ``ModuleList`` of ``num_hidden_layers`` modules of one class,
    or None when the model keeps no such list, or its layers' forwards are already wrapped (the
    whole forward is then compiled as one graph)."""
    count = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count and count:
            # a forward set on the instance already (accelerate's offload hooks) is not ours to replace
            if len({type(layer) for layer in module}) == 1 and not any(map(_foreign_forward, module)):
                return module
    return None


def _foreign_forward(layer: torch.nn.Module) -> bool:
    """A forward set on the instance by someone else (ours, or a deep copy's placeholder, is not)."""
    own = layer.__dict__.get("forward")
    return own is not None and not isinstance(own, RegionalCall)


class RegionalCall:
    """``layer.forward`` of an optimized model: the shared compiled layer, told which layer it runs.

    ``copy.deepcopy`` of an optimized model never copies it (``optimize`` installs a fresh one on
    the copy), see ``optimize._deepcopy_optimized``.
    """

    def __init__(self, compiled: Callable, layer: torch.nn.Module, index: int, active: Callable[[], bool]) -> None:
        self.compiled, self.layer, self.index, self.active = compiled, layer, index, active

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        own_forward = type(self.layer).forward
        # is_dynamo_compiling: True only inside a trace, never at run time (is_compiling() is a
        # process-wide flag: another thread compiling would send this one down the dense path)
        if torch.compiler.is_dynamo_compiling() or not self.active():
            # the model's dense forward (use_cache=False, enabled=False, a dense benchmark compiling
            # the original forward): the layer as it is, no ShadowKV cache to fill
            return own_forward(self.layer, hidden_states, *args, **kwargs)
        with layer_scope(self.index):
            if _SCOPE.eager:
                return own_forward(self.layer, hidden_states, *args, **kwargs)
            if hidden_states.dim() == 3:
                mark_shapes(hidden_states, list(_tensors(args, kwargs)))
            return self.compiled(self.layer, hidden_states, *args, **kwargs)


def mark_shapes(hidden_states: torch.Tensor, others: list[torch.Tensor]) -> None:
    """One prefill graph for every batch size and prompt length (or piece of one), one static decode
    graph per batch size. Every other dim is static:
    a second model of the architecture with another head size (the layer's code, so its compiled
    graphs, are shared) must not make dynamo generalise the RoPE tables' width, which the pass
    needs as a number."""
    batch, length = hidden_states.shape[:2]
    prompt = length > 1
    # a decode step stays static, batch included: its graph is captured as a CUDA graph, and an
    # inductor kernel of a symbolic size autotunes (synchronizes) on a later launch, inside the
    # capture (H100: "operation not permitted when stream is capturing")
    for dim in range(3):
        if prompt and dim < 2:
            torch._dynamo.maybe_mark_dynamic(hidden_states, dim)
        else:
            torch._dynamo.mark_static(hidden_states, dim)
    for value in others:
        dynamic = set(_sequence_dims(value, length)) if prompt else set()
        if prompt and value.dim() > 1 and value.shape[0] == batch:
            dynamic.add(0)
        for dim in range(value.dim()):
            if dim in dynamic:
                torch._dynamo.maybe_mark_dynamic(value, dim)
            elif value.shape[dim] != 1 or dim > 0:
                torch._dynamo.mark_static(value, dim)


def _sequence_dims(value: torch.Tensor, length: int) -> list[int]:
    """The dims of a layer argument that run along the sequence: the first of size ``length`` (cos,
    sin ``[B, S, D]``, positions ``[B, S]``, ``[S]``), and both of a square mask ``[B, 1, S, S]``.
    The same dims every call, so a feature size that equals one prompt's length never adds one."""
    shape = value.shape
    if value.dim() >= 2 and shape[-1] == shape[-2] == length and value.dim() == 4:
        return [value.dim() - 2, value.dim() - 1]
    first = next((d for d, size in enumerate(shape) if size == length and (d > 0 or value.dim() == 1)), None)
    return [] if first is None else [first]


def _tensors(args: tuple, kwargs: dict) -> Iterator[torch.Tensor]:
    """Tensors among a layer's arguments, one level into tuples (``position_embeddings=(cos, sin)``)."""
    for value in (*args, *kwargs.values()):
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, torch.Tensor):
                yield item


class RegionalLayers:
    """Installs one compiled region as the forward of every decoder layer, and takes it out again."""

    def __init__(self, layers: torch.nn.ModuleList, compile_region: Callable[[Callable], Callable],
                 active: Callable[[], bool]) -> None:
        """``active()``: whether a ShadowKV forward runs on this thread (else layers run densely)."""
        self.layers = layers
        self.compiled = compile_region(type(layers[0]).forward)
        self.calls = [RegionalCall(self.compiled, layer, i, active) for i, layer in enumerate(layers)]

    def install(self) -> None:
        for layer, call in zip(self.layers, self.calls):
            layer.forward = call

    def remove(self) -> None:
        remove_calls(self.layers)


def remove_calls(layers: torch.nn.ModuleList) -> None:
    for layer in layers:
        if isinstance(layer.__dict__.get("forward"), RegionalCall) or layer.__dict__.get("forward", 0) is None:
            del layer.__dict__["forward"]
