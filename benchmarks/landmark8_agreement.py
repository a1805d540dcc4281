"""How often int8 landmarks (``landmark_bits=8``) change the chunks a decode step picks (issue #26).

For real prompts of the offline suite on SmolLM2 (CPU), one dense prefill each through
``layer_diagnostics``: per layer and KV head, the share of the top-k chunks picked from bf16/fp32
landmarks that int8 landmarks pick as well (``landmark8_overlap``), the share of queries whose pick
is unchanged (``landmark8_same_set``), next to the exact-attention recall of the bf16 pick.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/landmark8_agreement.py --out DIR
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from shadowkv_fx import ShadowKVConfig, load_smollm2
from shadowkv_fx.evaluation.budgets import resolve_budget, with_budget
from shadowkv_fx.evaluation.diagnostics import layer_diagnostics
from shadowkv_fx.evaluation.tasks import make_sample, parse_length, prompt_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="niah_single_2,niah_multikey_1,vt,extract_json")
    parser.add_argument("--lengths", default="4k")
    parser.add_argument("--budgets", default="1/16,1/8")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_smollm2()
    rows, lines = [], []
    for task in args.tasks.split(","):
        for length in args.lengths.split(","):
            for index in range(args.samples):
                sample = make_sample(task, tokenizer, length, index=index)
                ids = prompt_ids(tokenizer, sample.prompt)
                for budget in args.budgets.split(","):
                    # the suite's rule: the budget of the nominal length, in whole chunks
                    config = with_budget(ShadowKVConfig(), resolve_budget(budget, parse_length(length)))
                    start = time.perf_counter()
                    found = layer_diagnostics(model, ids, config, queries=args.queries)
                    for r in found:
                        r.update(task=task, length=length, index=index, budget=budget, tokens=ids.shape[1])
                    rows += found
                    mean = lambda k: sum(r[k] for r in found) / len(found)  # noqa: E731
                    worst = min(found, key=lambda r: r["landmark8_overlap"])
                    line = (f"{task:<16} {length} #{index} budget {budget:>4} ({config.sparse_budget} tokens, "
                            f"k={found[0]['select_chunks']}): int8 keeps {mean('landmark8_overlap'):.1%} of the "
                            f"picked chunks, the whole pick for {mean('landmark8_same_set'):.1%} of queries; "
                            f"worst layer {worst['layer']} head {worst['kv_head']} {worst['landmark8_overlap']:.1%}; "
                            f"exact-mass recall of the pick: bf16 {mean('mass_recall'):.4f}, int8 {mean('landmark8_mass_recall'):.4f} "
                            f"({time.perf_counter() - start:.0f} s)")
                    print(line, flush=True)
                    lines.append(line)
    for budget in args.budgets.split(","):
        mine = [r for r in rows if r["budget"] == budget]
        lines.append(f"all prompts, budget {budget}: overlap {sum(r['landmark8_overlap'] for r in mine) / len(mine):.2%}, "
                     f"same set {sum(r['landmark8_same_set'] for r in mine) / len(mine):.2%}, exact-mass recall "
                     f"bf16 {sum(r['mass_recall'] for r in mine) / len(mine):.4f} int8 "
                     f"{sum(r['landmark8_mass_recall'] for r in mine) / len(mine):.4f} "
                     f"({len(mine)} layer-head rows)")
        print(lines[-1])
    (args.out / "landmark8_agreement.json").write_text(json.dumps(rows, indent=1))
    (args.out / "landmark8_agreement.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
