"""Context-intensive families: answers recomputed from the prompt text, sizing, and scorers that
give the reference 1.0 and a perturbed answer less."""
from __future__ import annotations

import json
import re

import pytest

from shadowkv_fx.evaluation.intensive_scoring import (
    count_exact,
    field_f1,
    json_field_f1,
    needles_exact,
    table_cell_f1,
)
from shadowkv_fx.evaluation.intensive_tasks import INTENSIVE_TASKS, JSON_START, TABLE_COLUMNS
from shadowkv_fx.evaluation.scoring import score_prediction
from shadowkv_fx.evaluation.tasks import TASKS, make_sample

RECORD = re.compile(r"^Record (\d+): name=(\w+); city=(\w+); age=(\d+)\.$", re.M)


def _task_part(sample) -> str:
    """The user turn after the solved example (the example ends at its first blank line)."""
    user = sample.prompt.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
    return user.split("\n\n", 1)[1] if "\n\n" in user else user


def _perturb_digit(text: str) -> str:
    match = re.search(r"\d", text)
    digit = str((int(match.group(0)) + 1) % 10)
    return text[: match.start()] + digit + text[match.end() :]


def test_families_are_registered_and_listed():
    assert set(INTENSIVE_TASKS) == {"extract_json", "multi_needle_all", "table_convert", "aggregate_count"}
    assert set(INTENSIVE_TASKS) <= set(TASKS)
    from shadowkv_fx.evaluation.commands import _TASK_HELP

    assert all(name in _TASK_HELP for name in INTENSIVE_TASKS)


@pytest.mark.parametrize("length", ["2k", "4k"])
def test_extract_json_references_are_the_matching_records_of_the_prompt(tokenizer, length):
    sample = make_sample("extract_json", tokenizer, length, index=1)
    text = _task_part(sample)
    city = re.search(r"whose city is (\w+)", text).group(1)
    records = RECORD.findall(text)
    assert len(records) == 6  # four matches, two distractors in other cities
    wanted = [{"id": int(i), "name": n, "age": int(a)} for i, n, c, a in records if c == city]
    assert [json.loads(r) for r in sample.references] == wanted
    assert len(wanted) == 4
    lines = text.splitlines()
    rows = [i for i, line in enumerate(lines) if RECORD.match(line) and f"city={city};" in line]
    assert rows[-1] - rows[0] > len(lines) // 4  # the matches cover the text, not one corner
    assert sample.num_tokens <= sample.prompt_budget
    assert sample.prompt.endswith(sample.answer_prefix) and sample.answer_prefix == "Answer: " + JSON_START


def test_aggregate_count_reference_is_the_count_in_the_prompt(tokenizer):
    counts = set()
    for index in range(4):
        sample = make_sample("aggregate_count", tokenizer, "2k", index=index)
        text = _task_part(sample)
        city = re.search(r"whose city is (\w+)", text).group(1)
        counts.add(sample.references[0])
        assert sample.references == [str(sum(c == city for _, _, c, _ in RECORD.findall(text)))]
    assert len(counts) > 1  # a constant answer cannot score well


def test_table_convert_rows_are_the_html_rows_in_order_and_parts_never_cut(tokenizer):
    sample = make_sample("table_convert", tokenizer, "2k", index=2)
    text = _task_part(sample)
    parts = re.findall(r"<h3>Inventory \(part (\d) of 3\)</h3><table>(.*?)</table>", text)
    assert [p for p, _ in parts] == ["1", "2", "3"]
    rows = [re.findall(r"<td>(.*?)</td>", row) for _, table in parts for row in re.findall(r"<tr>(.*?)</tr>", table)]
    assert ["\t".join(r) for r in rows if r] == sample.references
    assert sample.answer_prefix.endswith("\t".join(TABLE_COLUMNS) + "\n")
    # the parts spread over the page rather than sitting together
    starts = [text.index(f"(part {p} of 3)") for p in "123"]
    assert starts[-1] - starts[0] > len(text) // 5


def test_multi_needle_all_hides_every_reference_once(tokenizer):
    sample = make_sample("multi_needle_all", tokenizer, "2k", index=0)
    assert len(sample.references) == 8
    for value in sample.references:
        assert sample.prompt.count(f"is: {value}.") == 1


@pytest.mark.parametrize("task", sorted(INTENSIVE_TASKS))
def test_long_prompts_fill_the_budget(tokenizer, task):
    sample = make_sample(task, tokenizer, "4k", index=0)
    assert 0.97 * sample.prompt_budget <= sample.num_tokens <= sample.prompt_budget


def _reference_answer(task: str, references: list[str]) -> str:
    if task == "extract_json":
        return ("[" + ", ".join(references) + "]")[len(JSON_START) :]
    if task == "table_convert":
        return "\n".join(references)
    if task == "aggregate_count":
        return f" {references[0]}."
    return ", ".join(references)


@pytest.mark.parametrize("task", sorted(INTENSIVE_TASKS))
def test_reference_scores_one_and_a_wrong_digit_less(tokenizer, task):
    sample = make_sample(task, tokenizer, "1k", index=3)
    answer = _reference_answer(task, sample.references)
    assert score_prediction(task, answer, sample.references) == 1.0
    wrong = score_prediction(task, _perturb_digit(answer), sample.references)
    assert wrong < 1.0
    if task != "aggregate_count":
        assert wrong > 0.5  # one field, cell or needle, not the whole answer


def test_json_scorer_reads_sloppy_json_field_by_field():
    refs = ['{"id": 1234, "name": "Falcon", "age": 30}', '{"id": 5678, "name": "Kettle", "age": 41}']
    assert json_field_f1(' 1234, "name": "Falcon", "age": 30}, {"id": 5678, "name": "Kettle", "age": 41}]', refs) == 1.0
    # single quotes, a string number, a record cut off by the decode budget
    sloppy = " '1234', 'name': 'Falcon', 'age': 30}, {\"id\": 5678, \"name\": \"Kettle\""
    assert json_field_f1(sloppy, refs) == pytest.approx(2 * (5 / 5) * (5 / 6) / (1 + 5 / 6))
    # order does not matter; a missing record costs recall, an invented one precision
    assert json_field_f1(' 5678, "name": "Kettle", "age": 41}]', refs) == pytest.approx(2 / 3)
    extra = ' 1234, "name": "Falcon", "age": 30}, {"id": 5678, "name": "Kettle", "age": 41}, {"id": 1, "name": "X", "age": 2}]'
    assert json_field_f1(extra, refs) == pytest.approx(0.8)
    assert json_field_f1("I do not know.", refs) == 0.0
    # a field the question did not ask for costs nothing
    assert json_field_f1(' 1234, "name": "Falcon", "age": 30, "city": "Oslo"}, {"id": 5678, "name": "Kettle", "age": 41}]', refs) == 1.0


def test_table_scorer_is_cell_f1_and_tolerates_other_separators():
    refs = ["101\tlamp\t3\t1.50", "202\tvase\t7\t9.25"]
    assert table_cell_f1("101\tlamp\t3\t1.50\n202\tvase\t7\t9.25", refs) == 1.0
    assert table_cell_f1("id | item | qty | price\n101 | lamp | 3 | 1.50\n202 | vase | 7 | 9.25", refs) == 1.0
    assert table_cell_f1("101\tlamp\t3\t1.50\n202\tvase\t8\t9.25", refs) == pytest.approx(7 / 8)
    assert table_cell_f1("101\tlamp\t3\t1.50", refs) == pytest.approx(2 * 0.5 / 1.5)
    assert table_cell_f1("<table><tr><td>101</td></tr></table>", refs) == 0.0


def test_needles_and_counts_are_exact():
    refs = ["1234567", "7654321"]
    assert needles_exact("1234567 and 7654321", refs) == 1.0
    assert needles_exact("12345678 and 7654321", refs) == 0.5  # a longer number does not contain a needle
    assert needles_exact("1234567, 1234567", refs) == 0.5
    assert count_exact(" 4.", ["4"]) == 1.0
    assert count_exact(" four records", ["4"]) == 1.0
    assert count_exact(" 14.", ["4"]) == 0.0
    assert count_exact(" none", ["4"]) == 0.0


def test_field_f1_pairs_each_record_once():
    reference = [{"a": "1", "b": "2"}]
    assert field_f1([{"a": "1", "b": "2"}, {"a": "1", "b": "2"}], reference) == pytest.approx(2 * 0.5 / 1.5)
    assert field_f1([], reference) == 0.0
