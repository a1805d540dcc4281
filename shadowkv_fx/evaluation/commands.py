"""The ``shadowkv-fx eval`` and ``shadowkv-fx merge`` commands: string arguments in, result files out."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated

import torch
import typer

from .results import print_results_table
from .runner import DEFAULT_TASKS, METHODS, default_optimize, ablation_variants, run_eval
from .tasks import TASKS

# under the current directory, never the repository's committed eval_results/
DEFAULT_OUT_DIR = "shadowkv-eval-results"


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


_TASK_HELP = ", ".join(f"{name} ({spec.description})" for name, spec in TASKS.items())


def eval_command(
    model: Annotated[str, typer.Option(help="'smollm2' (the embedded SmolLM2-135M-Instruct) or a local Hugging Face model "
                                  "directory (no hub access)")] = "smollm2",
    tasks: Annotated[str, typer.Option(help=f"comma-separated tasks, of: {_TASK_HELP}. Default: all but "
                                       f"{' and '.join(sorted(set(TASKS) - set(DEFAULT_TASKS)))}",
                                       show_default=False)] = ",".join(DEFAULT_TASKS),
    lengths: Annotated[str, typer.Option(help="comma-separated context lengths (prompt + answer): tokens (4096) or k = 1024 "
                                    "tokens (4k, so 1k is 1024); SmolLM2's context is 8k")] = "2k,4k,8k",
    budgets: Annotated[str, typer.Option(help="comma-separated ShadowKV sparse_budget specs: tokens (256) or a fraction of "
                                    "each context length (1/16: 256 tokens at 4k), rounded down to whole "
                                    "chunks")] = "256,512",
    samples: Annotated[int, typer.Option(help="prompts per task and length (needle depths evenly cover 0..1)")] = 4,
    methods: Annotated[str, typer.Option(help=f"comma-separated, of: {', '.join(METHODS)}; sink_local and quest attend as "
                                    "many prompt tokens per step as ShadowKV at each budget")] = ",".join(METHODS),
    ablation: Annotated[str, typer.Option(help="'' (none), 'rank' (32/64/160), 'chunk' (4/8/16), 'outliers' (0 vs 48), "
                                     "'bits' (8-bit values and landmarks, each on and off) or 'selection' (landmarks "
                                     "vs 4-bit key codes, at chunk 8 and at chunk 4 + 128 local tokens), each at every "
                                     "budget")] = "",
    n_sink: Annotated[int, typer.Option(help="attention-sink tokens of the sink_local baseline")] = 4,
    seed: Annotated[int, typer.Option(help="seed of the generated prompts: the same seed gives the same prompts")] = 0,
    out_dir: Annotated[str, typer.Option(help="folder for results.json and the PNG plots, relative to the current "
                                    "directory")] = DEFAULT_OUT_DIR,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    cuda_graphs: Annotated[bool, typer.Option(help="replay each ShadowKV decode step as one CUDA graph (GPU only)")] = False,
    plots: Annotated[bool, typer.Option(help="draw the PNG plots (--no-plots: JSON and table only)")] = True,
) -> list[dict]:
    """String-argument entry point for the ``shadowkv-fx eval`` CLI command.

    ``model`` is ``"smollm2"`` (the embedded SmolLM2-135M-Instruct) or a local Hugging
    Face model directory. ``budgets`` is comma-separated specs: tokens (``256``) or
    fractions of each context length (``1/16``). Writes ``results.json`` and the plots
    into ``out_dir`` (default ``./shadowkv-eval-results``, under the current directory); a finished
    run leaves no ``results.partial.json``. ``cuda_graphs`` replays ShadowKV decode steps as CUDA graphs (GPU only);
    ``plots=False`` skips the PNGs (``plot_all`` on the JSON draws them later, where matplotlib is).
    """
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    torch_dtype = getattr(torch, dtype)
    if model == "smollm2":
        from ..smollm2 import load_smollm2

        _, tokenizer = load_smollm2(torch_dtype, device)

        def factory():
            return load_smollm2(torch_dtype, device)[0]
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)

        def factory():
            return AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).to(device).eval()

    out = Path(out_dir)
    return run_eval(
        factory,
        tokenizer,
        tasks=_csv(tasks),
        lengths=_csv(lengths),
        budgets=_csv(budgets),
        samples_per_task=samples,
        methods=_csv(methods),
        variants=ablation_variants(ablation or None),
        n_sink=n_sink,
        seed=seed,
        output_json=out / "results.json",
        plot_dir=out if plots else None,
        optimize_fn=functools.partial(default_optimize, cuda_graphs=cuda_graphs),
    )


def merge_command(out_dir: str, results: list[str]) -> list[dict]:
    """Join ``results.json`` files of one suite run in pieces (say, one process per method on a
    shared GPU) into ``out_dir``: one JSON, the table and the plots.

    Every piece must hold the same prompts for the same (task, length, index): same seed and tasks.
    """
    records: list[dict] = []
    meta: dict = {}
    prompts: dict[tuple, int] = {}
    for path in results:
        piece = json.loads(Path(path).read_text())
        for key in ("tasks", "samples_per_task", "seed"):
            if meta and piece["meta"][key] != meta[key]:
                raise ValueError(f"{path}: {key}={piece['meta'][key]!r} differs from {meta[key]!r} in the other pieces")
        meta = meta or dict(piece["meta"])
        meta["methods"] = sorted({*meta["methods"], *piece["meta"]["methods"]})
        meta["lengths"] = sorted({*meta["lengths"], *piece["meta"]["lengths"]})
        meta["budgets"] = list(dict.fromkeys([*meta["budgets"], *piece["meta"]["budgets"]]))
        for record in piece["records"]:
            sample = (record["task"], record["length"], record["index"])
            if prompts.setdefault(sample, record["context_tokens"]) != record["context_tokens"]:
                raise ValueError(f"{path}: sample {sample} has a different prompt than in the other pieces")
            records.append(record)
    meta["merged_from"] = [str(p) for p in results]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    from .plots import plot_all

    plot_all(records, out)
    print_results_table(records)
    return records
