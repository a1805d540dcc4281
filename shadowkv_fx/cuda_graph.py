"""Whole decode steps as CUDA graphs: one launch per step instead of thousands.

Why the runtime captures, not inductor's cudagraph trees (``mode="reduce-overhead"``): a decode
step reads and writes the ShadowKV cache, whose tensors are not inputs of the traced graph (the
op reaches them through the active cache). A graph recorded by inductor would replay against the
first cache it saw, whatever cache the next ``generate`` made. Here each graph belongs to one
cache (``cache.decode_graphs``), so it dies with it and can only ever replay against its buffers;
the cache drops its graphs whenever those buffers move (``ShadowKVCache.begin_step``).

The first ``WARM_STEPS`` decode steps of a cache at a given input shape run normally and warm
everything up (compiles and recompiles, Triton JIT and autotuning, cuBLAS workspaces): under
tensor parallelism the second step still recompiled and autotuned, which synchronizes and so
cannot happen inside a capture. The next step is captured, then every step is replayed. A capture
that fails anyway leaves that cache decoding eagerly, with a warning.
"""
from __future__ import annotations

import contextlib
import gc
import threading
import warnings
from typing import Any, Callable, Iterator

import torch

WARM_STEPS = 2  # eager decode steps of a cache (per input shape) before its step is captured
_EAGER = "eager"  # the capture failed: this cache's steps of that shape run without a graph
_PLAIN_KWARGS = {"return_dict", "logits_to_keep", "output_attentions", "output_hidden_states"}


class _SeenAsCapturing(threading.local):
    """transformers takes other Python branches while a stream captures (``is_tracing``): it reads
    no tensor value, so it keeps masks it would drop after looking (a packed-sequence mask from the
    position ids; a padding mask that is all ones). A layer compiled in warm-up with ``mask=None``
    then recompiles inside the capture, where compiling (and inductor's lazy autotune) cannot run.
    Warm-up steps therefore see transformers' capture check answer True as well, on their thread
    only: they take the capture's branches (conservative ones: the mask is kept), and the capture
    compiles nothing new. The check is wrapped once, for good (its identity never changes)."""

    depth = 0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        _wrap_capture_check()
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1


seen_as_capturing = _SeenAsCapturing()
_wrap_lock = threading.Lock()


def _wrap_capture_check() -> None:
    from transformers.utils import import_utils

    original = getattr(import_utils, "is_cuda_stream_capturing", None)
    if original is None or getattr(original, "_shadowkv_wrapped", False):
        return
    with _wrap_lock:
        original = import_utils.is_cuda_stream_capturing
        if getattr(original, "_shadowkv_wrapped", False):
            return

        def is_cuda_stream_capturing() -> bool:
            return seen_as_capturing.depth > 0 or original()

        is_cuda_stream_capturing._shadowkv_wrapped = True
        import_utils.is_cuda_stream_capturing = is_cuda_stream_capturing


def capturable(input_ids: torch.Tensor, kwargs: dict[str, Any]) -> bool:
    """Whether a decode step with these inputs is worth running as a captured graph: one new token
    per sequence. A speculative verification step (several tokens) has a draft length that changes
    from step to step, so its graph would be warmed up and captured for a shape that rarely comes
    again (SmolLM2 with prompt lookup on an H100: 9.3 tok/s against 44.6 without lookup)."""
    if input_ids.device.type != "cuda" or input_ids.shape[1] != 1 or set(kwargs) - _PLAIN_KWARGS:
        return False
    if not all(v is None or isinstance(v, (bool, int)) for v in kwargs.values()):
        return False
    return not (kwargs.get("output_attentions") or kwargs.get("output_hidden_states"))


class CaptureGate:
    """Lets any number of ShadowKV steps run on the GPU at once, except while one thread captures.

    A capture forbids work from other threads that could touch the capturing stream (a legacy
    default-stream launch, a synchronize, an allocation): CUDA then invalidates the capture
    ("operation not permitted when stream is capturing"). Steps share the gate; a capture takes
    it alone. Captures are rare (the second step of each cache), replays run concurrently.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._steps = 0
        self._capturing = False

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._capturing)
            self._steps += 1
        try:
            yield
        finally:
            with self._cond:
                self._steps -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Called from inside a step: leave it, take the gate alone, capture, rejoin."""
        with self._cond:
            self._steps -= 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._capturing and self._steps == 0)
            self._capturing = True
        try:
            yield
        finally:
            with self._cond:
                self._capturing = False
                self._steps += 1
                self._cond.notify_all()


GATE = CaptureGate()


_CAPTURED = [0]  # decode steps captured by this process: a serving bench reports how often it re-captured


def captures() -> int:
    """Decode steps captured as CUDA graphs by this process so far (every cache, every thread)."""
    return _CAPTURED[0]


class DecodeGraph:
    """One captured decode step: static inputs, the graph, and the outputs it writes."""

    def __init__(self, step: Callable[..., Any], input_ids: torch.Tensor, position_ids: torch.Tensor) -> None:
        _CAPTURED[0] += 1
        self.input_ids = input_ids.clone()
        self.position_ids = position_ids.clone()
        self.graph = torch.cuda.CUDAGraph()
        # A collection during capture may destroy another cache's graph, which CUDA forbids
        # while a stream is capturing (and torch.cuda.graph no longer collects first).
        with GATE.capture():
            torch.cuda.synchronize()
            gc.collect()
            gc_was_on = gc.isenabled()
            gc.disable()
            try:
                with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                    self.output = step(input_ids=self.input_ids, position_ids=self.position_ids)
            finally:
                if gc_was_on:
                    gc.enable()

    def replay(self, input_ids: torch.Tensor, position_ids: torch.Tensor):
        self.input_ids.copy_(input_ids)
        self.position_ids.copy_(position_ids)
        self.graph.replay()
        # the next replay overwrites the graph's outputs; the caller keeps its own copy
        return type(self.output)(
            **{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self.output.items()}
        )


def run_decode_step(cache, step: Callable[..., Any], input_ids: torch.Tensor, position_ids: torch.Tensor,
                    key: tuple) -> tuple[Any, bool]:
    """Run one decode step of ``cache``: warm-up, capture, or replay.

    Returns ``(output, replayed)``: ``replayed`` is True when no Python ran the step's ops, so the
    cache cannot see which layers ran (a graph is only kept once its capture saw them all).
    ``key`` names everything the captured step depends on beyond the cache (input shape, kwargs).
    """
    entry = cache.decode_graphs.get(key, 0)
    if isinstance(entry, int) and entry < WARM_STEPS:
        # eager steps first: a recompile or a lazy autotune (which synchronizes) must happen
        # before the capture, never inside it
        cache.decode_graphs[key] = entry + 1
        with seen_as_capturing():
            return step(input_ids=input_ids, position_ids=position_ids), False
    if entry == _EAGER:
        return step(input_ids=input_ids, position_ids=position_ids), False
    if isinstance(entry, int):
        # capture runs the Python (filling cache.touched) but no kernel; the replay runs them
        try:
            entry = DecodeGraph(step, input_ids, position_ids)
        except RuntimeError as exc:  # torch.AcceleratorError is a RuntimeError
            if "captur" not in str(exc):
                raise
            # nothing ran on the device during the failed capture: run this cache eagerly
            warnings.warn(f"ShadowKV: capturing the decode step as a CUDA graph failed ({str(exc).splitlines()[0]}); "
                          "this cache decodes without CUDA graphs", RuntimeWarning, stacklevel=2)
            cache.decode_graphs[key] = _EAGER
            return step(input_ids=input_ids, position_ids=position_ids), False
        cache.decode_graphs[key] = entry
        return entry.replay(input_ids, position_ids), False
    return entry.replay(input_ids, position_ids), True
