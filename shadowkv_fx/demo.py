"""The main job on the embedded default: one long needle prompt, dense vs ShadowKV, side by side."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

import shadowkv_fx
from shadowkv_fx import compat
from shadowkv_fx.cache import device_and_host_bytes
from shadowkv_fx.evaluation.scoring import score_prediction
from shadowkv_fx.evaluation.tasks import make_sample


@dataclass
class RunResult:
    """One method's run; bytes are per sequence of the batch.

    ``device_bytes`` is what the model's device holds (GPU memory on a GPU; on a CPU, what a GPU
    would hold), ``host_bytes`` the values offloaded to host memory (on a CPU the same RAM).
    """

    method: str
    answer: str
    score: float
    device_bytes: int
    host_bytes: int
    dense_kv_bytes: int
    prefill_s: float
    decode_tok_s: float


def greedy_decode(model, ids: torch.Tensor, new_tokens: int, cache) -> tuple[torch.Tensor, float, float]:
    """Prefill ``ids [B, T]`` then greedy decode step by step; returns (tokens ``[B, new_tokens]``,
    prefill seconds, decode tokens/s over the batch)."""
    sync = torch.cuda.synchronize if ids.device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        start = time.perf_counter()
        out = model(ids, **{compat.CACHE_ARG: cache}, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        sync()
        prefill = time.perf_counter() - start
        tokens = [token]
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(token, **{compat.CACHE_ARG: compat.output_cache(out)}, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
        sync()
        decode = time.perf_counter() - start
    return torch.cat(tokens, 1), prefill, ids.shape[0] * (new_tokens - 1) / max(decode, 1e-9)


def dense_cache_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def run_demo(model, tokenizer, length: int, config: shadowkv_fx.ShadowKVConfig, new_tokens: int = 12,
             depth: float = 0.5, seed: int = 0, progress=None, batch: int = 1,
             cuda_graphs: bool = False) -> tuple[object, list[RunResult]]:
    """Needle retrieval at ``length`` tokens with the dense model and its ShadowKV copy, on a batch
    of ``batch`` copies of the prompt (answers and scores are the first row's)."""
    say = progress or (lambda msg: None)
    sample = make_sample("niah_single_1", tokenizer, length, seed=seed, depth=depth)
    ids = tokenizer(sample.prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
    ids = ids.expand(batch, -1).contiguous()
    results = []
    say(f"dense: prefill {batch} x {ids.shape[1]} tokens and decode {new_tokens}")
    cache = DynamicCache(config=model.config)
    tokens, prefill, speed = greedy_decode(model, ids, new_tokens, cache)
    answer = tokenizer.decode(tokens[0], skip_special_tokens=True)
    dense = dense_cache_bytes(cache) // batch
    results.append(RunResult("dense", answer, score_prediction(sample.task, answer, sample.references),
                             dense, 0, dense, prefill, speed))
    del cache
    say("ShadowKV: tracing the model (FX pass)")
    fast = shadowkv_fx.optimize(copy.deepcopy(model), config, cuda_graphs=cuda_graphs)
    say(f"ShadowKV: prefill + compress {batch} x {ids.shape[1]} tokens and decode {new_tokens}")
    greedy_decode(fast, ids[:, : min(ids.shape[1], 4 * config.min_sparse_prompt)], 3, None)  # warm the graphs
    cache = fast._shadowkv.new_cache()
    tokens, prefill, speed = greedy_decode(fast, ids, new_tokens, cache)
    answer = tokenizer.decode(tokens[0], skip_special_tokens=True)
    report = cache.memory_report()
    device, host = device_and_host_bytes(report)
    results.append(RunResult("shadowkv", answer, score_prediction(sample.task, answer, sample.references),
                             device // batch, host // batch, report["dense"]["kv"] // batch, prefill, speed))
    return sample, results


def what_it_means(results: list[RunResult], device_type: str) -> list[str]:
    """Lines that say what the numbers show on this device, and on a CPU what a GPU would hold."""
    shadowkv = next(r for r in results if r.method == "shadowkv")
    share = shadowkv.device_bytes / max(shadowkv.dense_kv_bytes, 1)
    mib = 2**20
    state = (f"{shadowkv.device_bytes / mib:.1f} MiB per sequence ({100 * share:.0f}% of the dense KV cache's "
             f"{shadowkv.dense_kv_bytes / mib:.1f} MiB for the same tokens)")
    values = f"{shadowkv.host_bytes / mib:.1f} MiB of values"
    if device_type == "cuda":
        return [f"GPU memory: ShadowKV keeps {state}; {values} are in host RAM or, where they fit, in spare GPU "
                "memory (ShadowKVConfig.value_hbm_gib)."]
    return [
        f"On a {device_type.upper()} the model's \"device\" and the \"host\" are the same RAM, so ShadowKV saves no "
        "memory here, and decoding a short context is no faster. Its gain is on a GPU at long context: the GPU "
        "keeps only the compressed state, the values go to host RAM, so more and longer sequences fit and each "
        "step reads fewer bytes.",
        f"On a GPU this cache would keep {state} in GPU memory, and {values} in host RAM (with value_hbm_gib=0, as "
        "in the paper; by default values stay in spare GPU memory where they fit).",
    ]
