#!/usr/bin/env python3
"""Bytes of one prefilled document and 1, 8, 32 questions on it (issue #31), a copy each or rows of
one batch, at Llama-3.1-8B's attention shapes (bf16, 32 layers, 8 KV heads of 128) and the default ShadowKVConfig.

The cache is filled by ``random_fill.fill_random`` (sizes do not depend on the values) for a model
of 1 and of 2 layers with a tiny vocabulary and MLP (neither shapes the cache); a layer's bytes are
the difference, so 32 layers cost ``bytes(1) + 31 * (bytes(2) - bytes(1))``. Runs on the CPU, where
"device" is what a GPU would hold and "host" the offloaded values (``cache_share.distinct_bytes``).

Usage: python scripts/question_bytes.py [--context 32768] [--layers 32]
"""
from __future__ import annotations

import argparse

import torch
import transformers as T

from shadowkv_fx import ShadowKVConfig, cache_share
from shadowkv_fx.cache import ShadowKVCache
from shadowkv_fx.random_fill import fill_random

QUESTIONS = (1, 8, 32)


def llama31_8b_attention(layers: int):
    cfg = T.LlamaConfig(vocab_size=256, hidden_size=4096, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 8192})
    cfg._attn_implementation = "sdpa"
    return T.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def measure(layers: int, context: int, config: ShadowKVConfig) -> dict:
    model = llama31_8b_attention(layers)
    cache = ShadowKVCache(layers, config, tail_capacity=64)
    fill_random(model, cache, batch=1, context=context)
    return {0: cache_share.distinct_bytes([cache]), **cache_share.questions_bytes(cache, QUESTIONS),
            **{-n: b for n, b in cache_share.questions_bytes(cache, QUESTIONS, batched=True).items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    config = ShadowKVConfig()
    one, two = measure(1, args.context, config), measure(2, args.context, config)
    gib = 2**30
    print(f"document of {args.context} tokens, {args.layers} layers, {config}")
    print("questions          | device GiB | host GiB | device GiB added per question")
    for n in (0, *QUESTIONS, *(-q for q in QUESTIONS)):
        total = {side: one[n][side] + (args.layers - 1) * (two[n][side] - one[n][side]) for side in one[n]}
        alone = {side: one[0][side] + (args.layers - 1) * (two[0][side] - one[0][side]) for side in one[0]}
        added = (total["device"] - alone["device"]) / abs(n) / gib if n else 0.0
        how = "document alone" if not n else f"{abs(n)} {'in one batch' if n < 0 else 'copies'}"
        print(f"{how:18s} | {total['device'] / gib:10.3f} | {total['host'] / gib:8.3f} | {added:.4f}")


if __name__ == "__main__":
    main()
