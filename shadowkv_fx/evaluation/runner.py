"""Run dense, ShadowKV and the sink + local and Quest baselines on the same long-context samples.

Every method sees the identical prompts and the same greedy decoding, so score
differences come from what each method lets the decoder attend to. Methods are run
one model at a time (dense first, then one optimized copy per ShadowKV config) to keep
peak memory at two model copies.
"""
from __future__ import annotations

import copy
import functools
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import torch

from ..config import ShadowKVConfig, default_windows
from .baselines import sink_local_generate, sink_local_window_for_budget
from .budgets import budget_key, parse_budget, resolve_budget, with_budget
from .quest import QuestAttention, quest_generate
from .results import print_results_table
from .scoring import score_prediction
from .tasks import TASKS, TaskSample, make_samples, parse_length, prompt_ids

__all__ = [
    "DEFAULT_TASKS",
    "METHODS",
    "ablation_variants",
    "shadowkv_attended_tokens",
    "run_eval",
]

METHODS = ("dense", "shadowkv", "sink_local", "quest")
DEFAULT_TASKS = (
    "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
    "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe",
)  # fmt: skip


def ablation_variants(kind: str | None, base: ShadowKVConfig = ShadowKVConfig()) -> dict[str, ShadowKVConfig]:
    """Named ShadowKV configs for the paper's ablations.

    Parameters
    ----------
    kind:
        ``None``/``""`` (just ``base``), ``"rank"`` (32/64/160), ``"chunk"`` (4/8/16) or
        ``"outliers"`` (0 vs 48 outlier chunks), ``"bits"`` (values and landmarks in 8 bits,
        each on and off) or ``"selection"`` (landmarks against 4-bit key codes, each at chunk 8 and at
        chunk 4 with a 128-token local window: issue #32's configs).
    base:
        Config the ablated knob is varied from.
    """
    if not kind:
        return {"shadowkv": base}
    if kind == "rank":
        return {f"rank={r}": replace(base, rank=r) for r in (32, 64, 160)}
    if kind == "chunk":
        return {f"chunk={c}": replace(base, chunk_size=c) for c in (4, 8, 16)}
    if kind == "outliers":
        return {f"outliers={o}": replace(base, outlier_chunks=o) for o in (0, 48)}
    if kind == "bits":  # issue #26: 8-bit values and landmarks, each on and off
        return {"16-bit": base, "values=8": replace(base, value_bits=8), "landmarks=8": replace(base, landmark_bits=8),
                "both=8": replace(base, value_bits=8, landmark_bits=8)}
    if kind == "selection":  # issue #32: how chunks are chosen, at the same dense tokens
        finer = replace(base, chunk_size=4, **default_windows(4, 128))
        return {"landmarks": base, "chunk=4+local=128": finer, "keycodes=4": replace(base, key_code_bits=4),
                "keycodes=4+chunk=4+local=128": replace(finer, key_code_bits=4)}
    raise ValueError(f"unknown ablation {kind!r}: use rank, chunk, outliers, bits or selection")


def shadowkv_attended_tokens(config: ShadowKVConfig, context_tokens: int) -> int:
    """Prompt keys ShadowKV attends per decode step (per KV head), generated tokens excluded.

    Selected chunks + outlier chunks + local chunks and the partial last chunk; prompts
    shorter than ``config.min_sparse_prompt`` decode densely.
    """
    if not config.enabled or context_tokens < config.min_sparse_prompt:
        return context_tokens
    local = config.local_chunks * config.chunk_size + context_tokens % config.chunk_size
    return min(context_tokens, config.sparse_budget + config.outlier_chunks * config.chunk_size + local)


def default_optimize(model, config: ShadowKVConfig, cuda_graphs: bool = False):
    """``shadowkv_fx.optimize``, what ``run_eval`` applies unless given another ``optimize_fn``."""
    import shadowkv_fx

    return shadowkv_fx.optimize(model, config, cuda_graphs=cuda_graphs)


def _dense_generate(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)


@torch.no_grad()
def _generate(model, tokenizer, sample: TaskSample, max_new_tokens: int, generate_fn: Callable = _dense_generate) -> str:
    device = next(model.parameters()).device
    input_ids = prompt_ids(tokenizer, sample.prompt).to(device)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    kwargs["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = generate_fn(model, input_ids, **kwargs)
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)


class _Run(NamedTuple):
    """One model's pass over some samples: dense, or a method at one budget (and variant)."""

    method: str
    variant: str | None
    label: str
    budget: int | str | None  # the spec as given: 256 or "1/16"
    config: ShadowKVConfig | None
    samples: list[TaskSample]


def _plan_runs(methods, variants, budgets, samples) -> list[_Run]:
    """Runs in the order models are built: dense-model methods first, then one ShadowKV copy per run.

    A fractional budget resolves per context length, so it becomes one run per length.
    """
    lengths = sorted({s.target_length for s in samples})

    def per_budget(method: str, variant: str | None, name: str, template: ShadowKVConfig) -> list[_Run]:
        out = []
        for spec in budgets:
            key = budget_key(spec)
            if isinstance(parse_budget(spec), int):
                groups = [(resolve_budget(spec, 0), samples)]
            else:
                groups = [(resolve_budget(spec, n), [s for s in samples if s.target_length == n]) for n in lengths]
            for tokens, subset in groups:
                out.append(_Run(method, variant, f"{name} b={key}", key, with_budget(template, tokens), subset))
        return out

    runs = [_Run("dense", None, "dense", None, None, samples)] if "dense" in methods else []
    # The baselines are matched to the attended tokens of the first variant.
    reference = next(iter(variants.values()))
    for method in ("sink_local", "quest"):
        if method in methods:
            runs += per_budget(method, None, method, reference)
    if "shadowkv" in methods:
        for name, template in variants.items():
            runs += per_budget("shadowkv", name, name, template)
    return runs


def _resolve_factory(models) -> tuple[Callable[[], torch.nn.Module], torch.nn.Module | None]:
    if isinstance(models, torch.nn.Module):
        # optimize() transforms in place, so ShadowKV runs get deep copies of the given model.
        return (lambda: copy.deepcopy(models)), models
    if callable(models):
        return models, None
    raise TypeError("models must be a model factory (callable returning a fresh model) or a model")


def _write_partial(output_json: str | Path, records: list[dict]) -> None:
    """Keep what is done on disk: a long CPU run cut short still leaves its records."""
    path = Path(output_json).with_suffix(".partial.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"records": records}, indent=1))


def run_eval(
    models,
    tokenizer,
    tasks: Sequence[str] = DEFAULT_TASKS,
    lengths: Sequence[int | str] = (2048, 4096, 8192),
    budgets: Sequence[int | str] = (256, 512),
    samples_per_task: int = 4,
    methods: Sequence[str] = METHODS,
    variants: Mapping[str, ShadowKVConfig] | None = None,
    optimize_fn: Callable | None = None,
    n_sink: int = 4,
    seed: int = 0,
    max_new_tokens: int | None = None,
    output_json: str | Path | None = None,
    plot_dir: str | Path | None = None,
    progress: bool = True,
    print_table: bool = True,
) -> list[dict]:
    """Score every method on the same seeded samples.

    Parameters
    ----------
    models:
        Factory returning a fresh HF causal LM (called once for dense and the baselines and
        once per ShadowKV config), or a model (used as is for dense, deep-copied per config).
    tokenizer:
        The model's tokenizer.
    tasks, lengths, samples_per_task, seed:
        Sample grid (see :func:`.tasks.make_samples`); lengths accept ``"4k"``.
    budgets:
        ShadowKV ``sparse_budget`` specs (see :func:`parse_budget`): tokens (``256``) or a
        fraction of each context length (``"1/16"``: 256 at 4k, 512 at 8k), rounded down to
        whole chunks. A fractional spec builds one ShadowKV model per length.
    methods:
        Subset of ``("dense", "shadowkv", "sink_local", "quest")``.
    variants:
        Named ShadowKV configs (see :func:`ablation_variants`), each run at every budget;
        default ``{"shadowkv": ShadowKVConfig()}``. The sink + local and Quest baselines
        attend as many prompt tokens per decode step as the first variant (Quest with its
        ``chunk_size`` as page size and its local window).
    optimize_fn:
        ``optimize_fn(model, config) -> model`` applying ShadowKV; defaults to
        :func:`shadowkv_fx.optimize`. Injectable for tests.
    n_sink:
        Sink tokens of the baseline.
    max_new_tokens:
        Overrides each task's decode budget.
    output_json, plot_dir:
        Where to write the records (JSON) and the PNG plots, if given.
    progress, print_table:
        tqdm progress bar; rich summary table.

    Returns
    -------
    list[dict]
        One record per (method, config, sample): ``method``, ``variant``, ``label``,
        ``budget`` (the spec, ``256`` or ``"1/16"``; labels and tables group by it),
        ``sparse_budget`` (resolved, whole chunks), ``attended_tokens``, ``context_tokens``, ``attended_fraction``,
        ``task``, ``length``, ``index``, ``depth``, ``score``, ``prediction``,
        ``references``, ``config``, ``n_sink``, ``seconds``.
    """
    from tqdm.auto import tqdm

    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)}; known: {METHODS}")
    missing = [t for t in tasks if t not in TASKS]
    if missing:
        raise ValueError(f"unknown task(s) {missing}; known: {sorted(TASKS)}")
    factory, given_model = _resolve_factory(models)
    optimize_fn = optimize_fn or default_optimize
    variants = dict(variants or {"shadowkv": ShadowKVConfig()})
    lengths = [parse_length(length) for length in lengths]
    samples = [s for t in tasks for n in lengths for s in make_samples(t, tokenizer, n, samples_per_task, seed=seed)]

    for spec in budgets:
        parse_budget(spec)  # fail before any model is built
    runs = _plan_runs(methods, variants, budgets, samples)

    records: list[dict] = []
    bar = tqdm(total=sum(len(run.samples) for run in runs), disable=not progress, desc="eval", unit="sample")
    dense_model = None
    try:
        for method, variant, label, budget, config, run_samples in runs:
            if method == "shadowkv":
                # Dense runs come first: drop that copy before building the next one.
                model = dense_model = None
                model = optimize_fn(factory(), config)
            else:
                if dense_model is None:
                    dense_model = given_model if given_model is not None else factory()
                model = dense_model
            sink = n_sink if method == "sink_local" else None
            for sample in run_samples:
                bar.set_postfix_str(f"{label} {sample.task} {sample.target_length}")
                context = sample.num_tokens
                attended, generate_fn = context, _dense_generate
                if method != "dense":
                    attended = shadowkv_attended_tokens(config, context)
                if method == "sink_local":
                    window = sink_local_window_for_budget(attended, sink)
                    generate_fn = functools.partial(sink_local_generate, n_sink=sink, window=window)
                elif method == "quest":
                    quest = QuestAttention(attended, config.chunk_size, config.local_chunks)
                    attended = quest.attended_tokens(context)
                    generate_fn = functools.partial(
                        quest_generate, token_budget=quest.token_budget, page_size=quest.page_size,
                        local_pages=quest.local_pages,
                    )  # fmt: skip
                start = time.perf_counter()
                prediction = _generate(model, tokenizer, sample, max_new_tokens or sample.max_new_tokens, generate_fn)
                records.append(
                    {
                        "method": method,
                        "variant": variant,
                        "label": label,
                        "budget": budget,
                        "sparse_budget": None if config is None else config.sparse_budget,
                        "attended_tokens": attended,
                        "context_tokens": context,
                        "attended_fraction": attended / context,
                        "task": sample.task,
                        "length": sample.target_length,
                        "index": sample.index,
                        "depth": sample.depth,
                        "score": score_prediction(sample.task, prediction, sample.references),
                        "prediction": prediction,
                        "references": sample.references,
                        "config": None if config is None else config.to_dict(),
                        "n_sink": sink,
                        "seconds": time.perf_counter() - start,
                    }
                )
                bar.update()
                if output_json is not None:
                    _write_partial(output_json, records)
            if method == "shadowkv":
                del model
    finally:
        bar.close()

    if output_json is not None:
        meta = {"tasks": list(tasks), "lengths": lengths, "budgets": [budget_key(b) for b in budgets], "samples_per_task": samples_per_task,
                "seed": seed, "methods": list(methods), "variants": {k: v.to_dict() for k, v in variants.items()},
                "n_sink": n_sink}  # fmt: skip
        path = Path(output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
        path.with_suffix(".partial.json").unlink(missing_ok=True)  # results.json holds it all now
    if plot_dir is not None:
        from .plots import plot_all

        plot_all(records, plot_dir)
    if print_table:
        print_results_table(records)
    return records
