"""RULER scoring on hand-made predictions."""
from __future__ import annotations

import pytest

from shadowkv_fx.evaluation.scoring import (
    metric_for_task,
    postprocess_prediction,
    score_prediction,
    string_match_all,
    string_match_part,
)


def test_string_match_all_counts_each_reference_case_insensitively():
    assert string_match_all(" 1234567.", ["1234567"]) == 1.0
    assert string_match_all("The numbers are 111, 222 and 999.", ["111", "222", "333", "444"]) == 0.5
    assert string_match_all("Hollow-Orchid", ["hollow-orchid"]) == 1.0
    assert string_match_all("nothing here", ["1234567"]) == 0.0
    assert string_match_all("anything", []) == 0.0


def test_string_match_part_needs_any_reference():
    assert string_match_part("Paris is the capital.", ["paris", "Lyon"]) == 1.0
    assert string_match_part("Rome", ["paris", "Lyon"]) == 0.0
    assert string_match_part("anything", []) == 0.0


def test_substring_semantics_are_ruler_lenient():
    # RULER matches substrings, so a longer number containing the reference still counts.
    assert string_match_all("12345678", ["1234567"]) == 1.0
    # ... but a partially generated answer does not.
    assert string_match_all("123456", ["1234567"]) == 0.0


def test_postprocess_replaces_control_characters_and_strips():
    assert postprocess_prediction("\t 42\x00x \n") == "42\nx"
    assert string_match_all("12\x003", ["123"]) == 0.0


@pytest.mark.parametrize(
    "task, metric",
    [
        ("niah_single_1", string_match_all),
        ("niah_multiquery", string_match_all),
        ("niah_multivalue", string_match_all),
        ("vt", string_match_all),
        ("cwe", string_match_all),
        ("fwe", string_match_all),
        ("qa_1", string_match_part),
        ("qa_2", string_match_part),
    ],
)
def test_metric_per_task_follows_ruler(task, metric):
    assert metric_for_task(task) is metric


def test_score_prediction_dispatches():
    refs = ["ABCDE", "FGHIJ"]
    assert score_prediction("vt", "they are: ABCDE", refs) == 0.5
    assert score_prediction("qa_1", "they are: ABCDE", refs) == 1.0
