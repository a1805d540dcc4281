"""How much of ShadowKV's accuracy loss is its chunk scoring (issue #32): the same decode with the
chunks chosen another way, on SmolLM2, the same prompts as a dense reference.

Modes, each in place of the landmark top-k of ``decode_step.select`` (keys, values, budget unchanged):

- ``landmarks``: ShadowKV as it is (the reference row; with ``--landmark-runs`` or ``--key-code-bits``, that knob);
- ``oracle``: the ``select_k`` chunks holding the most exact attention mass of this step's query
  over every selectable chunk's key (rebuilt from the rank-r store, rotated): the ceiling of any
  chunk scoring at this budget and rank;
- ``bounds``: Quest's per-chunk upper bound of ``q . k`` (elementwise min/max of the chunk's keys)
  in place of the mean landmark;
- ``rescoreM``: the landmarks pick ``M * select_k`` candidates, their exact mass picks the ``select_k``;
- ``radiusW``: the landmark logit raised by ``W * |q| * radius`` (the chunk's farthest key from its
  mean): a mean-plus-spread score costing one float a chunk;
- ``codesN``: the oracle's exact mass computed with N-bit per-key codes (each channel's min/max over
  a group of 32 tokens, KIVI's key layout) in place of the keys: what selection by low-bit keys
  (ParisKV, SpeCache, YAKV) wins here. At N=4 it reads as many bytes a step as chunk-4 16-bit landmarks;
  ``codesNgG``: groups of G tokens, ``g0`` one group for the whole prompt (scales a fold could reuse);
- ``pcaPcodesN``: Loki's reduction under the codes: the keys, centred, projected on their top ``P`` principal
  directions (per sequence and KV head, over the prompt's keys), rounded to N-bit codes with one min/max per
  direction (as ``codesNg0``), and the query projected alike (the centre's logit is one constant a query, which
  the softmax cancels): ``P / D`` of the codes' bytes and dot work a step;
- ``subS``: finer landmarks inside a chunk, the means of its runs of S tokens, scored as the oracle scores
  keys (each chunk's mass summed over its sub-landmarks): chunk-sized picks with S-token landmarks.

The oracle and the others read keys no decode step has (all of them), so this is a measurement,
not a method: a mode's row says what a better scorer could win, not at what cost.

``--layer-budgets MEASURE`` gives every mode per-layer budgets at the same total
(``evaluation.layer_budgets.allocate`` by ``mass_recall`` or ``coverage``), calibrated on sample index 100 of
each task, a prompt never scored; the split is written beside the results.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/selection_ceiling.py --mode oracle --out DIR
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import weakref
from pathlib import Path

import torch

from shadowkv_fx import ShadowKVConfig, decode_step, load_smollm2
from shadowkv_fx.config import default_windows
from shadowkv_fx.evaluation.budgets import resolve_budget, with_budget
from shadowkv_fx.evaluation.layer_budgets import MEASURES, allocate
from shadowkv_fx.evaluation.runner import run_eval
from shadowkv_fx.evaluation.tasks import make_sample, parse_length, prompt_ids
from shadowkv_fx.kernels import dispatch, naive

_KEYS: dict[int, tuple[tuple, torch.Tensor]] = {}  # id(state.u) -> every chunk's post-RoPE keys, once a prompt


def all_keys(state) -> torch.Tensor:
    """``[B, Hkv, C*L, D]`` float32: every selectable-or-not chunk's keys, as a step would rebuild them."""
    b, hkv, c = state.selectable.shape
    now = (state.u._version, state.sv._version, c)
    version, keys = _KEYS.get(id(state.u), (None, None))
    if keys is None or version != now:
        if state.rope_form not in ("rotate_half", "interleaved"):
            raise ValueError(f"{state.rope_form!r}: this measurement rotates keys itself, in a known RoPE form only")
        idx = torch.arange(c, device=state.u.device).expand(b, hkv, c)
        cos, sin = state.rope_tables
        keys = naive.rebuild_rope_keys(state.u, state.sv, idx, state.config.chunk_size, state.pad, cos, sin,
                                       state.rope_form, torch.float32)
        if id(state.u) not in _KEYS:
            weakref.finalize(state.u, _KEYS.pop, id(state.u), None)
        _KEYS[id(state.u)] = (now, keys)
    return keys


def step_mass(q: torch.Tensor, keys: torch.Tensor, real: torch.Tensor, chunk: int, scale: float) -> torch.Tensor:
    """Exact attention mass per chunk as a decode step would rank it: softmax over ``keys``' tokens
    where ``real``, summed per chunk and over the step's queries, max over the GQA group (the
    reduction ``score_chunks`` uses; ``selection_mass.chunk_mass`` is the prompt's causal attention
    over every key, summed over the group, which the diagnostics compare picks against).
    ``q [B, Hq, n, D]``, ``keys [B, Hkv, K*L, D]``, ``real [B, Hkv, K]`` -> ``[B, Hkv, K]``."""
    b, hq, n, d = q.shape
    hkv = keys.shape[1]
    grouped = q.float().view(b, hkv, hq // hkv, n, d)
    logits = torch.einsum("bhgnd,bhtd->bhgnt", grouped, keys) * scale
    logits = logits.masked_fill(~real.repeat_interleave(chunk, -1)[:, :, None, None, :], float("-inf"))
    probs = torch.softmax(logits, -1).nan_to_num(0.0)
    mass = probs.view(b, hkv, hq // hkv, n, -1, chunk).sum(-1).sum(3).amax(2)
    return mass.masked_fill(~real, float("-inf"))


def _reduce_like_shadowkv(logits: torch.Tensor, selectable: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-chunk logits ``[B, Hkv, G, n, C]`` to scores as ``score_chunks`` reduces its own: softmax over
    the selectable chunks, summed over the queries, max over the group; ``-inf`` where not selectable."""
    logits = (logits * scale).masked_fill(~selectable[:, :, None, None, :], float("-inf"))
    scores = torch.softmax(logits, -1).nan_to_num(0.0).sum(3).amax(2)
    return scores.masked_fill(~selectable, float("-inf"))


def bound_scores(q: torch.Tensor, keys: torch.Tensor, selectable: torch.Tensor, chunk: int, scale: float):
    """Quest's bound ``sum_d max(q_d min_d, q_d max_d)`` per chunk, then ShadowKV's reduction (softmax
    over chunks, summed over queries, max over the group). Shapes as ``step_mass``'s."""
    b, hq, n, d = q.shape
    hkv, c = selectable.shape[1:]
    grouped = q.float().view(b, hkv, hq // hkv, n, d)
    pages = keys.view(b, hkv, c, chunk, d)
    bound = (torch.einsum("bhgnd,bhcd->bhgnc", grouped.clamp(min=0), pages.amax(3))
             + torch.einsum("bhgnd,bhcd->bhgnc", grouped.clamp(max=0), pages.amin(3)))
    return _reduce_like_shadowkv(bound, selectable, scale)


def radius_scores(q: torch.Tensor, landmarks: torch.Tensor, keys: torch.Tensor, selectable: torch.Tensor, chunk: int,
                  scale: float, weight: float) -> torch.Tensor:
    """ShadowKV's scores with each chunk's logit raised by ``weight * |q| * radius``, ``radius`` the
    farthest of the chunk's keys from its landmark: by Cauchy-Schwarz ``q . k <= q . mean + |q| radius``
    for every key of the chunk, so ``weight=1`` is a bound and smaller weights lean towards the mean.
    One float a chunk and KV head beside the landmark."""
    b, hq, n, d = q.shape
    hkv, c = selectable.shape[1:]
    radius = (keys.view(b, hkv, c, chunk, d) - landmarks.float()[:, :, :, None]).norm(dim=-1).amax(-1)
    grouped = q.float().view(b, hkv, hq // hkv, n, d)
    logits = (torch.einsum("bhgnd,bhcd->bhgnc", grouped, landmarks.float())
              + weight * grouped.norm(dim=-1, keepdim=True) * radius[:, :, None, None, :])
    return _reduce_like_shadowkv(logits, selectable, scale)


def key_codes(keys: torch.Tensor, bits: int, group: int = 32) -> torch.Tensor:
    """``keys [B, Hkv, T, D]`` rounded to ``bits``-bit codes, each channel scaled by its min/max over a
    group of ``group`` tokens, and read back (T a multiple of ``group``, or the last group shorter)."""
    b, h, t, d = keys.shape
    padded = torch.nn.functional.pad(keys, (0, 0, 0, -t % group), mode="replicate") if t % group else keys
    grouped = padded.view(b, h, -1, group, d)
    low, high = grouped.amin(3, keepdim=True), grouped.amax(3, keepdim=True)
    step = ((high - low) / (2 ** bits - 1)).clamp(min=1e-8)
    codes = ((grouped - low) / step).round()
    return (codes * step + low).view(b, h, -1, d)[:, :, :t]


_PCA: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (id(keys), P, N) -> basis, codes, while the keys live


def pca_codes(keys: torch.Tensor, directions: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``keys [B, Hkv, T, D]`` -> (basis ``[B, Hkv, D, P]``, the centred keys' projections on it as ``bits``-bit codes
    with one min/max per direction, read back, ``[B, Hkv, T, P]``); once per set of keys (``all_keys`` keeps one)."""
    key = (id(keys), directions, bits)
    if key not in _PCA:
        centred = keys - keys.mean(2, keepdim=True)
        _, vectors = torch.linalg.eigh(centred.transpose(-1, -2) @ centred)  # ascending eigenvalues
        basis = vectors[..., -directions:]
        _PCA[key] = (basis, key_codes(centred @ basis, bits, keys.shape[2]))
        weakref.finalize(keys, _PCA.pop, key, None)  # as all_keys: dropped with the keys, so an id is never reused
    return _PCA[key]


def selector(mode: str):
    """A ``decode_step.select`` stand-in for ``mode``."""
    if mode == "landmarks":
        return decode_step.select
    rescore = re.fullmatch(r"rescore(\d+)", mode)
    radius = re.fullmatch(r"radius(\d*\.?\d+)", mode)
    codes = re.fullmatch(r"codes(\d+)(?:g(\d+))?", mode)
    sub = re.fullmatch(r"sub(\d+)", mode)
    pca = re.fullmatch(r"pca(\d+)codes(\d+)", mode)
    if mode not in ("oracle", "bounds") and not any((rescore, radius, codes, sub, pca)):
        raise ValueError(f"unknown mode {mode!r}: landmarks, oracle, bounds, rescoreM, radiusW, codesN[gG], subS "
                         "or pcaPcodesN")

    def select(state, q, scale):
        chunk, k = state.config.chunk_size, state.select_k
        keys = all_keys(state)
        if mode == "oracle":
            return dispatch.top_chunks(step_mass(q, keys, state.selectable, chunk, scale), k)
        if codes is not None:
            group = int(codes.group(2) or 32) or keys.shape[2]
            coded = key_codes(keys, int(codes.group(1)), group)
            return dispatch.top_chunks(step_mass(q, coded, state.selectable, chunk, scale), k)
        if pca is not None:
            basis, coded = pca_codes(keys, int(pca.group(1)), int(pca.group(2)))
            b, hq, n, d = q.shape
            grouped = q.float().view(b, basis.shape[1], hq // basis.shape[1], n, d) @ basis[:, :, None]
            projected = grouped.reshape(b, hq, n, basis.shape[-1])
            return dispatch.top_chunks(step_mass(projected, coded, state.selectable, chunk, scale), k)
        if sub is not None:
            size = int(sub.group(1))
            if chunk % size:
                raise ValueError(f"sub{size}: a chunk of {chunk} tokens is not whole runs of {size}")
            b, hkv, t, d = keys.shape
            means = keys.view(b, hkv, t // size, size, d).mean(3)
            return dispatch.top_chunks(step_mass(q, means, state.selectable, chunk // size, scale), k)
        if mode == "bounds":
            return dispatch.top_chunks(bound_scores(q, keys, state.selectable, chunk, scale), k)
        if radius is not None:
            if state.landmark_scale is not None:
                raise ValueError("radiusW reads 16-bit landmarks")
            scores = radius_scores(q, state.landmarks, keys, state.selectable, chunk, scale, float(radius.group(1)))
            return dispatch.top_chunks(scores, k)
        first = dispatch.score_chunks(q, state.landmarks, state.selectable, scale, state.landmark_scale)
        cand_idx, cand_real = dispatch.top_chunks(first, min(int(rescore.group(1)) * k, state.selectable.shape[-1]))
        tokens = (cand_idx[..., None] * chunk + torch.arange(chunk, device=q.device)).flatten(-2)
        cand_keys = keys.gather(2, tokens[..., None].expand(*tokens.shape, keys.shape[-1]))
        top = step_mass(q, cand_keys, cand_real, chunk, scale).topk(k, dim=-1).indices
        return cand_idx.gather(-1, top), cand_real.gather(-1, top)

    return select


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="oracle")
    parser.add_argument("--tasks", default="extract_json,multi_needle_all,table_convert")
    parser.add_argument("--length", default="2k")
    parser.add_argument("--budget", default="1/16")
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--chunk-size", type=int, default=4)
    parser.add_argument("--local-tokens", type=int, default=128)
    parser.add_argument("--rank", type=int, default=ShadowKVConfig().rank)
    parser.add_argument("--landmark-runs", type=int, default=1, help="ShadowKVConfig.landmark_runs (mode landmarks)")
    parser.add_argument("--key-code-bits", type=int, default=0, help="ShadowKVConfig.key_code_bits (mode landmarks)")
    parser.add_argument("--landmark-bits", type=int, default=16, help="ShadowKVConfig.landmark_bits (mode landmarks)")
    parser.add_argument("--layer-budgets", choices=MEASURES, default=None,
                        help="per-layer budgets at the same total, split by this measure (calibrated on index 100)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    decode_step.select = selector(args.mode)
    config = ShadowKVConfig(chunk_size=args.chunk_size, rank=args.rank, landmark_runs=args.landmark_runs,
                            key_code_bits=args.key_code_bits, landmark_bits=args.landmark_bits,
                            **default_windows(args.chunk_size, args.local_tokens))
    runs = f"+runs={args.landmark_runs}" if args.landmark_runs > 1 else ""
    runs += f"+keycodes={args.key_code_bits}" if args.key_code_bits else ""
    runs += f"+landmarkbits={args.landmark_bits}" if args.landmark_bits != 16 else ""
    runs += f"+layerbudgets={args.layer_budgets}" if args.layer_budgets else ""
    name = f"{args.mode}{runs}+chunk={args.chunk_size}+local={args.local_tokens}+rank={args.rank}"
    args.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_smollm2()  # one load: the calibration's model, and the tokenizer for both
    if args.layer_budgets:
        uniform = with_budget(config, resolve_budget(args.budget, parse_length(args.length)))
        calibration = [prompt_ids(tokenizer, make_sample(t, tokenizer, args.length, index=100).prompt)
                       for t in args.tasks.split(",")]
        budgets = allocate(model, calibration, uniform, measure=args.layer_budgets)
        config = dataclasses.replace(config, layer_budgets=budgets)
        print(f"per-layer budgets ({args.layer_budgets}): {list(budgets)}, sum {sum(budgets)} = "
              f"{uniform.sparse_budget} x {len(budgets)}", flush=True)
        (args.out / f"layer_budgets_{args.layer_budgets}_{args.length}.json").write_text(json.dumps(
            {"uniform": uniform.sparse_budget, "layer_budgets": list(budgets), "measure": args.layer_budgets,
             "calibration_index": 100, "tasks": args.tasks.split(",")}, indent=1))
    del model  # run_eval loads its own for each variant
    run_eval(lambda: load_smollm2()[0], tokenizer, tasks=args.tasks.split(","), lengths=[args.length],
             budgets=[args.budget], samples_per_task=args.samples, methods=["shadowkv"],
             variants={name: config},
             output_json=args.out / f"{args.mode}{runs.replace('+', '_')}_{args.length}_rank{args.rank}.json")


if __name__ == "__main__":
    main()
