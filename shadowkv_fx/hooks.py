"""Forward hooks a user puts on an optimized model: they run every step, as in plain transformers.

Hooks on the top-level model run around ``model.forward``, which ``optimize`` replaced with a
``torch._dynamo.disable``-d delegate: ``Module.__call__`` runs them in plain Python, never traced.

Hooks on submodules sit inside the compiled forward. Traced by dynamo, a hook that touches Python
state (a list it appends to, a counter) is guarded on and every step recompiles; graph-breaking
at the hook instead does not work either: dynamo cannot resume inside a loop, and every hook call
sits in one (``Module._call_impl`` loops over the hooks, the model over its decoder layers), so the
frame holding the attention falls back to eager and loses the ShadowKV rewrite. So while any
submodule has a forward hook or pre-hook, ``HookAwareForward`` runs the model's own forward
eagerly, as plain transformers does (every hook runs as there: pre-hooks, ``with_kwargs``,
replacement outputs and arguments), and only each attention module as a compiled region
(``fullgraph=True``), which the ShadowKV pass rewrites as it rewrites the whole-model graph. No
hook is ever traced, so none causes a recompile. One region compiles per layer (the layer index is
a constant of the rewritten op) and per input shape: once, not per step. With no submodule hook
left, calls go back to the whole-model fullgraph forward: full speed, no new compile.

Hooks on an attention module itself run too (eagerly, around its compiled region). Refused before
any work (``UnsupportedHookError``, naming the module and the fix): hooks inside an attention
module (``q_proj``, ``k_proj``, ...), whose computation ShadowKV replaces with its own op, and
module-global hooks (``register_module_forward_hook`` and friends), which
fire on every submodule, attention included.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch.nn.modules import module as nn_module
from torch.utils.hooks import RemovableHandle

from shadowkv_fx.config import ShadowKVConfig
from shadowkv_fx.graph_compile import UnsupportedModelError
from shadowkv_fx.ops import current_cache
from shadowkv_fx.passes.attention_pass import shadowkv_pass
from shadowkv_fx.passes.report import PassReport
from shadowkv_fx.regions import eager_layers

GLOBAL_HOOK_DICTS = {
    "_global_forward_pre_hooks": "register_module_forward_pre_hook",
    "_global_forward_hooks": "register_module_forward_hook",
    "_global_forward_hooks_always_called": "register_module_forward_hook(..., always_call=True)",
}


class UnsupportedHookError(ValueError):
    """A hook that cannot run inside a ShadowKV-optimized model; the message names it and the fix."""


def _is_attention(name: str, module: torch.nn.Module) -> bool:
    """Transformers names every attention class ``...Attention`` and its instance ``self_attn``."""
    return type(module).__name__.endswith("Attention") or name.rsplit(".", 1)[-1] in ("self_attn", "attn")


def hooked_submodules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules of ``model`` (not ``model`` itself) with a forward hook or pre-hook. This runs
    every forward, so it only reads dicts."""
    return [m for m in model.modules() if m is not model and (m._forward_hooks or m._forward_pre_hooks)]


def check_hooks(model: torch.nn.Module) -> None:
    """Raise ``UnsupportedHookError`` for a hook that cannot run with ShadowKV (see the module doc)."""
    for attr, register in GLOBAL_HOOK_DICTS.items():
        if getattr(nn_module, attr, None):
            raise UnsupportedHookError(
                f"a module-global hook (torch.nn.modules.module.{register}) is registered: it runs inside every "
                "submodule, including the attention modules whose computation ShadowKV replaces. Remove it "
                "(handle.remove()) and register the hook on the modules you need (model.register_forward_hook "
                "for the whole model)"
            )
    attention = [name for name, m in model.named_modules() if name and _is_attention(name, m)]
    for name, m in model.named_modules():
        if not name or not (m._forward_hooks or m._forward_pre_hooks):
            continue
        inside = next((a for a in attention if name.startswith(a + ".")), None)
        if inside is not None:
            raise UnsupportedHookError(
                f"a forward hook on {name!r}, inside attention module {inside!r}: ShadowKV replaces that "
                "attention's computation (projections, RoPE, cache, softmax) with its own op, so the hook would "
                f"never run. Remove it, or hook the attention module itself ({inside!r}), its decoder layer or the "
                "whole model, or call shadowkv_fx.restore(model) first"
            )


class HookAwareForward:
    """The inner forward of an optimized model: the fullgraph compile, or, while submodules have
    hooks, the model's own forward with its attention modules compiled one by one.

    Args:
        model: the optimized model (its submodules' hook dicts are read every call).
        original_forward: the model's own (bound) forward.
        fullgraph: ``original_forward`` compiled with ``fullgraph=True``: the path with no hooks.
        compile_region: ``(fn, backend) -> callable``: ``fn`` compiled with ``fullgraph=True``.
        config: the ShadowKV config the regions are rewritten with.
        compile_graph: what runs a rewritten region graph (inductor), or None for eager FX.
        reports: the runtime's pass reports: a call that compiled a region appends one report
            listing the attention sites it ran through ShadowKV (one per layer).
    """

    def __init__(self, model: torch.nn.Module, original_forward: Callable, fullgraph: Callable,
                 compile_region: Callable[[Callable, Callable], Callable], config: ShadowKVConfig,
                 compile_graph: Callable | None, reports: list[PassReport],
                 layers: torch.nn.ModuleList | None = None):
        self.model, self.original_forward, self.fullgraph = model, original_forward, fullgraph
        # decoder layers compiled as regions (regions.py): hooks outside them already run eagerly,
        # and each layer call says which layer runs, so one attention region serves every layer
        self.layers = layers
        self.shared_backend: Callable | None = None
        self.compile_region, self.config, self.compile_graph = compile_region, config, compile_graph
        self.reports = reports
        self.regions: dict[int, tuple[torch.nn.Module, Callable, Callable]] = {}  # id -> (attn, its forward, compiled)
        self.checked: tuple | None = None
        self.scanned_at: int | None = None  # RemovableHandle.next_id at the last full scan
        self.hooked: list[torch.nn.Module] = []
        self.ran: list | None = None  # sites of the regions run by the current call
        self.compiled_now = False

    def hooked_submodules(self) -> list[torch.nn.Module]:
        """``hooked_submodules(model)``, cheaply: walking every module takes ~0.7 ms on a 30-layer
        model (measured on the CPU machine), a few % of a GPU decode step. Every hook registration
        makes a ``RemovableHandle``, whose counter moves: only then is the model walked again;
        otherwise only the modules hooked at the last walk are read (a removed hook drops out)."""
        if RemovableHandle.next_id != self.scanned_at:
            self.scanned_at = RemovableHandle.next_id
            self.hooked = hooked_submodules(self.model)
        elif self.hooked:
            self.hooked = [m for m in self.hooked if m._forward_hooks or m._forward_pre_hooks]
        return self.hooked

    @contextlib.contextmanager
    def silenced(self) -> Iterator[None]:
        """Refuse unsupported hooks, then keep every forward hook and pre-hook of the model (itself
        included) from running inside the block: ``optimize``'s validation forward is a probe of its
        own, which plain transformers never makes, so a user's hook must not see it."""
        check_hooks(self.model)
        saved = [(hooks, dict(hooks)) for m in self.model.modules()
                 for hooks in (m._forward_hooks, m._forward_pre_hooks) if hooks]
        for hooks, _ in saved:
            hooks.clear()
        try:
            yield
        finally:
            for hooks, kept in saved:
                hooks.update(kept)
            self.scanned_at = None  # the hooks are back without a new handle: walk the model again

    def check(self) -> list[torch.nn.Module]:
        """Refuse unsupported hooks before any work; return the hooked submodules (empty: fast path).
        The full check (module names) runs only when the set of hooks changed."""
        hooked = self.hooked_submodules()
        seen = (tuple((id(m), tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for m in hooked),
                tuple(bool(getattr(nn_module, attr, None)) for attr in GLOBAL_HOOK_DICTS))
        if seen != self.checked:
            check_hooks(self.model)
            self.checked = seen
        return hooked

    def inside_layers(self, hooked: list[torch.nn.Module]) -> bool:
        """Whether a hooked module sits inside a compiled region: anywhere, for a whole-forward
        compile; strictly inside a decoder layer, for layer regions."""
        if self.layers is None:
            return bool(hooked)
        hooked_ids = {id(m) for m in hooked}
        return any(id(m) in hooked_ids for layer in self.layers for m in layer.modules() if m is not layer)

    def __call__(self, *args, **kwargs):
        if not self.inside_layers(self.hooked_submodules()):
            return self.fullgraph(*args, **kwargs)
        self.ran, self.compiled_now = [], False
        regions = self._regions()
        # one cache entry per layer and input shape, all for the attention's one code object
        limit = 8 * len(regions)
        try:
            with self._swapped_forwards(regions), eager_layers(), torch._dynamo.config.patch(
                    recompile_limit=max(limit, torch._dynamo.config.recompile_limit),
                    accumulated_recompile_limit=max(4 * limit, torch._dynamo.config.accumulated_recompile_limit)):
                out = self.original_forward(*args, **kwargs)
            self._check_every_layer_ran()
            if self.compiled_now:
                self.reports.append(PassReport(sites=list(self.ran)))
            return out
        finally:
            self.ran = None

    def _regions(self) -> list[tuple[torch.nn.Module, Callable, Callable]]:
        """Each attention module, in layer order, with its own forward and that forward compiled
        (made once)."""
        found, outer = [], ()
        for name, m in self.model.named_modules():
            if not name or name.startswith(outer) or not _is_attention(name, m):
                continue
            outer += (name + ".",)
            region = self.regions.get(id(m))
            if region is None or region[0] is not m:
                forward = m.forward
                if self.layers is not None:  # the layer call names the layer: one backend, one compile
                    self.shared_backend = self.shared_backend or self._region_backend(layer=None)
                    backend = self.shared_backend
                else:
                    backend = self._region_backend(layer=len(found))
                compiled = self.compile_region(forward, backend)
                region = self.regions[id(m)] = (m, forward, compiled)
            found.append(region)
        return found

    def _region_backend(self, layer: int | None) -> Callable:
        """The ShadowKV pass on one attention module's graph, its op bound to ``layer`` (the pass
        numbers the sites of a graph from 0; None: the running layer region's index, added by the op);
        each compiled region records its sites when it runs."""

        def backend(gm: torch.fx.GraphModule, example_inputs):
            report = shadowkv_pass(gm, enabled=self.config.enabled)
            if report.skipped or (self.config.enabled and report.rewritten != 1):
                raise UnsupportedModelError(f"ShadowKV cannot rewrite the attention of layer {layer}: {report}")
            if layer is not None:
                for node in gm.graph.find_nodes(op="call_function", target=torch.ops.shadowkv.attention.default):
                    node.update_arg(4, layer)
                gm.recompile()
            compiled = self.compile_graph(gm, example_inputs) if self.compile_graph is not None else gm.forward
            self.compiled_now = True

            def run(*inputs):
                if self.ran is not None:
                    self.ran.extend(report.sites)
                return compiled(*inputs)

            return run

        return backend

    def _check_every_layer_ran(self) -> None:
        try:
            cache = current_cache()
        except RuntimeError:  # a dense forward (ShadowKV disabled): nothing to check
            return
        missing = sorted(set(range(len(cache.layers))) - cache.touched)
        if missing:
            raise UnsupportedHookError(
                f"with forward hooks on submodules, ShadowKV attention did not run for layers {missing[:8]}: their "
                "attention modules were not found or not compiled. Remove the hooks (handle.remove()), or register "
                "them on the whole model (model.register_forward_hook)"
            )

    @staticmethod
    @contextlib.contextmanager
    def _swapped_forwards(regions) -> Iterator[None]:
        """Each attention module's ``forward`` set to its compiled region for the call. An instance
        attribute: ``Module._call_impl`` calls ``self.forward``; a forward set on the instance before
        (accelerate's device hooks) is what the region compiled, and comes back afterwards."""
        saved = [(m, m.__dict__.get("forward", _UNSET)) for m, _, _ in regions]
        for m, _, compiled in regions:
            m.forward = compiled
        try:
            yield
        finally:
            for m, before in saved:
                if before is _UNSET:
                    m.__dict__.pop("forward", None)
                else:
                    m.forward = before


_UNSET = object()

