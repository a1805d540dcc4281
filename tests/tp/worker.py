"""One rank of a tensor-parallel ShadowKV run (launched by tests/test_tensor_parallel.py).

Usage: python -m torch.distributed.run --nproc-per-node 2 tests/tp/worker.py MODEL_DIR OUT_DIR
Writes OUT_DIR/rank{r}.json: greedy tokens (and each step's logits) of dense TP, ShadowKV at full budget + full local rank,
ShadowKV compressed, and this rank's memory report.
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM

import shadowkv_fx
from shadowkv_fx.compat import output_cache


def main(model_dir: str, out_dir: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float32).eval()
    rank = int(os.environ.get("RANK", 0))
    ids = torch.load(os.path.join(model_dir, "prompt.pt"))
    mask = torch.ones_like(ids)
    args = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                output_logits=True, return_dict_in_generate=True)
    result = {"rank": rank}

    def record(name, out):
        result[name] = out.sequences.tolist()
        result[f"{name}_logits"] = [step.tolist() for step in out.logits]

    with torch.no_grad():
        record("dense", model.generate(ids, **args))
        cfg = model.config
        local_rank_full = cfg.num_key_value_heads // model.tp_size * cfg.head_dim
        full = shadowkv_fx.ShadowKVConfig(sparse_budget=4096, rank=local_rank_full, chunk_size=4, local_chunks=2,
                                          outlier_chunks=2)
        shadowkv_fx.optimize(model, full)
        record("full", model.generate(ids, **args))
        shadowkv_fx.restore(model)
        sparse = shadowkv_fx.ShadowKVConfig(sparse_budget=8, rank=8, chunk_size=4, local_chunks=1, outlier_chunks=1)
        shadowkv_fx.optimize(model, sparse)
        out = model.generate(ids, **args)
        record("sparse", out)
        cache = output_cache(out)
        result["memory"] = cache.memory_report()
        result["local_kv_heads"] = cache.layers[0].state.k_buf.shape[1]
        shadowkv_fx.restore(model)
        compiled = torch.compile(model, backend="shadowkv", options={
            "sparse_budget": 8, "rank": 8, "chunk_size": 4, "local_chunks": 1, "outlier_chunks": 1})
        record("compiled", compiled.generate(ids, **args))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    # Gloo's threads outliving the interpreter abort a rank at exit ("terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
