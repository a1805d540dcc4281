"""The ``shadowkv-fx`` console script and the eval command's help, defaults and files."""
from __future__ import annotations

import importlib
import json
import logging
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
    root, ours = logging.getLogger(), logging.getLogger("shadowkv_fx")
    monkeypatch.setattr(root, "handlers", [])  # as in a fresh interpreter
    monkeypatch.setattr(ours, "level", logging.NOTSET)
    monkeypatch.setattr(sys, "argv", ["shadowkv-fx", "--help"])
    with pytest.raises(SystemExit) as done:
        _console_script()()
    assert done.value.code == 0 and "eval" in capsys.readouterr().out, "the script runs the app"
    assert root.handlers, "a handler on the root logger: warnings and shadowkv_fx's notes reach stderr"
    assert ours.getEffectiveLevel() == logging.INFO


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
