"""The two-way score of issue #31: the split at the question and the table, on real prompts of the suite."""
from __future__ import annotations

import dataclasses

import pytest

from shadowkv_fx.evaluation import reuse_eval
from shadowkv_fx.evaluation.tasks import make_sample


@pytest.mark.parametrize("task", ["niah_single_2", "niah_multikey_1", "vt", "extract_json"])
def test_split_keeps_the_prompt_ids_and_puts_the_question_after_the_document(tokenizer, task):
    sample = make_sample(task, tokenizer, "1k", index=1)
    ids, split = reuse_eval.split_at_question(tokenizer, sample)
    whole = tokenizer(sample.prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert ids.tolist() == whole.tolist()  # both ways see the very same token ids
    question = tokenizer.decode(ids[0, split:])
    assert question.startswith(sample.question) and sample.question not in tokenizer.decode(ids[0, :split])
    assert split > 0.8 * ids.shape[1]  # the haystack is the document


def test_a_sample_without_its_question_is_refused(tokenizer):
    sample = dataclasses.replace(make_sample("niah_single_2", tokenizer, "1k"), question="not in the prompt")
    with pytest.raises(ValueError, match="no question line"):
        reuse_eval.split_at_question(tokenizer, sample)


def test_table_means_per_task_and_overall():
    rec = lambda task, f, r: {"task": task, "length": "2k", "fresh": {"score": f}, "reused": {"score": r}}  # noqa: E731
    text = reuse_eval.table([rec("vt", 1.0, 0.5), rec("vt", 0.0, 0.5), rec("cwe", 0.2, 0.2)])
    assert "| vt | 2k | 2 | 50.0 | 50.0 | +0.0 |" in text and "| cwe | 2k | 1 | 20.0 | 20.0 | +0.0 |" in text
    assert "| all | | 3 | 40.0 | 40.0 | +0.0 |" in text
