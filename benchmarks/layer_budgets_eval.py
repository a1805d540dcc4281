"""Per-layer budgets against the uniform one on SmolLM2 (issue #32), same total, same prompts.

Calibrates ``evaluation.layer_budgets.allocate`` on prompts the evaluation never scores (sample
index ``--calibration-index`` of each task), then scores ``shadowkv`` (uniform) and ``per-layer``
(``layer_budgets``) on samples 0..N-1 of the tasks, at one length and one budget. ``--chunk-size``
scores both on finer (or coarser) landmarks at the default's dense tokens.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/layer_budgets_eval.py --out DIR
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from shadowkv_fx import ShadowKVConfig, load_smollm2
from shadowkv_fx.config import default_windows
from shadowkv_fx.evaluation.budgets import resolve_budget, with_budget
from shadowkv_fx.evaluation.layer_budgets import allocate
from shadowkv_fx.evaluation.runner import run_eval
from shadowkv_fx.evaluation.tasks import make_sample, parse_length, prompt_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="extract_json,multi_needle_all,table_convert,niah_multikey_1,niah_multivalue,vt")
    parser.add_argument("--length", default="2k")
    parser.add_argument("--budget", default="1/16")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--calibration-index", type=int, default=100)
    parser.add_argument("--chunk-size", type=int, default=ShadowKVConfig().chunk_size)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_smollm2()
    tasks = args.tasks.split(",")
    base = ShadowKVConfig(chunk_size=args.chunk_size, **default_windows(args.chunk_size))
    uniform = with_budget(base, resolve_budget(args.budget, parse_length(args.length)))
    tokens = uniform.sparse_budget
    calibration = [prompt_ids(tokenizer, make_sample(t, tokenizer, args.length, index=args.calibration_index).prompt)
                   for t in tasks]
    budgets = allocate(model, calibration, uniform)
    print(f"uniform {tokens} tokens x {len(budgets)} layers = {tokens * len(budgets)}; per layer: {list(budgets)} "
          f"(sum {sum(budgets)})", flush=True)
    (args.out / "layer_budgets.json").write_text(json.dumps({"uniform": tokens, "layer_budgets": list(budgets),
                                                             "calibration_index": args.calibration_index,
                                                             "tasks": tasks, "chunk_size": base.chunk_size}, indent=1))
    per_layer = dataclasses.replace(uniform, layer_budgets=budgets)
    run_eval(lambda: load_smollm2()[0], tokenizer, tasks=tasks, lengths=[args.length], budgets=[tokens],
             samples_per_task=args.samples, methods=["shadowkv"], variants={"uniform": uniform, "per-layer": per_layer},
             output_json=args.out / "results.json")


if __name__ == "__main__":
    main()
