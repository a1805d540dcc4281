"""The main job on the embedded default: one long needle prompt, dense vs ShadowKV, side by side."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

import shadowkv_fx
from shadowkv_fx import compat
from shadowkv_fx.evaluation.scoring import score_prediction
from shadowkv_fx.evaluation.tasks import make_sample


@dataclass
class RunResult:
    method: str
    answer: str
    score: float
    cache_device_bytes: int
    cache_host_bytes: int
    prefill_s: float
    decode_tok_s: float


def greedy_decode(model, ids: torch.Tensor, new_tokens: int, cache) -> tuple[torch.Tensor, float, float]:
    """Prefill then greedy decode step by step; returns (tokens, prefill seconds, decode tokens/s)."""
    with torch.no_grad():
        start = time.perf_counter()
        out = model(ids, **{compat.CACHE_ARG: cache}, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - start
        token = out.logits[:, -1:].argmax(-1)
        tokens = [token]
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(token, **{compat.CACHE_ARG: compat.output_cache(out)}, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
        decode = time.perf_counter() - start
    return torch.cat(tokens, 1), prefill, (new_tokens - 1) / max(decode, 1e-9)


def dense_cache_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def run_demo(model, tokenizer, length: int, config: shadowkv_fx.ShadowKVConfig, new_tokens: int = 12,
             depth: float = 0.5, seed: int = 0, progress=None) -> tuple[object, list[RunResult]]:
    """Needle retrieval at ``length`` tokens with the dense model and its ShadowKV copy."""
    say = progress or (lambda msg: None)
    sample = make_sample("niah_single_1", tokenizer, length, seed=seed, depth=depth)
    ids = tokenizer(sample.prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
    results = []
    say(f"dense: prefill {ids.shape[1]} tokens and decode {new_tokens}")
    cache = DynamicCache(config=model.config)
    tokens, prefill, speed = greedy_decode(model, ids, new_tokens, cache)
    answer = tokenizer.decode(tokens[0], skip_special_tokens=True)
    results.append(RunResult("dense", answer, score_prediction(sample.task, answer, sample.references),
                             dense_cache_bytes(cache), 0, prefill, speed))
    del cache
    say("ShadowKV: tracing the model (FX pass)")
    fast = shadowkv_fx.optimize(copy.deepcopy(model), config)
    say(f"ShadowKV: prefill + compress {ids.shape[1]} tokens and decode {new_tokens}")
    greedy_decode(fast, ids[:, : min(ids.shape[1], 4 * config.min_sparse_prompt)], 3, None)  # warm the graphs
    cache = fast._shadowkv.new_cache()
    tokens, prefill, speed = greedy_decode(fast, ids, new_tokens, cache)
    answer = tokenizer.decode(tokens[0], skip_special_tokens=True)
    report = cache.memory_report()
    results.append(RunResult("shadowkv", answer, score_prediction(sample.task, answer, sample.references),
                             sum(report["gpu"].values()), sum(report["cpu"].values()), prefill, speed))
    return sample, results
