"""RULER's scoring: substring matching of the references in the prediction.

RULER deliberately avoids exact match: a model that answers "The number is
1234567." is right. ``string_match_all`` rewards each reference found (needle,
variable tracking, word extraction), ``string_match_part`` any one of them (QA).
Scores are in ``[0, 1]``; RULER reports them x100.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

from .intensive_scoring import INTENSIVE_METRICS

__all__ = [
    "postprocess_prediction",
    "string_match_all",
    "string_match_part",
    "metric_for_task",
    "score_prediction",
]

_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")


def postprocess_prediction(prediction: str) -> str:
    """Replace control characters by newlines and strip, as RULER does before matching."""
    return _CONTROL_CHARS.sub("\n", prediction).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of ``references`` found in ``prediction`` (case-insensitive).

    Parameters
    ----------
    prediction:
        Generated text.
    references:
        Expected strings; an empty list scores 0.

    Returns
    -------
    float
        In ``[0, 1]``.
    """
    if not references:
        return 0.0
    text = postprocess_prediction(prediction).lower()
    return sum(ref.lower() in text for ref in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1.0 if any of ``references`` is found in ``prediction`` (case-insensitive), else 0.0."""
    text = postprocess_prediction(prediction).lower()
    return float(any(ref.lower() in text for ref in references))


def metric_for_task(task: str) -> Callable[[str, Sequence[str]], float]:
    """RULER's metric for a task name: ``string_match_part`` for QA, ``string_match_all`` otherwise;
    the context-intensive families score structure (:mod:`.intensive_scoring`).

    Parameters
    ----------
    task:
        Task name, e.g. ``"niah_multikey_2"``, ``"vt"``, ``"qa_1"``.
    """
    if task in INTENSIVE_METRICS:
        return INTENSIVE_METRICS[task]
    return string_match_part if task.startswith("qa") else string_match_all


def score_prediction(task: str, prediction: str, references: Sequence[str]) -> float:
    """Score ``prediction`` with the task's RULER metric."""
    return metric_for_task(task)(prediction, references)
