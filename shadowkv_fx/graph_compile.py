"""What ShadowKV does to each graph dynamo captures: the attention pass, then a compiler.

``optimize`` compiles the model's forward (or one decoder layer) with ``graph_backend``.
"""
from __future__ import annotations

from typing import Callable

import torch

from shadowkv_fx.config import ShadowKVConfig
from shadowkv_fx.passes.attention_pass import shadowkv_pass
from shadowkv_fx.passes.report import PassReport
from shadowkv_fx.passes.token_chunks import chunk_prefill_mlps


class UnsupportedModelError(ValueError):
    """The model's attention cannot be run by ShadowKV; the message says why."""


def graph_backend(config: ShadowKVConfig, reports: list[PassReport], compile_graph: Callable | None = None):
    """A dynamo backend that runs the ShadowKV pass and the prefill MLP chunking (``config.prefill_mlp_chunk``),
    then ``compile_graph`` (or eager FX)."""

    def backend(gm: torch.fx.GraphModule, example_inputs):
        report = shadowkv_pass(gm, enabled=config.enabled)
        reports.append(report)
        if report.skipped:
            raise UnsupportedModelError(f"ShadowKV cannot rewrite this model: {report}")
        chunk_prefill_mlps(gm, config, report.rewritten)
        if compile_graph is not None:
            return compile_graph(gm, example_inputs)
        return gm.forward

    return backend
