"""The ``shadowkv-fx`` console script and the eval command's help, defaults and files."""
from __future__ import annotations

import importlib
import json
import logging
import re
import sys
import tomllib
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from shadowkv_fx.cli import app
from shadowkv_fx.evaluation.tasks import TASKS
from tests.models import tiny_pair

REPO = Path(__file__).resolve().parents[1]


def _console_script():
    """The function pyproject's ``shadowkv-fx`` script calls."""
    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["shadowkv-fx"]
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def test_console_script_sets_logging_up_before_running_the_app(monkeypatch, capsys):
    root, ours = logging.getLogger(), logging.getLogger("shadowkv_fx.smollm2")
    monkeypatch.setattr(root, "handlers", [])  # as in a fresh interpreter
    monkeypatch.setattr(ours, "level", logging.NOTSET)
    monkeypatch.setattr(sys, "argv", ["shadowkv-fx", "--help"])
    with pytest.raises(SystemExit) as done:
        _console_script()()
    assert done.value.code == 0 and "eval" in capsys.readouterr().out, "the script runs the app"
    assert root.handlers, "a handler on the root logger: warnings and shadowkv_fx's notes reach stderr"
    assert ours.getEffectiveLevel() == logging.INFO, "the one-time export of the embedded model is announced"


def test_eval_help_documents_every_option_every_task_and_1k():
    command = typer.main.get_command(app).commands["eval"]
    undocumented = [p.name for p in command.params if not p.help]
    assert not undocumented, f"options without help: {undocumented}"
    result = CliRunner().invoke(app, ["eval", "--help"], terminal_width=400)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    missing = [name for name in TASKS if name not in text]
    assert not missing, f"tasks missing from --help: {missing}"
    assert "1k" in text
    out_dir = next(p for p in command.params if p.name == "out_dir")
    assert out_dir.default == "shadowkv-eval-results" and "current directory" in out_dir.help


def test_eval_writes_under_the_current_directory_and_leaves_no_partial_file(tokenizer, tmp_path, monkeypatch):
    model_dir = tmp_path / "tiny"
    tiny_pair("llama", vocab=len(tokenizer), max_positions=4096)[0].save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = CliRunner().invoke(app, [
        "eval", "--model", str(model_dir), "--tasks", "niah_single_1", "--lengths", "1k", "--budgets", "64",
        "--samples", "1", "--methods", "dense,sink_local", "--no-plots",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    out = work / "shadowkv-eval-results"
    records = json.loads((out / "results.json").read_text())["records"]
    assert [r["method"] for r in records] == ["dense", "sink_local"] and records[0]["length"] == 1024
    assert sorted(p.name for p in out.iterdir()) == ["results.json"], "a finished run leaves no results.partial.json"


def test_demo_on_a_cpu_says_it_is_one_ram_and_what_a_gpu_would_hold(tokenizer, tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_pair("llama", vocab=len(tokenizer), max_positions=4096)[0].save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    result = CliRunner().invoke(app, ["demo", "--model", str(model_dir), "--length", "768", "--batch", "2",
                                      "--new-tokens", "3", "--rank", "16", "--device", "cpu"], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "x 2" in text and "shadowkv" in text
    assert 'On a CPU the model\'s "device" and the "host" are the same RAM' in text
    assert "gain is on a GPU at long context" in text
    assert re.search(r"On a GPU this cache would keep \d+\.\d MiB per sequence \(\d+% of the dense KV cache's "
                     r"\d+\.\d MiB for the same tokens\) in GPU memory, and \d+\.\d MiB of values in host RAM", text), text


def test_demo_bytes_per_sequence_split_device_and_host_as_the_cache_reports(tokenizer):
    from shadowkv_fx.config import ShadowKVConfig
    from shadowkv_fx.demo import run_demo, what_it_means

    model = tiny_pair("llama", vocab=len(tokenizer), max_positions=4096)[0]
    config = ShadowKVConfig(sparse_budget=64, rank=16, outlier_chunks=4)
    sample, results = run_demo(model, tokenizer, 768, config, new_tokens=3, batch=2)
    dense, shadowkv = results
    cached = sample.num_tokens + 3 - 1  # the last token is never fed back
    per_token = model.config.num_hidden_layers * 2 * (2 * 16) * 4  # layers x K,V x 2 KV heads x 16 x float32
    assert dense.device_bytes == shadowkv.dense_kv_bytes == cached * per_token, "per sequence, not per batch"
    assert shadowkv.host_bytes > 0 and 0 < shadowkv.device_bytes
    on_gpu = what_it_means(results, "cuda")
    assert len(on_gpu) == 1 and "same RAM" not in on_gpu[0] and f"{shadowkv.device_bytes / 2**20:.1f} MiB" in on_gpu[0]


def test_bench_cold_refuses_a_batch_it_cannot_time_before_any_work():
    result = CliRunner().invoke(app, ["bench", "--cold", "--batches", "best"], terminal_width=400)
    assert result.exit_code == 2 and "give a number to --batches" in result.output


def test_bench_chunk_size_keeps_the_dense_windows_tokens():
    """--chunk-size 4 (#32's finer landmarks) changes the landmarks, not what is attended densely."""
    from shadowkv_fx.cli import _bench_config
    from shadowkv_fx.config import ShadowKVConfig

    base = ShadowKVConfig()
    finer = _bench_config(2048, 160, 16, None, 8, 8, chunk_size=4, span_neighbors=1)
    assert (finer.chunk_size, finer.span_neighbors, finer.value_bits) == (4, 1, 8)
    for name in ("outlier_chunks", "local_chunks"):
        assert getattr(finer, name) * 4 == getattr(base, name) * base.chunk_size, name
    assert _bench_config(2048, 160, 16, None, 16, 16, chunk_size=8, span_neighbors=0) == base
    with pytest.raises(ValueError, match="multiple of"):
        _bench_config(2048, 160, 16, None, 16, 16, chunk_size=3, span_neighbors=0)
    runs = _bench_config(2048, 160, 16, None, 16, 8, chunk_size=8, span_neighbors=0, landmark_runs=2)
    assert (runs.landmark_runs, runs.landmark_bits, runs.chunk_size) == (2, 8, 8)
    codes = _bench_config(2048, 160, 16, None, 16, 16, chunk_size=8, span_neighbors=0, key_code_bits=4)
    assert codes.key_code_bits == 4 and codes.landmark_runs == 1


def test_bench_local_tokens_moves_dense_tokens_from_outliers_to_the_local_window():
    """--local-tokens 128 with chunks of 4: #32's config that met dense at 8K (outliers 72 x 4, local 32 x 4)."""
    from shadowkv_fx.cli import _bench_config
    from shadowkv_fx.config import ShadowKVConfig, default_windows

    base = ShadowKVConfig()
    wide = _bench_config(2048, 160, 16, None, 16, 16, chunk_size=4, span_neighbors=0,
                         windows=default_windows(4, local_tokens=128))
    assert (wide.outlier_chunks, wide.local_chunks) == (72, 32)
    dense_tokens = (base.outlier_chunks + base.local_chunks) * base.chunk_size
    assert (wide.outlier_chunks + wide.local_chunks) * 4 == dense_tokens
    assert _bench_config(2048, 160, 16, None, 16, 16, chunk_size=8, span_neighbors=0,
                         windows=default_windows(8, local_tokens=32)) == base
    for bad in (30, dense_tokens + 8, -8):  # not a multiple of the chunk; past the dense tokens; negative
        with pytest.raises(ValueError, match="multiple of the chunk size"):
            default_windows(8, local_tokens=bad)


def test_bench_refuses_a_local_window_it_cannot_hold_before_any_work():
    result = CliRunner().invoke(app, ["bench", "--chunk-size", "4", "--local-tokens", "130"], terminal_width=400)
    assert result.exit_code == 2 and "multiple of the chunk size" in result.output
