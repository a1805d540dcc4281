"""What ShadowKV does to each graph dynamo captures, whichever API form asked for it
(``optimize``, or ``torch.compile(backend="shadowkv")``): the attention pass, a refusal of graphs
with attention it had to skip, the prefill MLP chunking, then a compiler."""
from __future__ import annotations

from typing import Callable

import torch

from shadowkv_fx.config import ShadowKVConfig
from shadowkv_fx.passes.attention_pass import shadowkv_pass
from shadowkv_fx.passes.report import PassReport
from shadowkv_fx.passes.token_chunks import chunk_prefill_mlps


class UnsupportedModelError(ValueError):
    """The model's attention cannot be run by ShadowKV; the message says why."""


def rewrite_and_compile(gm: torch.fx.GraphModule, example_inputs, config: ShadowKVConfig,
                        compile_graph: Callable | None, refuse: Callable[[PassReport], Exception | None],
                        reports: list[PassReport] | None = None) -> Callable:
    """Rewrite ``gm`` in place and compile it.

    Parameters
    ----------
    compile_graph
        ``(gm, example_inputs) -> callable`` run last (inductor); None runs the rewritten graph eagerly.
    refuse
        Given the attention pass's report of a graph with skipped sites, the error to raise, or None
        to go on with those sites dense.
    reports
        Where the attention pass's report goes, before any refusal (so a failed graph is reported).
    """
    report = shadowkv_pass(gm, enabled=config.enabled)
    if reports is not None:
        reports.append(report)
    error = refuse(report) if report.skipped else None
    if error is not None:
        raise error
    chunk_prefill_mlps(gm, config, report.rewritten)
    if compile_graph is not None:
        return compile_graph(gm, example_inputs)
    return gm.forward


def graph_backend(config: ShadowKVConfig, reports: list[PassReport], compile_graph: Callable | None = None):
    """The dynamo backend ``optimize`` compiles with: ``rewrite_and_compile``, refusing any skipped site."""

    def refuse(report: PassReport) -> Exception:
        return UnsupportedModelError(f"ShadowKV cannot rewrite this model: {report}")

    def backend(gm: torch.fx.GraphModule, example_inputs):
        return rewrite_and_compile(gm, example_inputs, config, compile_graph, refuse, reports)

    return backend
