"""Does the subspace solver (``compression.EIGEN_SOLVER = "subspace"``, the default) change answers against the full
``eigh``? The same seeded suite on SmolLM2 (CPU), once per solver, at the ranks where the subspace route applies
(rank + 16 <= W / 2, W = 192: ranks 32 and 64); prints each cell's score under both and how many answers differ.

    python benchmarks/solver_accuracy.py [--lengths 2k,4k] [--samples 4] [--budgets 1/8] [--out DIR]

``subspace_fit.py`` measures the bases' fit; this measures what a user sees, the generated answers.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from dataclasses import replace

from shadowkv_fx import ShadowKVConfig
from shadowkv_fx.evaluation import run_eval
from shadowkv_fx.evaluation.runner import DEFAULT_TASKS
from shadowkv_fx.kernels import compression
from shadowkv_fx.smollm2 import load_smollm2

SOLVERS = ("eigh", "subspace")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS + ("extract_json", "multi_needle_all", "table_convert")))
    parser.add_argument("--lengths", default="2k,4k")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--budgets", default="1/8")
    parser.add_argument("--ranks", default="32,64")
    parser.add_argument("--out")
    args = parser.parse_args()
    _, tokenizer = load_smollm2()
    variants = {f"rank={r}": replace(ShadowKVConfig(), rank=int(r)) for r in args.ranks.split(",")}
    records, default_solver = {}, compression.EIGEN_SOLVER
    for solver in SOLVERS:
        compression.EIGEN_SOLVER = solver  # read at each prefill's factorisation
        records[solver] = run_eval(lambda: load_smollm2()[0], tokenizer, tasks=args.tasks.split(","),
                                   lengths=args.lengths.split(","), budgets=args.budgets.split(","),
                                   samples_per_task=args.samples, methods=("shadowkv",), variants=variants,
                                   progress=False, print_table=False)
    compression.EIGEN_SOLVER = default_solver
    cells: dict[tuple, dict] = defaultdict(lambda: {s: [] for s in SOLVERS} | {"differ": 0})
    for eigh_row, sub_row in zip(records["eigh"], records["subspace"]):
        key = (eigh_row["variant"], eigh_row["budget"], eigh_row["length"], eigh_row["task"])
        assert key == (sub_row["variant"], sub_row["budget"], sub_row["length"], sub_row["task"]), "runs out of step"
        cells[key]["eigh"].append(eigh_row["score"])
        cells[key]["subspace"].append(sub_row["score"])
        cells[key]["differ"] += eigh_row["prediction"] != sub_row["prediction"]
    lines = [f"{'variant':<9}{'budget':>7}{'length':>7}  {'task':<18}{'eigh':>7}{'subspace':>9}{'answers differ':>16}"]
    totals = {s: [] for s in SOLVERS}
    for (variant, budget, length, task), cell in sorted(cells.items()):
        n = len(cell["eigh"])
        lines.append(f"{variant:<9}{budget!s:>7}{length:>7}  {task:<18}{100 * sum(cell['eigh']) / n:>7.1f}"
                     f"{100 * sum(cell['subspace']) / n:>9.1f}{cell['differ']:>10} of {n}")
        for s in SOLVERS:
            totals[s] += cell[s]
    differ = sum(cell["differ"] for cell in cells.values())
    lines.append(f"mean over {len(totals['eigh'])} answers: eigh {100 * sum(totals['eigh']) / len(totals['eigh']):.2f}, "
                 f"subspace {100 * sum(totals['subspace']) / len(totals['subspace']):.2f}; {differ} answers differ")
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "records.json"), "w") as f:
            json.dump(records, f, indent=1, default=str)
        with open(os.path.join(args.out, "table.txt"), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
