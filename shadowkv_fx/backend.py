"""The ``shadowkv`` dynamo backend: the same pass as ``optimize``, then inductor.

``torch.compile(model, backend="shadowkv")`` finds this module through the
``torch_dynamo_backends`` entry point, with no prior ``import shadowkv_fx``.

Why ``generate`` needs a hook: ``torch.compile(model)`` returns an ``OptimizedModule`` whose
``.generate`` is the *original* model's method, which calls the original forward; dynamo never
sees it (DESIGN.md §7). Loading this backend therefore teaches ``OptimizedModule`` one thing:
when it was compiled with ``backend="shadowkv"``, ``.generate`` optimizes the wrapped model once
(same pass, inductor after it) and runs ShadowKV. Other compiled modules are untouched.
"""
from __future__ import annotations

import functools
import os

import torch
from torch._dynamo.eval_frame import OptimizedModule
from torch._inductor.custom_graph_pass import CustomGraphPass

from shadowkv_fx.compile_cache import use_compile_cache
from shadowkv_fx.config import ShadowKVConfig
from shadowkv_fx.graph_compile import rewrite_and_compile
from shadowkv_fx.passes.attention_pass import pass_uuid
from shadowkv_fx.passes.report import PassReport


class ShadowKVInductorKey(CustomGraphPass):
    """Keys inductor's FX-graph cache on the ShadowKV pass's source (the rewrite ran earlier)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        return None

    def uuid(self) -> str:
        return pass_uuid()


# "1": CPU decode graphs go through inductor too (the test suite sets it, so inductor's handling of the
# ShadowKV ops keeps being checked on the CPU machine; prompt graphs stay FX either way)
CPU_INDUCTOR_ENV = "SHADOWKV_CPU_INDUCTOR"


def _cpu_graph(gm: torch.fx.GraphModule) -> tuple[bool, bool]:
    """``(every input on the CPU, traced for prompts of any length: a symbolic size among its inputs)``."""
    devices, symbolic = set(), False
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value")
        if isinstance(value, torch.SymInt):
            symbolic = True
        elif isinstance(value, torch.Tensor):
            devices.add(value.device.type)
            symbolic |= any(isinstance(d, torch.SymInt) for d in value.shape)
    return devices == {"cpu"}, symbolic


def cpu_prompt_graph(gm: torch.fx.GraphModule) -> bool:
    """A graph traced for prompts of any length on the CPU."""
    on_cpu, symbolic = _cpu_graph(gm)
    return on_cpu and symbolic


def runs_as_fx(gm: torch.fx.GraphModule) -> bool:
    """A graph on the CPU runs as rewritten FX instead of through inductor. A prompt graph's time is
    GEMMs, which inductor hands to the same BLAS, while its C++ compile made the compile form's first
    token 3x dense's (SmolLM2 2K on the 2-core CI machine: first generate 66 s against 22 s as FX, warm
    prefill no faster). A decode graph compiled took 13.9 s before the first decode steps and ran
    them no faster than FX (16 tokens: 5.1 s from a warm compile cache against 3.6 s as FX;
    benchmarks/results/cpu_cold_start_regional); ``SHADOWKV_CPU_INDUCTOR=1`` compiles it anyway.
    """
    on_cpu, symbolic = _cpu_graph(gm)
    return on_cpu and (symbolic or os.environ.get(CPU_INDUCTOR_ENV) != "1")


def inductor_graph(gm: torch.fx.GraphModule, example_inputs, mode: str | None = None):
    """Hand a rewritten graph to inductor, the ShadowKV ops staying opaque inside it (a graph on the
    CPU runs as FX: ``runs_as_fx``)."""
    if runs_as_fx(gm):
        return gm.forward
    # imported only here: loading inductor is ~0.9 s that a graph run as FX need not wait for
    from torch._inductor.compile_fx import compile_fx

    patches = {"post_grad_custom_pre_pass": ShadowKVInductorKey()}
    if mode in ("reduce-overhead", "max-autotune"):
        patches["triton.cudagraphs"] = True
    if mode in ("max-autotune", "max-autotune-no-cudagraphs"):
        patches["max_autotune"] = True
    return compile_fx(gm, example_inputs, config_patches=patches)


# torch.compile takes ``mode`` or ``options``, never both: with a ShadowKV config in ``options``,
# the "cuda_graphs" key asks for what mode="reduce-overhead" gives (decode steps captured as CUDA graphs),
# "compile_cache" names a folder for the compile caches (compile_cache.py).
def split_options(mode: str | None, options: dict | None) -> tuple[ShadowKVConfig, str | None, bool]:
    """``(config, inductor mode, capture decode steps)`` from ``torch.compile``'s mode and options."""
    options = dict(options or {})
    if options.get("compile_cache") is not None:
        use_compile_cache(options["compile_cache"])  # before anything compiles
    options.pop("compile_cache", None)
    cuda_graphs = bool(options.pop("cuda_graphs", False)) or mode in ("reduce-overhead", "max-autotune")
    config = ShadowKVConfig.from_options(options)
    # the runtime captures whole decode steps itself (cuda_graph.py says why not inductor)
    graph_mode = {"reduce-overhead": None, "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)
    return config, graph_mode, cuda_graphs


def shadowkv_backend(gm: torch.fx.GraphModule, example_inputs, mode: str | None = None, options: dict | None = None):
    """Dynamo backend: the sequence ``optimize`` runs (``graph_compile.rewrite_and_compile``), then
    inductor. A graph with no attention reaches inductor with only its long-prefill MLPs rewritten
    to run in token chunks (``prefill_mlp_chunk``).

    A graph whose attention feeds a dense ``DynamicCache`` cannot hold ShadowKV state: that is
    ``compiled(input_ids)`` on the original forward. It fails loudly instead of running dense.
    """
    config, _, _ = split_options(mode, options)

    def refuse(report: PassReport) -> Exception | None:
        if not config.enabled:
            return None
        return RuntimeError(
            f"backend='shadowkv' cannot run ShadowKV on this graph, and would run it dense:\n{report}\n"
            "For a Hugging Face model use compiled.generate(...) on torch.compile(model, backend='shadowkv'), "
            "whose forward is traced without a dense cache, or shadowkv_fx.optimize(model)."
        )

    return rewrite_and_compile(gm, example_inputs, config, functools.partial(inductor_graph, mode=mode), refuse)


def _compiled_with_shadowkv(module: OptimizedModule):
    """Return ``(mode, options)`` if ``module`` was compiled with this backend, else None."""
    callback = getattr(module.dynamo_ctx, "callback", None)
    while callback is not None:
        if callback is shadowkv_backend:
            return None, None
        if getattr(callback, "compiler_fn", None) is shadowkv_backend:
            kwargs = getattr(callback, "kwargs", {})
            return kwargs.get("mode"), kwargs.get("options")
        callback = getattr(callback, "_torchdynamo_orig_backend", None)
    return False


def _shadowkv_generate(module: OptimizedModule, mode, options):
    import shadowkv_fx

    model = module._orig_mod
    if getattr(model, "_shadowkv", None) is None:
        config, graph_mode, cuda_graphs = split_options(mode, options)
        shadowkv_fx.optimize(model, config, compile_graph=functools.partial(inductor_graph, mode=graph_mode),
                             cuda_graphs=cuda_graphs)
    return model.generate


def _install_generate_hook() -> None:
    if getattr(OptimizedModule, "_shadowkv_hooked", False):
        return
    plain_getattr = OptimizedModule.__getattr__

    def __getattr__(self, name: str):
        if name == "generate":
            found = _compiled_with_shadowkv(self)
            if found is not False:
                return _shadowkv_generate(self, *found)
        return plain_getattr(self, name)

    OptimizedModule.__getattr__ = __getattr__
    OptimizedModule._shadowkv_hooked = True


_install_generate_hook()
