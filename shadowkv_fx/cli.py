"""``shadowkv-fx``: demo, generate and eval on the embedded default model or a local one."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from pathlib import Path

# before CUDA starts: a batch's state, values and prefill temporaries of many sizes fragment the
# caching allocator's fixed segments (measured on an H100: 122K x 16 ran out of memory with 58.5
# of 79.2 GiB allocated; with expandable segments it peaked at 71.2 GiB and ran), and the
# preflight keeps a quarter of the device free instead of the working set without them
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from shadowkv_fx.config import ShadowKVConfig, default_windows  # noqa: E402
from shadowkv_fx.evaluation.layer_budgets import rescaled  # noqa: E402

app = typer.Typer(add_completion=False, help="ShadowKV long-context decoding for Hugging Face models.")
console = Console(width=140)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(model: str, dtype: str, device: str):
    """``smollm2`` (the embedded default) or a local Hugging Face model directory."""
    if model == "smollm2":
        from shadowkv_fx.smollm2 import load_smollm2

        return load_smollm2(DTYPES[dtype], device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model)
    if not path.is_dir():
        raise typer.BadParameter(f"{model!r} is neither 'smollm2' nor a local model directory (no hub access)")
    tok = AutoTokenizer.from_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(device).eval(), tok


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@app.command()
def demo(
    model: str = typer.Option("smollm2", help="'smollm2' (embedded) or a local model directory"),
    length: int = typer.Option(None, help="prompt + answer tokens; default 4096 on a CPU, 8192 (SmolLM2's whole "
                               "context) on a GPU"),
    batch: int = typer.Option(None, help="copies of the prompt decoded together; default 1 on a CPU, 8 on a GPU"),
    sparse_budget: int = 256,
    rank: int = 160,
    chunk_size: int = 8,
    local_chunks: int = 4,
    outlier_chunks: int = 12,
    new_tokens: int = 12,
    depth: float = 0.5,
    dtype: str = "float32",
    device: str = "cuda" if torch.cuda.is_available() else "cpu",
) -> None:
    """Needle retrieval on a long prompt: dense vs ShadowKV answers, cache memory and decode speed."""
    from shadowkv_fx.demo import run_demo, what_it_means

    on_gpu = torch.device(device).type == "cuda"
    # on a GPU, the setting where ShadowKV's gain shows: the whole context, several sequences,
    # decode steps replayed as CUDA graphs
    length = length or (8192 if on_gpu else 4096)
    batch = batch or (8 if on_gpu else 1)
    config = ShadowKVConfig(sparse_budget=sparse_budget, rank=rank, chunk_size=chunk_size,
                            local_chunks=local_chunks, outlier_chunks=outlier_chunks)
    with console.status("loading model") as status:
        lm, tokenizer = load_model(model, dtype, device)
        sample, results = run_demo(lm, tokenizer, length, config, new_tokens, depth, batch=batch, cuda_graphs=on_gpu,
                                   progress=lambda msg: status.update(msg))
    console.print(f"prompt: {sample.num_tokens} tokens x {batch}, needle at depth {sample.depth}, "
                  f"expected {sample.references}")
    console.print(f"ShadowKV: {config}")
    where = "GPU" if on_gpu else "device (GPU on a GPU)"
    table = Table("method", "answer", "score", f"cache on {where} / seq", "cache in host RAM / seq", "prefill s",
                  "decode tok/s")
    for r in results:
        table.add_row(r.method, repr(r.answer.strip()), f"{100 * r.score:.0f}%", _mib(r.device_bytes),
                      _mib(r.host_bytes), f"{r.prefill_s:.2f}", f"{r.decode_tok_s:.1f}")
    console.print(table)
    for line in what_it_means(results, torch.device(device).type):
        console.print(line)


@app.command()
def generate(
    prompt_file: Path = typer.Argument(..., exists=True, help="text file holding the prompt"),
    model: str = "smollm2",
    max_new_tokens: int = 64,
    sparse_budget: int = 2048,
    rank: int = 160,
    chat: bool = typer.Option(True, help="wrap the prompt in the tokenizer's chat template"),
    dtype: str = "float32",
    device: str = "cuda" if torch.cuda.is_available() else "cpu",
) -> None:
    """Generate from a long prompt file with ShadowKV."""
    import shadowkv_fx

    lm, tokenizer = load_model(model, dtype, device)
    text = prompt_file.read_text()
    if chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not chat).to(lm.device)
    shadowkv_fx.optimize(lm, ShadowKVConfig(sparse_budget=sparse_budget, rank=rank))
    with torch.no_grad(), console.status(f"generating from {ids.input_ids.shape[1]} prompt tokens"):
        out = lm.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    console.print(tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True))


def _register_eval() -> None:
    from shadowkv_fx.evaluation.commands import eval_command, merge_command

    app.command("eval", help="Accuracy suite: dense vs ShadowKV vs the sink + local and Quest baselines on "
                "RULER-style tasks generated offline; writes results.json, a table and PNG plots.")(eval_command)
    app.command("eval-merge", help="Join results.json files of one suite run in pieces: JSON, table, plots.")(merge_command)


_register_eval()


def main() -> None:
    """The ``shadowkv-fx`` console script: set logging up, then run the app.

    Warnings (shadowkv_fx's among them: a prompt too short to compress) reach stderr, and so does
    the note that the embedded model is being exported once (~12 s); INFO chatter (pass reports)
    does not.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("shadowkv_fx.smollm2").setLevel(logging.INFO)
    app()


def _bench_config(sparse_budget: int, rank: int, fold_chunks: int, value_hbm_gib: float | None, value_bits: int,
                  landmark_bits: int, chunk_size: int, span_neighbors: int,
                  windows: dict[str, int] | None = None, landmark_runs: int = 1,
                  key_code_bits: int = 0, layer_budgets: tuple[int, ...] | None = None) -> ShadowKVConfig:
    """The bench's ShadowKV settings; ``windows`` (``config.default_windows``; None: its default
    split at ``chunk_size``) keeps the outlier and local windows at the default's tokens together."""
    return ShadowKVConfig(sparse_budget=sparse_budget, rank=rank, fold_chunks=fold_chunks or None,
                          value_hbm_gib=value_hbm_gib, value_bits=value_bits, landmark_bits=landmark_bits,
                          chunk_size=chunk_size, span_neighbors=span_neighbors, landmark_runs=landmark_runs,
                          key_code_bits=key_code_bits, layer_budgets=layer_budgets,
                          **(default_windows(chunk_size) if windows is None else windows))


@app.command()
def bench(
    contexts: str = typer.Option("32768", help="comma-separated prompt lengths"),
    batches: str = typer.Option("4", help="comma-separated batch sizes; 'max': each method at its own largest; "
                         "'best': each method's fastest (a search up to its largest, each point a bench run)"),
    methods: str = typer.Option("dense-compiled,shadowkv", help="of dense-eager, dense-compiled, shadowkv"),
    steps: int = 16,
    layers: int = typer.Option(32, help="layers of the random Llama-3.1-8B-shaped model"),
    model_dir: Path = typer.Option(None, "--model", help="a saved model (save-random-model) instead of building one; "
                                   "under torchrun it loads with tp_plan='auto' (tensor parallel)"),
    sparse_budget: int = 2048,
    rank: int = 160,
    value_hbm_gib: float = typer.Option(-1.0, help="GiB of values kept on the GPU; -1: as many as fit; 0: none"),
    random_fill_above: int = typer.Option(-1, help="ShadowKV points with a larger batch fill the cache from random "
                                          "K/V through the compression path instead of a prefill; -1: never"),
    fill: str = typer.Option("random", help="how points above --random-fill-above fill the cache: 'random' K/V, or "
                             "'replicate': one real prefill of the first prompt compressed into every row (a real "
                             "prefill's chunk picks and value hits for the cost of one sequence)"),
    fold_chunks: int = typer.Option(16, help="ShadowKV folds the generated tail every this many chunks; 0: never"),
    value_bits: int = typer.Option(16, help="bits per stored value: 16, or 8 (int8 + per-chunk scales)"),
    landmark_bits: int = typer.Option(16, help="bits per landmark element: 16, or 8 (int8 + per-chunk scales)"),
    chunk_size: int = typer.Option(8, help="tokens per chunk (one landmark each); the outlier and local windows keep "
                                   "their default tokens (48 x 8 and 4 x 8): 4 is the finer-landmark safeguard of #32"),
    span_neighbors: int = typer.Option(0, help="a chosen chunk lifts its neighbours within this many chunks"),
    landmark_runs: int = typer.Option(1, help="landmarks per chunk, each the mean of a run of its tokens; a chunk "
                                      "scores their sum (#32's finer landmarks at the chunk's top-k and fetch)"),
    key_code_bits: int = typer.Option(0, help="4: chunks ranked by the attention mass of every key's 4-bit codes "
                                      "instead of landmarks (#32); 0: landmarks"),
    layer_budgets: Path = typer.Option(None, help="a per-layer split measured on SmolLM2 (selection_ceiling.py "
                                       "--layer-budgets' JSON), carried to this model's layers at the same total"),
    local_tokens: int = typer.Option(0, help="tokens of the local window, taken from the outlier window's (their sum "
                                     "stays the default's); 0: the default split (32 local)"),
    breakdown: bool = typer.Option(False, help="per-kernel time of one ShadowKV decode step, and steps timed alone"),
    out: Path = typer.Option(Path("bench_out"), help="folder for bench.json, bench.png and table.txt"),
    whole_graph: bool = typer.Option(False, help="ShadowKV compiles the whole forward as one graph instead of one "
                                     "decoder layer reused for every layer (regional compile, the default)"),
    requests: int = typer.Option(0, help="also: end-to-end tokens/s for this many requests of each context, served "
                                 "as static batches of each row's batch (prefill + --steps generated tokens; "
                                 "--steps 1024 for a whole generation)"),
    cold: bool = typer.Option(False, help="instead: seconds from a fresh process's start to the first token, "
                              "cold and with a warm compile cache, for dense and both ShadowKV API forms "
                              "(first context and batch only; cold_start.json and cold_start.md in --out)"),
    workload: bool = typer.Option(False, help="instead: a stream of requests of mixed prompt and output lengths served "
                                  "by transformers' continuous batching, ShadowKV continuous batching and ShadowKV "
                                  "static batches (workload.json, table.txt, workload.png in --out)"),
    workload_requests: int = 16,
    workload_min_context: int = 32768,
    workload_max_context: int = 124928,
    workload_min_output: int = 64,
    workload_max_output: int = 2048,
    workload_output_dist: str = typer.Option("uniform", help="output lengths: uniform or log-uniform in [min, max]"),
    workload_rate: float = typer.Option(0.0, help="Poisson arrivals, requests per second; 0: all at t=0"),
    workload_slots: int = typer.Option(0, help="ShadowKV slots and static batch; 0: the preflight's largest batch "
                                       "at the longest prompt and output"),
    workload_prefill_chunk: int = typer.Option(4096, help="tokens per prefill piece of ShadowKV continuous batching"),
    workload_methods: str = typer.Option("shadowkv-cb,shadowkv-static,dense-cb", help="of shadowkv-cb, "
                                         "shadowkv-static, dense-cb (run in that order)"),
    workload_seed: int = 0,
    reuse: bool = typer.Option(False, help="with --workload: many questions about a few documents of "
                               "--workload-max-context tokens, ShadowKV's prefix store against transformers' "
                               "deepcopy recipe (reuse.json, table.txt in --out)"),
    reuse_methods: str = typer.Option("shadowkv-reuse,dense-reuse", help="of shadowkv-reuse, dense-reuse (run in that "
                                      "order; the ratio line needs both)"),
    reuse_documents: int = 8,
    reuse_questions: int = typer.Option(8, help="questions per document, arriving round-robin over the documents"),
    reuse_question_min: int = 32,
    reuse_question_max: int = 64,
    reuse_output: int = typer.Option(256, help="tokens generated per question"),
    reuse_store_gib: float = typer.Option(0.0, help="the prefix store's bound in GiB of device + host memory; 0: none"),
    reuse_dense_hold_gib: float = typer.Option(0.0, help="GiB of GPU memory dense fills with held documents' KV; "
                                               "0: free memory less one copy and a prefill's working set"),
    workload_limit_s: float = typer.Option(0.0, help="a method still running after this many seconds is stopped; "
                                           "its row bounds its tokens/s; 0: no limit"),
):
    """Decode throughput, ShadowKV against dense HF (eager and compiled static cache), one run.

    One GPU, or several with `torchrun --nproc-per-node N -m shadowkv_fx.cli bench --model DIR`.
    """
    from shadowkv_fx import bench as b

    b.REGIONAL = not whole_graph
    try:
        windows = default_windows(chunk_size, local_tokens or None)
    except ValueError as refused:
        raise typer.BadParameter(str(refused)) from None
    if cold:
        from shadowkv_fx import cold_start

        if not batches.split(",")[0].isdigit():
            raise typer.BadParameter(f"--cold times one batch size: give a number to --batches, not {batches!r}")

        rows = cold_start.measure(list(cold_start.FORMS), int(contexts.split(",")[0]),
                                  int(batches.split(",")[0]), "llama-8b", layers)
        out.mkdir(parents=True, exist_ok=True)
        (out / "cold_start.json").write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
        (out / "cold_start.md").write_text(cold_start.table(rows) + "\n")
        console.print(cold_start.table(rows))
        return
    if not torch.cuda.is_available():
        raise typer.BadParameter("bench measures GPU decode: no CUDA device here")
    split = None
    if layer_budgets:  # checked with the rest of the config, before the model is built
        from transformers import AutoConfig

        depth = AutoConfig.from_pretrained(model_dir).num_hidden_layers if model_dir else layers
        measured = json.loads(layer_budgets.read_text())
        split = rescaled(measured["layer_budgets"], measured["uniform"], depth, sparse_budget, chunk_size)
    if workload:
        # the same config for both ShadowKV methods: slots keep values on the GPU only up to a given
        # size, so "as many as fit" (-1) becomes none (pinned host memory, ShadowKV's own design)
        config = _bench_config(sparse_budget, rank, fold_chunks, max(value_hbm_gib, 0.0), value_bits, landmark_bits,
                               chunk_size, span_neighbors, windows, landmark_runs, key_code_bits, split)
        settings = {"requests": workload_requests, "min_context": workload_min_context, "max_context":
                    workload_max_context, "min_output": workload_min_output, "max_output": workload_max_output,
                    "output_dist": workload_output_dist,
                    "rate": workload_rate, "slots": workload_slots or None, "prefill_chunk": workload_prefill_chunk,
                    "seed": workload_seed, "limit_s": workload_limit_s or None, "layers": layers,
                    "config": dataclasses.asdict(config)}
        if reuse:
            settings.update(methods=reuse_methods.split(","), documents=reuse_documents, questions=reuse_questions,
                            question_min=reuse_question_min, question_max=reuse_question_max, output=reuse_output,
                            store_bytes=int(reuse_store_gib * 2**30) or None, slots=workload_slots or 8,
                            hold_bytes=int(reuse_dense_hold_gib * 2**30) or None)
            _workload_reuse(settings, config, out, model_dir, layers)
        else:
            _workload(settings, config, workload_methods.split(","), out, model_dir, layers)
        return
    unknown = set(methods.split(",")) - set(b.METHODS)
    if unknown:
        raise typer.BadParameter(f"unknown methods {sorted(unknown)}; known: {b.METHODS}")
    config = _bench_config(sparse_budget, rank, fold_chunks, None if value_hbm_gib < 0 else value_hbm_gib, value_bits,
                           landmark_bits, chunk_size, span_neighbors, windows, landmark_runs, key_code_bits, split)
    model = b.load_model(model_dir) if model_dir else b.llama31_8b_random(layers)
    lead = b.is_lead_rank()
    torch.manual_seed(0)  # every tensor-parallel rank draws the same prompts
    with console.status("benchmarking") if lead else contextlib.nullcontext() as status:
        def progress(msg: str) -> None:
            if lead:
                status.update(msg)
                console.log(msg)

        rows = b.bench(model, [int(c) for c in contexts.split(",")], [x if x in ("max", "best") else int(x) for x in batches.split(",")],
                       methods.split(","), steps, config, progress=progress, with_breakdown=breakdown,
                       random_fill_above=None if random_fill_above < 0 else random_fill_above, fill=fill)
    if not lead:
        return
    out.mkdir(parents=True, exist_ok=True)
    from shadowkv_fx import bench_report

    text = bench_report.table(rows, gpus=b.world_size())
    if requests:
        from shadowkv_fx import end_to_end

        whole = end_to_end.end_to_end(rows, requests)
        text += "\n" + end_to_end.table(whole)
        (out / "end_to_end.json").write_text(json.dumps([dataclasses.asdict(e) for e in whole], indent=1))
    (out / "table.txt").write_text(text + "\n")
    (out / "bench.json").write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    bench_report.plot(rows, str(out / "bench.png"))
    console.print(text)


def _workload(settings: dict, config: ShadowKVConfig, methods: list[str], out: Path, model_dir, layers: int) -> None:
    """``bench --workload``: see ``workload_bench``."""
    from shadowkv_fx import workload_bench as wl
    from shadowkv_fx import workload_report

    try:
        requests = wl.make_requests(settings["requests"], settings["min_context"], settings["max_context"],
                                    settings["min_output"], settings["max_output"], config.chunk_size,
                                    settings["rate"], settings["seed"], settings["output_dist"])
        if set(methods) - set(wl.METHODS):
            raise ValueError(f"unknown workload methods {sorted(set(methods) - set(wl.METHODS))}; known: {wl.METHODS}")
        if settings["prefill_chunk"] < 1 or (settings["slots"] or 1) < 1 or (settings["limit_s"] or 0) < 0:
            raise ValueError("--workload-prefill-chunk and --workload-slots must be >= 1 (slots 0: the preflight's), "
                             "--workload-limit-s >= 0 (0: no limit)")
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    model = _workload_model(settings, model_dir, layers)
    with console.status("workload") as status:
        progress = _logger(status)

        def write(rows) -> str:
            return workload_report.write(out, rows, requests, settings, torch.cuda.get_device_name())

        rows = wl.run_workload(model, requests, config, settings["slots"], tuple(methods),
                               settings["prefill_chunk"], progress=progress, seed=settings["seed"], on_row=write,
                               limit_s=settings["limit_s"])
    console.print(write(rows))


def _workload_model(settings: dict, model_dir, layers: int):
    """The model a workload runs on; its command line goes into ``settings`` first."""
    import sys

    from shadowkv_fx import bench as b

    settings["command"] = "shadowkv-fx " + " ".join(sys.argv[1:])
    return b.load_model(model_dir) if model_dir else b.llama31_8b_random(layers)


def _logger(status):
    """A progress callback that shows ``msg`` in the status line and logs it."""
    def progress(msg: str) -> None:
        status.update(msg)
        console.log(msg)
    return progress


def _workload_reuse(settings: dict, config: ShadowKVConfig, out: Path, model_dir, layers: int) -> None:
    """``bench --workload --reuse``: see ``workload_reuse``."""
    from shadowkv_fx import workload_reuse as wr

    try:  # refused before the model is built
        wr.check_methods(settings["methods"])
        stream = wr.make_reuse_stream(settings["documents"], settings["questions"], settings["question_min"],
                                      settings["question_max"], settings["output"], settings["seed"])
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    model = _workload_model(settings, model_dir, layers)
    with console.status("reuse") as status:
        rows = wr.run_reuse(model, stream, settings["max_context"], config, settings["slots"],
                            settings["prefill_chunk"], settings["store_bytes"], settings["hold_bytes"],
                            methods=tuple(settings["methods"]), progress=_logger(status), seed=settings["seed"],
                            limit_s=settings["limit_s"])
    text = wr.table(rows, stream, settings["max_context"], torch.cuda.get_device_name())
    out.mkdir(parents=True, exist_ok=True)
    (out / "reuse.json").write_text(json.dumps({"settings": settings, "stream": [dataclasses.asdict(r) for r in stream],
                                                "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))
    (out / "table.txt").write_text(text + "\n")
    console.print(text)


@app.command("save-random-model")
def save_random_model(
    target: Path = typer.Argument(..., help="folder to write"),
    layers: int = typer.Option(32, help="layers of the random Llama-3.1-8B-shaped model"),
):
    """Write the bench's random Llama-3.1-8B-shaped model (bf16) to TARGET, for `bench --model` under torchrun."""
    from shadowkv_fx import bench as b

    b.llama31_8b_random(layers, device="cuda" if torch.cuda.is_available() else "cpu").save_pretrained(target)
    console.print(f"saved to {target}")


if __name__ == "__main__":
    main()
