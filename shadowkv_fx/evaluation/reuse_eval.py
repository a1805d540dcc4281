"""The suite scored two ways at sparse settings (issue #31): one fresh prompt, and the question asked
of a document compressed once (``copy.deepcopy`` of its prefilled cache).

A prompt of the suite is a document (preamble and haystack) followed by the question and the
answer prefix. ``split_at_question`` cuts its tokens where the question's line starts, so both ways
see the very same token ids: fresh, ShadowKV compresses the whole prompt and keeps its last chunks
dense; reused, it compresses the document alone and the question goes to the dense tail of a copy
(README, "One document, many questions"). Scores may differ only by what each compresses.

    python -m shadowkv_fx.evaluation.reuse_eval --tasks niah_single_2,vt --lengths 2k,4k --samples 4 \\
        --budget 1/16 --out DIR
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from .budgets import resolve_budget, with_budget
from .scoring import score_prediction
from .tasks import TaskSample, make_samples, parse_length


def split_at_question(tokenizer, sample: TaskSample) -> tuple[torch.Tensor, int]:
    """The prompt's ids ``[1, S]`` and the index of the first token of its question's line.

    Raises ValueError for a sample without a question, or one whose question is not in its prompt.
    """
    where = sample.prompt.rfind(sample.question) if sample.question else -1
    if where <= 0:
        raise ValueError(f"sample {sample.task}#{sample.index} has no question line in its prompt to split at")
    encoded = tokenizer(sample.prompt, add_special_tokens=False, return_offsets_mapping=True, return_tensors="pt")
    starts = encoded["offset_mapping"][0, :, 0]
    split = int((starts < where).sum())
    if not 0 < split < starts.numel():
        raise ValueError(f"the question of {sample.task}#{sample.index} starts at token {split} of {starts.numel()}")
    return encoded["input_ids"], split


@torch.no_grad()
def answer_both_ways(model, tokenizer, sample: TaskSample, config) -> dict:
    """Greedy answers of an optimized ``model``: the whole prompt fresh, and the question after the
    document prefilled once into a ``ShadowKVCache`` (on a deep copy, as a later question would)."""
    from shadowkv_fx import ShadowKVCache

    ids, split = split_at_question(tokenizer, sample)
    ids = ids.to(next(model.parameters()).device)
    kwargs = dict(max_new_tokens=sample.max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    fresh = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    document = ShadowKVCache(model.config.num_hidden_layers, config)
    model(ids[:, :split], past_key_values=document)
    reused = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=copy.deepcopy(document), **kwargs)
    out = {"document_tokens": split, "question_tokens": ids.shape[1] - split}
    for way, tokens in (("fresh", fresh), ("reused", reused)):
        text = tokenizer.decode(tokens[0, ids.shape[1]:], skip_special_tokens=True)
        out[way] = {"prediction": text, "score": score_prediction(sample.task, text, sample.references)}
    return out


def run(model_factory, tokenizer, tasks: list[str], lengths: list[str], samples: int, budget: str, out: Path,
        base_config=None) -> list[dict]:
    """Every sample both ways; ``results.json`` and ``table.md`` in ``out`` (written as it goes)."""
    from shadowkv_fx import ShadowKVConfig, optimize

    base = base_config or ShadowKVConfig()
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    for length in lengths:
        config = with_budget(base, resolve_budget(budget, parse_length(length)))
        tokens = config.sparse_budget
        model = optimize(model_factory(), config)
        for task in tasks:
            for sample in make_samples(task, tokenizer, length, samples):
                start = time.perf_counter()
                result = answer_both_ways(model, tokenizer, sample, config)
                records.append({"task": task, "length": length, "index": sample.index, "budget": budget,
                                "sparse_budget": tokens, "references": sample.references, **result,
                                "seconds": time.perf_counter() - start})
                (out / "results.json").write_text(json.dumps(records, indent=1))
                print(f"{task} {length} #{sample.index}: fresh {result['fresh']['score']:.2f} reused "
                      f"{result['reused']['score']:.2f}", flush=True)
        del model
    (out / "table.md").write_text(table(records) + "\n")
    return records


def table(records: list[dict]) -> str:
    """Mean score x100 per task and length, fresh against reused, and over everything."""
    def line(cells: str, rs: list[dict]) -> str:  # cells: "task | length"
        fresh, reused = (100 * sum(r[way]["score"] for r in rs) / len(rs) for way in ("fresh", "reused"))
        return f"| {cells} | {len(rs)} | {fresh:.1f} | {reused:.1f} | {reused - fresh:+.1f} |"

    lines = ["| task | length | samples | fresh | reused | reused - fresh |", "|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["task"], r["length"]), []).append(r)
    lines += [line(f"{task} | {length}", rs) for (task, length), rs in sorted(groups.items())]
    if records:
        lines.append(line("all |", records))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="niah_single_1,niah_single_2,niah_multikey_1,niah_multivalue,vt")
    parser.add_argument("--lengths", default="2k,4k")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--budget", default="1/16")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from shadowkv_fx import load_smollm2

    _, tokenizer = load_smollm2()
    records = run(lambda: load_smollm2()[0], tokenizer, args.tasks.split(","), args.lengths.split(","), args.samples,
                  args.budget, args.out)
    print(table(records))


if __name__ == "__main__":
    main()
