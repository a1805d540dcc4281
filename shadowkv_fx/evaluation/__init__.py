"""Offline RULER-style accuracy suite: dense vs ShadowKV vs sink + local window and Quest baselines.

Typical use::

    from shadowkv_fx.evaluation import run_eval
    records = run_eval(model_factory, tokenizer, tasks=["niah_single_1", "vt"],
                       lengths=["2k", "4k"], budgets=[256, "1/16"], samples_per_task=4,
                       output_json="eval/results.json", plot_dir="eval")
"""
from .baselines import SinkLocalCache, SinkLocalLayer, sink_local_generate, sink_local_window_for_budget
from .budgets import parse_budget, resolve_budget
from .multiturn import (
    Conversation,
    MultiTurnSample,
    converse,
    make_multiturn_sample,
    make_multiturn_samples,
    run_multiturn_sample,
)
from .quest import QuestAttention, quest_generate
from .commands import eval_command
from .results import print_results_table, summarize
from .runner import DEFAULT_TASKS, ablation_variants, run_eval, shadowkv_attended_tokens
from .scoring import metric_for_task, score_prediction, string_match_all, string_match_part
from .tasks import TASKS, TaskSample, make_sample, make_samples, parse_length

__all__ = [
    "Conversation",
    "DEFAULT_TASKS",
    "MultiTurnSample",
    "QuestAttention",
    "TASKS",
    "SinkLocalCache",
    "SinkLocalLayer",
    "TaskSample",
    "ablation_variants",
    "converse",
    "eval_command",
    "make_sample",
    "make_multiturn_sample",
    "make_multiturn_samples",
    "make_samples",
    "metric_for_task",
    "parse_budget",
    "parse_length",
    "print_results_table",
    "quest_generate",
    "resolve_budget",
    "run_multiturn_sample",
    "run_eval",
    "score_prediction",
    "shadowkv_attended_tokens",
    "sink_local_generate",
    "sink_local_window_for_budget",
    "string_match_all",
    "string_match_part",
    "summarize",
]
