"""What ``optimize`` attaches to a model: its ShadowKV forward and generate, run around the compiled graph.

Each forward checks its inputs, starts a cache step (a prompt's layout at prefill, positions at
decode), makes the cache active for the ShadowKV ops and runs the compiled forward (prefill in
groups of rows and spans, a decode step through a captured CUDA graph where it can).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import weakref
from typing import Callable, Iterator

import torch

from shadowkv_fx import cache_io, compat, cuda_graph, regions
from shadowkv_fx.cache import ShadowKVCache
from shadowkv_fx.config import ShadowKVConfig
from shadowkv_fx.dynamo_limits import RECOMPILE_LIMIT, recompile_limit
from shadowkv_fx.generate_args import end_streamer, plan_generate
from shadowkv_fx.graph_compile import graph_backend
from shadowkv_fx.hooks import HookAwareForward
from shadowkv_fx.ops import active_cache, has_active_cache
from shadowkv_fx.padding import prompt_layout
from shadowkv_fx.passes.report import PassReport
from shadowkv_fx.preflight import check_batch_fits

log = logging.getLogger(__name__)


class ShadowKVRuntime:
    """What ``optimize`` attaches to a model: its config, the compiled inner forward, pass reports."""

    def __init__(self, model, config: ShadowKVConfig, compile_graph: Callable | None = None, compile_kwargs=None,
                 cuda_graphs: bool = False, regional: bool = True):
        self.config = config
        self.cuda_graphs = cuda_graphs
        self.warned_hooks_stop_capture = False
        self.compile_graph, self.compile_kwargs = compile_graph, compile_kwargs
        self.reports: list[PassReport] = []
        self.num_layers = model.config.num_hidden_layers
        self.model_config = model.config
        self.model = weakref.ref(model)  # the identity a cache it prefills is saved with (cache_io)
        self.dtype = next(model.parameters()).dtype
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.tp_size = getattr(model, "_tp_size", None) or 1
        self.original_forward = model.forward
        self.original_generate = model.generate
        self.original_generate_batch = getattr(model, "generate_batch", None)
        backend = graph_backend(config, self.reports, compile_graph)
        compile_fullgraph = functools.partial(torch.compile, fullgraph=True, **(compile_kwargs or {}))
        layers = regions.decoder_layers(model) if regional else None
        # one compiled decoder layer for all layers (regions.py says why), else the whole forward
        self.regional = None if layers is None else regions.RegionalLayers(
            layers, functools.partial(compile_fullgraph, backend=backend), has_active_cache)
        fast = self.original_forward if self.regional else compile_fullgraph(self.original_forward, backend=backend)
        self.inner = HookAwareForward(
            model, self.original_forward, fast, lambda fn, backend: compile_fullgraph(fn, backend=backend),
            config, compile_graph, self.reports, layers,
        )

    @property
    def report(self) -> PassReport:
        """The pass report of the last compiled graph, one site per layer for a regional compile."""
        last = self.reports[-1]
        if self.regional is None or len(last.sites) != 1:  # a whole forward, or every layer's region
            return last
        return dataclasses.replace(last, sites=[
            dataclasses.replace(site, name=f"layers.{layer}.{site.name}", index=layer)
            for layer in range(len(self.regional.layers)) for site in last.sites
        ])

    def new_cache(self, tail_capacity: int = 64) -> ShadowKVCache:
        return ShadowKVCache(self.num_layers, self.config, tail_capacity)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None,
                inputs_embeds=None, cache_position=None, **kwargs):
        cache = compat.pop_cache(kwargs)
        if inputs_embeds is not None:
            raise ValueError("ShadowKV takes input_ids, not inputs_embeds")
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError("empty prompt: input_ids must be [batch, seq] with seq >= 1")
        if not self.config.enabled or (use_cache is False and cache is None):
            # no cache to keep: a plain full-sequence forward is exactly what dense computes
            return self._dense(input_ids, attention_mask, position_ids, cache, use_cache, cache_position, **kwargs)
        for name in ("output_attentions", "output_hidden_states"):
            if kwargs.get(name):
                raise ValueError(f"{name}=True is not supported by a ShadowKV-optimized model; call it without {name}")
        hooked = self.inner.check()
        cache = cache if cache is not None else self.new_cache()
        if not isinstance(cache, ShadowKVCache):
            raise TypeError(
                f"the cache is a {type(cache).__name__}; an optimized model needs a ShadowKVCache "
                "(leave it out and one is made)"
            )
        if cache.saved_model is not None:  # loaded without its model (from_pretrained): is this the one?
            cache_io.check_model(cache.saved_model, self.model())
            cache.saved_model, cache.source_model = None, self.model
        prompt = cache.prompt_length if cache.layout is None else None
        if prompt is not None and input_ids.shape[1] > prompt:
            return self._prompt_then_drafts(prompt, input_ids, attention_mask, position_ids, cache, kwargs)
        n = input_ids.shape[1]
        if cache.layout is not None and n > 1:
            # speculative verification asks for the logits of the last accepted token and of each
            # draft after it (transformers: logits_to_keep = drafts + 1): a crop may drop the drafts
            keep = kwargs.get("logits_to_keep", 0)
            drafts = min(keep - 1, n) if isinstance(keep, int) and keep > 1 else 0
            with cache.croppable_from(cache.generated + n - drafts):
                split = cache.next_fold_point(n)
                if split is not None:
                    return self._in_two(split, input_ids, attention_mask, position_ids, cache, kwargs)
        realign = None
        if cache.layout is None:
            key_valid, realign = prompt_layout(attention_mask, input_ids.shape, input_ids.device)
            if realign is not None:
                input_ids = realign.to_left(input_ids)
                position_ids = None if position_ids is None else realign.to_left(position_ids)
            self._check_length(int(key_valid.sum(dim=1).max()))
            cache.begin_step(key_valid, n, realigned=realign is not None)
            cache.source_model = self.model
            try:
                cache.value_room = check_batch_fits(self.model_config, cache.layout, cache.config, self.dtype,
                                                    input_ids.device, cache.tail_capacity, self.tp_size)
            except MemoryError:
                cache.rollback()
                raise
            if position_ids is None:
                position_ids = (key_valid.long().cumsum(dim=1) - 1).clamp(min=0)
        else:
            if attention_mask is not None and not bool(attention_mask[:, -n:].bool().all()):
                raise ValueError("padding inside generated tokens is not supported by ShadowKV")
            if position_ids is None or cache.realigned:
                # a right-padded prompt was re-aligned: positions transformers derives from the
                # right-padded mask are wrong past the pads, the cache knows each sequence's own
                self._check_length(cache.max_position(n))
                position_ids = cache.next_positions(n, input_ids.device)
            else:
                self._check_length(int(position_ids.max()) + 1)
                cache.widen_tables_for(position_ids)
            cache.begin_step(None, n)
        step = functools.partial(self.inner, use_cache=False, **kwargs)
        replayed = False
        try:
            gate = cuda_graph.GATE.step() if input_ids.device.type == "cuda" else contextlib.nullcontext()
            with gate, active_cache(cache), torch.no_grad(), recompile_limit(RECOMPILE_LIMIT):
                if cache.phase == "prefill":
                    out = self._prefill(cache, input_ids, position_ids, kwargs)
                elif self.cuda_graphs and cuda_graph.capturable(input_ids, kwargs) and not self._hooks_stop_capture(hooked):
                    key = (tuple(input_ids.shape), tuple(sorted(kwargs.items())))
                    out, replayed = cuda_graph.run_decode_step(cache, step, input_ids, position_ids, key)
                else:
                    out = step(input_ids=input_ids, position_ids=position_ids)
        except BaseException:
            cache.rollback()
            raise
        cache.end_step(n, replayed)
        if realign is not None:
            realign.outputs_to_caller(out, n)
        compat.set_output_cache(out, cache)
        return out

    def _hooks_stop_capture(self, hooked: list) -> bool:
        """A captured decode step replays kernels only, never a submodule's Python hook: while any is
        registered, steps run uncaptured, so the hooks run every step (docs/hooks.md)."""
        if hooked and not self.warned_hooks_stop_capture:
            self.warned_hooks_stop_capture = True
            log.warning("forward hooks on %d submodules: decode steps run without CUDA graphs while hooks are "
                        "registered (a captured step cannot call Python hooks)", len(hooked))
        return bool(hooked)

    def _prompt_then_drafts(self, prompt: int, input_ids, attention_mask, position_ids, cache, kwargs):
        """A first forward holding the prompt and draft tokens (assisted generation): the prompt is
        prefilled and compressed, the drafts are decoded, each selecting its own chunks as it would
        one at a time, so speculation never changes what ShadowKV computes. Every draft may be
        rejected (cropped)."""
        with cache.croppable_from(0):
            # drafts positions come from the cache (the prompt may have been realigned)
            return self._in_two(prompt, input_ids, attention_mask, position_ids, cache, kwargs, tail_positions=False)

    def _in_two(self, split: int, input_ids, attention_mask, position_ids, cache, kwargs, tail_positions=True):
        """One forward as two: columns ``[:split]`` then ``[split:]`` through ``self.forward``, with
        the logits the caller asked for (``logits_to_keep``) concatenated. A decode step that
        crosses a fold point runs so, so each piece starts from the state sequential decoding
        would give its first token. Should the second piece fail, the first one's tokens are cropped
        again where they can be (a fold may already hold some), as a failed step caches nothing."""
        rest = input_ids.shape[1] - split
        keep = kwargs.pop("logits_to_keep", 0)
        keep_head = keep - rest if isinstance(keep, int) and keep > rest else (0 if not keep else 1)
        before = cache.seq_length
        head = self.forward(_columns(input_ids, slice(None, split)), _columns(attention_mask, slice(None, -rest)),
                            _columns(position_ids, slice(None, split)), cache=cache, logits_to_keep=keep_head,
                            **kwargs)
        try:
            tail = self.forward(_columns(input_ids, slice(split, None)), attention_mask,
                                _columns(position_ids, slice(split, None)) if tail_positions else None,
                                cache=cache, logits_to_keep=min(keep, rest) if keep else 0, **kwargs)
        except BaseException:
            if before:  # a decode step (a prompt's prefill stays, as before drafts were split off)
                with contextlib.suppress(ValueError):
                    cache.crop(before)
            raise
        if not keep or keep > rest:
            tail.logits = torch.cat([head.logits, tail.logits], dim=1)
        return tail

    def _prefill(self, cache: ShadowKVCache, input_ids, position_ids, kwargs):
        """The prompts through the model a group of rows at a time (``cache.prefill_groups()``),
        each in pieces along the sequence (``cache.prefill_spans()``); every row is compressed
        once all of it is in. Logits come back in the batch's layout."""
        groups = cache.prefill_groups()
        if len(groups) == 1 and len(cache.prefill_spans()) == 1:
            return self.inner(input_ids=input_ids, position_ids=position_ids, use_cache=False, **kwargs)
        keep = kwargs.pop("logits_to_keep", 0)
        keep = keep if isinstance(keep, int) else 0
        logits, out = None, None
        for rows in groups:
            first = min(cache.layout.pad[b] for b in rows)
            index = torch.tensor(rows, device=input_ids.device)
            cache.begin_group(rows, first)
            out = self._prefill_group(cache, input_ids[index, first:], position_ids[index, first:], keep, kwargs)
            if logits is None:
                width = out.logits.shape[1] if keep else input_ids.shape[1]
                logits = out.logits.new_zeros(input_ids.shape[0], width, out.logits.shape[-1])
            logits[index, logits.shape[1] - out.logits.shape[1]:] = out.logits
        out.logits = logits
        return out

    def _prefill_group(self, cache: ShadowKVCache, input_ids, position_ids, keep: int, kwargs):
        spans = cache.prefill_spans()
        last = spans[-1][1] - spans[-1][0]
        only_last = 0 < keep <= last
        outs = []
        for span in spans:
            cache.begin_span(span)
            piece_keep = (keep if span is spans[-1] else 1) if only_last else 0
            out = self.inner(input_ids=input_ids[:, span[0]:span[1]], position_ids=position_ids[:, span[0]:span[1]],
                             use_cache=False, logits_to_keep=piece_keep, **kwargs)
            cache.check_all_layers_ran()
            outs.append(out)
        if not only_last:
            logits = torch.cat([o.logits for o in outs], dim=1)
            outs[-1].logits = logits[:, -keep:] if keep > 0 else logits
        return outs[-1]

    def prefill_pieces(self, cache: ShadowKVCache, input_ids: torch.Tensor) -> Iterator[torch.Tensor | None]:
        """Prefill one prompt ``input_ids [1, S]`` into the empty ``cache`` as ``forward`` would, a
        span of ``cache.prefill_chunk_size`` tokens at a time: yields None after each span but the
        last, then the last position's logits ``[vocab]``. Nothing of this cache is active between
        spans, so other caches may step there (continuous batching); closing the generator early,
        or an error, rolls the cache back."""
        if cache.layout is not None or input_ids.dim() != 2 or input_ids.shape[0] != 1 or not input_ids.shape[1]:
            raise ValueError("prefill_pieces takes an empty ShadowKVCache and one prompt [1, S] of at least a token")
        self.inner.check()
        n = input_ids.shape[1]
        self._check_length(n)
        cache.begin_step(prompt_layout(None, input_ids.shape, input_ids.device)[0], n)
        cache.source_model = self.model
        positions = torch.arange(n, device=input_ids.device)[None]
        done = False
        try:
            cache.value_room = check_batch_fits(self.model_config, cache.layout, cache.config, self.dtype,
                                                input_ids.device, cache.tail_capacity, self.tp_size)
            spans = cache.prefill_spans()
            for start, end in spans:
                gate = cuda_graph.GATE.step() if input_ids.device.type == "cuda" else contextlib.nullcontext()
                with gate, active_cache(cache), torch.no_grad(), recompile_limit(RECOMPILE_LIMIT):
                    cache.begin_span((start, end))
                    out = self.inner(input_ids=input_ids[:, start:end], position_ids=positions[:, start:end],
                                     use_cache=False, logits_to_keep=1)
                    cache.check_all_layers_ran()
                if end < n:
                    yield None
            cache.end_step(n)
            done = True
        finally:
            if not done:
                cache.rollback()
        yield out.logits[0, -1]

    def _dense(self, input_ids, attention_mask, position_ids, cache, use_cache, cache_position, **kwargs):
        if cache is not None:
            kwargs[compat.CACHE_ARG] = cache
        if cache_position is not None:
            kwargs["cache_position"] = cache_position
        return self.original_forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache, **kwargs,
        )

    def _check_length(self, positions: int) -> None:
        if self.max_positions is not None and positions > self.max_positions:
            raise ValueError(
                f"sequence of {positions} positions is past the model's context "
                f"(max_position_embeddings={self.max_positions}): shorten the prompt or max_new_tokens"
            )

    def generate(self, *args, **kwargs):
        model = self.original_generate.__self__
        try:
            plan = plan_generate(model, args, kwargs, self.max_positions)
        except Exception:
            end_streamer(kwargs)
            raise
        if self.config.enabled and plan.use_cache:
            cache = compat.pop_cache(kwargs)
            if cache is None:
                cache = self.new_cache(plan.new_tokens)
            if plan.prefill_chunk_size is not None:
                cache.prefill_chunk_size = plan.prefill_chunk_size
            if plan.prompt_length is not None and cache.layout is None:
                cache.prompt_length = plan.prompt_length
            kwargs[compat.CACHE_ARG] = cache
        return self.original_generate(*args, **kwargs)

    def generate_batch(self, inputs: list[list[int]], generation_config=None, **kwargs):
        """``model.generate_batch`` of an optimized model: continuous batching over ShadowKV slots
        (``serving.generate_batch``), where transformers' own would build a paged dense cache."""
        from shadowkv_fx.serving.batch import generate_batch

        return generate_batch(self.original_generate.__self__, inputs, generation_config, **kwargs)


def _columns(t: torch.Tensor | None, columns: slice) -> torch.Tensor | None:
    """``t[:, columns]`` as a tensor of its own: a view's strides and offset would make dynamo
    compile the forward again for each piece a step is split into."""
    return None if t is None else t[:, columns].clone(memory_format=torch.contiguous_format)
