"""Context-intensive task families: answers that need much of the context at once (issue #32).

A 2026 study of KV offloading reports that ShadowKV loses accuracy where a task needs many
scattered pieces of the prompt together: extracting many records into JSON, returning many
needles, converting a table between formats, aggregating over the whole context. The needle
tasks of :mod:`.task_text` each need one or a few spans. These families need every one of
several spans spread over the whole prompt, so a chunk selection that drops one loses score.

Each renderer is a pure function of a sample seed and a size ``n`` (filler units) that
``tasks.make_sample`` grows to fill a token budget, like those of :mod:`.task_text`. The answer
pieces (records, table parts) are drawn from their own random stream, so they are the same
whatever ``n`` is, and inserted whole between filler units, one in each equal slice of the
context, never cut. Unlike ``vt``/``cwe`` there is no solved example: SmolLM2-135M copied the
example's answer (measured, ``benchmarks/results/cpu_intensive_tasks``), so the answer prefix
shows the format instead.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Callable

from .sources import essay_sentences, unique_words, word_list
from .task_text import NiahSpec

__all__ = ["IntensiveSpec", "INTENSIVE_TASKS", "RENDERERS", "TABLE_COLUMNS", "RECORD_FIELDS", "JSON_START"]

CITIES = ("Lisbon", "Oslo", "Nairobi", "Quito", "Hanoi", "Perth", "Tunis", "Riga", "Cusco", "Bergen")
RECORD_FIELDS = ("id", "name", "age")  # what extract_json asks for of each matching record
TABLE_COLUMNS = ("id", "item", "qty", "price")
JSON_START = '[{"id":'  # extract_json's answer prefix ends with it: the generated text continues it


@dataclass(frozen=True)
class IntensiveSpec:
    """A context-intensive task (rendered by ``RENDERERS[builder]``).

    Attributes
    ----------
    builder:
        Key of :data:`RENDERERS`.
    max_new_tokens:
        Decode budget, sized for the whole answer (every record, row or needle).
    description:
        One line for listings.
    unit_guess:
        Rough tokens per filler unit; only the first guess of the size search.
    """

    builder: str
    max_new_tokens: int
    description: str = ""
    unit_guess: float = 20.0


def _record_line(record: dict) -> str:
    return f"Record {record['id']}: name={record['name']}; city={record['city']}; age={record['age']}."


def _essay_sentences(seed: str, n: int) -> list[str]:
    return essay_sentences(random.Random(seed), n)


def _spread(rng: random.Random, n: int, k: int) -> list[int]:
    """``k`` sorted insertion points in ``[0, n]``, the i-th drawn in the i-th of ``k`` equal slices:
    the pieces of an answer cover the whole context instead of bunching by chance."""
    return [rng.randint(i * n // k, (i + 1) * n // k) for i in range(k)]


def _insert_in_order(units: list[str], positions: list[int], pieces: list[str]) -> list[str]:
    """``pieces`` inserted whole before ``units[positions[i]]`` (sorted positions; equal ones allowed),
    keeping their order."""
    out = list(units)
    # each insertion shifts the later gaps by one
    for shift, (position, piece) in enumerate(zip(positions, pieces)):
        out.insert(position + shift, piece)
    return out


def _records(seed: str, n: int, matches: int, distractors: int = 2) -> tuple[str, list[dict], list[str]]:
    """``matches`` records in one city and ``distractors`` in others, spread over ``n`` essay sentences.

    Returns the target city, the matching records (in text order) and the text units. Records sit in
    prose rather than in a list of records: among ~100 similar records SmolLM2-135M extracted nothing
    right at 2K (measured), so the filter is over a few salient records spread over the context.
    """
    rng = random.Random(seed)
    city = rng.choice(CITIES)
    others = [c for c in CITIES if c != city]
    names = unique_words(rng, matches + distractors, word_list("words_nouns.txt"))
    ids = rng.sample(range(1000, 10000), matches + distractors)
    records = [{"id": i, "name": w.capitalize(), "city": city if k < matches else rng.choice(others),
                "age": rng.randint(20, 69)} for k, (i, w) in enumerate(zip(ids, names))]
    random.Random(seed + "|order").shuffle(records)
    positions = _spread(random.Random(seed + "|places"), n, len(records))
    units = _insert_in_order(_essay_sentences(seed + "|filler", n), positions, [_record_line(r) for r in records])
    return city, [r for r in records if r["city"] == city], units


def _extract_json_text(seed: str, n: int, matches: int) -> tuple[str, str, list[dict]]:
    city, hits, lines = _records(seed, n, matches)
    fields = ", ".join(RECORD_FIELDS[:-1]) + f" and {RECORD_FIELDS[-1]}"
    ask = f"Extract every record whose city is {city} as a JSON list of objects with the fields {fields}."
    body = f"Below is a text with personnel records in it. {ask}\n" + "\n".join(lines) + f"\nQuestion: {ask}"
    # The answer starts inside the JSON, after a token boundary (SmolLM2 has one token for " [{": a
    # prompt ending in " [" steers away from the object). With "Answer:" alone SmolLM2-135M wrote
    # prose or essay sentences (measured); the scorer puts JSON_START back.
    return body, "Answer: " + JSON_START, hits


def render_extract_json(seed: str, n: int, matches: int = 4) -> tuple[str, str, list[str]]:
    # No solved example: SmolLM2-135M copied the example's answer records (measured); the answer
    # prefix shows the format instead.
    body, prefix, hits = _extract_json_text(seed, n, matches)
    return body, prefix, [json.dumps({k: r[k] for k in RECORD_FIELDS}) for r in hits]


def _count_text(seed: str, n: int, count: int) -> tuple[str, str, int]:
    city, hits, lines = _records(seed, n, count)
    ask = f"How many records have the city {city}?"
    body = (
        f"Below is a text with personnel records in it. Count the records whose city is {city}.\n"
        + "\n".join(lines) + f"\nQuestion: {ask} Answer with one number."
    )
    return body, f"Answer: The number of records with the city {city} is", len(hits)


def render_aggregate_count(seed: str, n: int) -> tuple[str, str, list[str]]:
    # The count is drawn per sample, so answering a constant cannot score well. No solved example:
    # SmolLM2-135M answered the example's count every time (measured).
    count = random.Random(seed + "|count").randint(2, 7)
    body, prefix, answer = _count_text(seed, n, count)
    return body, prefix, [str(answer)]


def _table_rows(rng: random.Random, rows: int) -> list[list[str]]:
    items = unique_words(rng, rows, word_list("words_nouns.txt"))
    ids = rng.sample(range(100, 1000), rows)
    return [[str(i), item, str(rng.randint(1, 99)), f"{rng.randint(1, 99)}.{rng.choice((0, 25, 50, 75)):02d}"]
            for i, item in zip(ids, items)]


def _html_part(rows: list[list[str]], part: int, parts: int) -> str:
    header = "".join(f"<th>{c}</th>" for c in TABLE_COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<h3>Inventory (part {part} of {parts})</h3><table><tr>{header}</tr>{body}</table>'


def _table_text(seed: str, n: int, rows: int, parts: int) -> tuple[str, str, list[list[str]]]:
    table = _table_rows(random.Random(seed), rows)
    per_part = -(-rows // parts)
    pieces = [_html_part(table[i : i + per_part], k + 1, parts) for k, i in enumerate(range(0, rows, per_part))]
    units = [f"<p>{s}</p>" for s in _essay_sentences(seed + "|filler", n)]
    positions = _spread(random.Random(seed + "|places"), n, len(pieces))
    units = _insert_in_order(units, positions, pieces)
    header = "\t".join(TABLE_COLUMNS)
    ask = (
        f"Convert the inventory table (all {len(pieces)} parts, in order) to TSV: the header line, then one line "
        "per row, cells separated by tabs."
    )
    body = f"Below is an HTML page. {ask}\n<html><body>\n" + "\n".join(units) + f"\n</body></html>\nQuestion: {ask}"
    return body, f"Answer:\n{header}\n", table


def render_table_convert(seed: str, n: int, rows: int = 6, parts: int = 3) -> tuple[str, str, list[str]]:
    # No solved example here: SmolLM2-135M copied the example's rows as its answer. The answer
    # prefix holds the TSV header instead, which shows the format. HTML costs ~35 tokens a row
    # and ~60 a part.
    body, prefix, table = _table_text(seed, n, rows, parts)
    return body, prefix, ["\t".join(row) for row in table]


RENDERERS: dict[str, Callable[[str, int], tuple[str, str, list[str]]]] = {
    "extract_json": render_extract_json,
    "aggregate_count": render_aggregate_count,
    "table_convert": render_table_convert,
}

INTENSIVE_TASKS: dict[str, NiahSpec | IntensiveSpec] = {
    "extract_json": IntensiveSpec("extract_json", 112, "the 4 records of a city among 6 in essay text, as JSON (field F1)", 25.0),
    # In essay text SmolLM2-135M wrote essay sentences instead of the numbers at 4K (0/3, measured);
    # RULER's repeated noise leaves the needles as the only content to return.
    "multi_needle_all": NiahSpec(
        "noise", num_values=8, max_new_tokens=96, description="all 8 numbers of one key in repeated noise, each exact"
    ),
    "table_convert": IntensiveSpec("table_convert", 112, "an HTML table in 3 scattered parts to TSV (cell F1)", 24.0),
    "aggregate_count": IntensiveSpec("aggregate_count", 12, "count the records of one city among those in essay text (exact)", 25.0),
}
