"""Scorers of the context-intensive families (:mod:`.intensive_tasks`).

Substring matching (RULER's metric) is too lenient for structured answers: a JSON object with
the right id and a wrong age, or a TSV row with one wrong cell, should lose that field and not
the rest. ``field_f1`` matches predicted records to reference records one to one (greedily, by
fields in common) and scores the F1 of the fields; a reference answer scores 1.0. Needles and
counts are exact: a number with a wrong digit scores nothing.
"""
from __future__ import annotations

import json
import re
from typing import Callable, Sequence

from .intensive_tasks import JSON_START, TABLE_COLUMNS

__all__ = ["INTENSIVE_METRICS", "field_f1", "json_field_f1", "table_cell_f1", "needles_exact", "count_exact",
           "parse_json_records", "parse_table_rows"]

_OBJECT = re.compile(r"\{[^{}]*\}?")  # a flat object, perhaps cut off by the decode budget
_PAIR = re.compile(r'"?([A-Za-z_]\w*)"?\s*[:=]\s*("(?:[^"\\]|\\.)*"?|[^,}\s]+)')
_NUMBER_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())}


def _norm(value) -> str:
    return str(value).strip().strip('"').strip().lower()


def parse_json_records(text: str) -> list[dict[str, str]]:
    """Every flat JSON object in ``text`` as ``{field: normalised value}``.

    Objects that ``json.loads`` rejects (single quotes, a missing brace at the end of the decode
    budget, ``=`` for ``:``) are read field by field, so one typo costs one field, not the record.
    """
    records = []
    for match in _OBJECT.finditer(text):
        chunk = match.group(0)
        try:
            parsed = json.loads(chunk)
            fields = {str(k).lower(): _norm(v) for k, v in parsed.items()} if isinstance(parsed, dict) else {}
        except json.JSONDecodeError:
            fields = {k.lower(): _norm(v) for k, v in _PAIR.findall(chunk.replace("'", '"'))}
        if fields:
            records.append(fields)
    return records


def parse_table_rows(text: str, columns: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a TSV-ish answer as ``{column: normalised cell}``; header lines are skipped.

    Tabs separate cells; a line without one is split at ``|``, ``,`` or runs of two or more
    spaces, the separators a model falls back to.
    """
    header = [c.lower() for c in columns]
    rows = []
    for line in text.splitlines():
        if "\t" in line:
            cells = line.split("\t")
        else:
            cells = re.split(r"\s*\|\s*|\s*,\s*|\s{2,}", line.strip().strip("|"))
        cells = [_norm(c) for c in cells]
        if len([c for c in cells if c]) < 2 or cells[: len(header)] == header:
            continue
        rows.append(dict(zip(header, cells)))
    return rows


def field_f1(predicted: Sequence[dict], reference: Sequence[dict]) -> float:
    """F1 of the fields of ``predicted`` records against ``reference`` records.

    Each predicted record is paired with at most one reference record (the pairs sharing most
    equal fields first); a true positive is a field equal in both. Only the reference's field
    names count, so an extra field a question did not ask for costs nothing.

    Returns
    -------
    float
        In ``[0, 1]``; 0 when either side is empty.
    """
    names = {k for r in reference for k in r}
    predicted = [{k: v for k, v in r.items() if k in names} for r in predicted]
    predicted_fields = sum(len(r) for r in predicted)
    reference_fields = sum(len(r) for r in reference)
    if not predicted_fields or not reference_fields:
        return 0.0
    overlaps = sorted(
        ((sum(p.get(k) == v for k, v in ref.items()), i, j) for i, p in enumerate(predicted) for j, ref in enumerate(reference)),
        reverse=True,
    )
    used_p, used_r, hits = set(), set(), 0
    for overlap, i, j in overlaps:
        if overlap and i not in used_p and j not in used_r:
            used_p.add(i)
            used_r.add(j)
            hits += overlap
    if not hits:
        return 0.0
    precision, recall = hits / predicted_fields, hits / reference_fields
    return 2 * precision * recall / (precision + recall)


def json_field_f1(prediction: str, references: Sequence[str]) -> float:
    """``extract_json``: field F1 of the JSON objects in ``prediction`` against the reference objects.

    The prompt's answer prefix ends with :data:`.intensive_tasks.JSON_START` (``[{"id":``), so the
    generated text continues the first object: it is read after ``JSON_START``.
    """
    reference = [{k.lower(): _norm(v) for k, v in json.loads(ref).items()} for ref in references]
    return field_f1(parse_json_records(JSON_START + prediction), reference)


def table_cell_f1(prediction: str, references: Sequence[str]) -> float:
    """``table_convert``: cell F1 of the TSV rows in ``prediction`` against the reference rows.

    The reference rows are tab-separated lines in the order of
    :data:`.intensive_tasks.TABLE_COLUMNS`; the prompt's answer prefix holds the header.
    """
    reference = [dict(zip(TABLE_COLUMNS, (_norm(c) for c in ref.split("\t")))) for ref in references]
    return field_f1(parse_table_rows(prediction, TABLE_COLUMNS), reference)


def needles_exact(prediction: str, references: Sequence[str]) -> float:
    """``multi_needle_all``: fraction of the reference numbers found as whole numbers, every digit.

    A number counts only where no digit touches it, so ``12345678`` does not contain ``1234567``.
    """
    if not references:
        return 0.0
    found = set(re.findall(r"(?<!\d)\d+(?!\d)", prediction))
    return sum(ref in found for ref in references) / len(references)


def count_exact(prediction: str, references: Sequence[str]) -> float:
    """``aggregate_count``: 1.0 when the first number of the answer (digits or a word up to
    twelve) equals the reference count, else 0.0."""
    match = re.search(r"\d+|\b(" + "|".join(_NUMBER_WORDS) + r")\b", prediction.lower())
    if match is None or not references:
        return 0.0
    value = int(match.group(0)) if match.group(0).isdigit() else _NUMBER_WORDS[match.group(0)]
    return float(value == int(references[0]))


INTENSIVE_METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "extract_json": json_field_f1,
    "multi_needle_all": needles_exact,
    "table_convert": table_cell_f1,
    "aggregate_count": count_exact,
}
