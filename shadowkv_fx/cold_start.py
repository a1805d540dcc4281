"""Seconds from a fresh process's start to its first token, cold and with a warm compile cache.

Each point runs in a process of its own (``python -m shadowkv_fx.cold_start``), so imports, model
set-up, tracing and compiling all count, as they do for a user. "cold" starts from an empty compile
cache folder; "warm" is a second process on the folder the cold one filled.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

FORMS = ("dense", "dense-static", "optimize", "compile")


@dataclass
class ColdRow:
    form: str
    cache: str  # "cold" | "warm"
    context: int
    batch: int
    first_token_s: float  # process start -> first token (a 1-token generate() returned)
    to_token_16_s: float  # then a 16-token generate() on the same prompt (decode compiled and captured)
    new_length_s: float  # then a 1-token generate() on a prompt 1,000 tokens shorter
    cache_hits: int
    cache_misses: int
    device: str
    model_ready_s: float = 0.0  # process start -> model built on the device (imports included)
    compile_s: float = 0.0  # of the first token's time: dynamo + the backend (torch's compile_times)


def _child(form: str, context: int, batch: int, model_name: str, layers: int, cache_dir: str, start: float,
           profile: str | None = None) -> dict:
    import torch

    import shadowkv_fx
    from shadowkv_fx import bench
    from shadowkv_fx.compile_cache import cache_counters, use_compile_cache

    use_compile_cache(cache_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if model_name == "smollm2":
        from shadowkv_fx.smollm2 import load_smollm2

        model, _ = load_smollm2(torch.bfloat16 if device == "cuda" else torch.float32, device)
    else:
        model = bench.llama31_8b_random(layers, device=device)
    ready = time.time() - start
    config = shadowkv_fx.ShadowKVConfig(sparse_budget=min(2048, context // 64 * 8 or 8),
                                        rank=min(160, bench_rank(model)))
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size

    def first_tokens(length: int, new: int) -> float:
        ids = torch.randint(100, vocab - 100, (batch, length), generator=gen).to(device)
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.time()

    def set_up_and_first_token() -> float:
        nonlocal model
        if form == "optimize":
            shadowkv_fx.optimize(model, config)
        elif form == "compile":
            model = torch.compile(model, backend="shadowkv", options={**config.to_dict(), "cuda_graphs": True})
        elif form == "dense-static":
            model.generation_config.cache_implementation = "static"
        return first_tokens(context, 1)

    first = (_profiled(set_up_and_first_token, profile) if profile else set_up_and_first_token()) - start
    compiled = _compile_seconds()
    t = time.time()
    sixteen = first_tokens(context, 16) - t
    t = time.time()
    shorter = first_tokens(max(64, context - 1000), 1) - t
    counts = cache_counters()
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return asdict(ColdRow(form, "", context, batch, first, sixteen, shorter, counts["hit"], counts["miss"], name,
                          ready, compiled))


def _profiled(call, path: str) -> float:
    """``call()`` under cProfile; the 60 costliest functions (cumulative, then own time) go to ``path``, and the
    whole profile (``pstats`` form, to read with ``python -m pstats``) beside it as ``path`` + ``.prof``."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    done = profiler.runcall(call)
    text = io.StringIO()
    for order in ("cumulative", "tottime"):
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(60)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text.getvalue())
    profiler.dump_stats(path + ".prof")
    return done


def _compile_seconds() -> float:
    """Seconds dynamo spent so far in its outermost compile phase (tracing, the backend, inductor)."""
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(compilation_time_metrics.get("_compile.compile_inner", [])))


def bench_rank(model) -> int:
    from shadowkv_fx.preflight import head_shape

    _, kv_heads, head_dim = head_shape(model.config)
    return kv_heads * head_dim


def measure(forms: list[str], context: int, batch: int, model_name: str = "llama-8b", layers: int = 32,
            cache_root: str | None = None, timeout: float = 900, profile: str | None = None) -> list[ColdRow]:
    """Each form cold (empty cache folder), then warm (a second process on that folder). With ``profile`` (a
    folder) each process writes a cProfile of its first token there, as ``{form}_{cold|warm}.txt``."""
    rows = []
    for form in forms:
        folder = tempfile.mkdtemp(prefix=f"shadowkv-cold-{form}-", dir=cache_root)
        for state in ("cold", "warm"):
            start = time.time()
            cmd = [sys.executable, "-m", "shadowkv_fx.cold_start", "--child", form, "--context", str(context),
                   "--batch", str(batch), "--model", model_name, "--layers", str(layers), "--cache-dir", folder,
                   "--start", repr(start)]
            if profile:
                cmd += ["--profile", os.path.join(profile, f"{form}_{state}.txt")]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
            if done.returncode != 0:
                raise RuntimeError(f"{form} ({state}) failed:\n{done.stderr[-3000:]}")
            row = ColdRow(**{**json.loads(done.stdout.strip().splitlines()[-1]), "cache": state})
            rows.append(row)
            if form.startswith("dense"):
                break  # dense compiles nothing of ours; a warm row would repeat the cold one
    return rows


def table(rows: list[ColdRow]) -> str:
    head = ("| form | compile cache | context x batch | first token s | model ready s | of the rest, compiling s "
            "| +16 tokens s | new length s | hits / misses |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r.form} | {r.cache} | {r.context} x {r.batch} | {r.first_token_s:.1f} | "
                     f"{r.model_ready_s:.1f} | {r.compile_s:.1f} | "
                     f"{r.to_token_16_s:.1f} | {r.new_length_s:.1f} | {r.cache_hits} / {r.cache_misses} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", choices=FORMS)
    parser.add_argument("--forms", default=",".join(FORMS))
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--model", default="llama-8b", help="'llama-8b' (random 8B shape) or 'smollm2'")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--cache-dir")
    parser.add_argument("--start", type=float)
    parser.add_argument("--out")
    parser.add_argument("--profile", help="a folder for each process's cProfile of its first token (child: a file)")
    args = parser.parse_args()
    if args.child:
        result = _child(args.child, args.context, args.batch, args.model, args.layers, args.cache_dir, args.start,
                        args.profile)
        print(json.dumps(result))
        return
    rows = measure(args.forms.split(","), args.context, args.batch, args.model, args.layers, profile=args.profile)
    text = table(rows)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "cold_start.json"), "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
        with open(os.path.join(args.out, "cold_start.md"), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
