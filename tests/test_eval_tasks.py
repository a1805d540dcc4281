"""The RULER-style generator: deterministic, sized to the target, answers where they should be."""
from __future__ import annotations

import re
from collections import Counter

import pytest

from shadowkv_fx.evaluation.tasks import TASKS, NiahSpec, count_tokens, make_sample, make_samples, parse_length

NIAH_TASKS = [name for name, spec in TASKS.items() if isinstance(spec, NiahSpec)]


def _user_text(sample) -> str:
    # The last user turn of the chat-formatted prompt (the ICL example and the task).
    return sample.prompt.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]


def test_parse_length():
    assert parse_length("8k") == 8192
    assert parse_length("4K") == 4096
    assert parse_length("1500") == 1500
    assert parse_length(2048) == 2048
    with pytest.raises(ValueError):
        parse_length("8 kilo")


@pytest.mark.parametrize("task", sorted(TASKS))
def test_same_seed_same_prompt_and_other_seed_differs(tokenizer, task):
    first = make_sample(task, tokenizer, 1024, index=3, seed=7)
    again = make_sample(task, tokenizer, 1024, index=3, seed=7)
    assert first == again
    assert make_sample(task, tokenizer, 1024, index=3, seed=8).prompt != first.prompt
    assert make_sample(task, tokenizer, 1024, index=4, seed=7).prompt != first.prompt


@pytest.mark.parametrize("task", sorted(TASKS))
def test_prompt_length_close_to_target(tokenizer, task):
    sample = make_sample(task, tokenizer, "1k", index=0)
    budget = sample.prompt_budget
    assert budget == 1024 - TASKS[task].max_new_tokens
    assert sample.num_tokens == count_tokens(tokenizer, sample.prompt)
    assert sample.num_tokens <= budget
    # Haystack units are whole sentences or needles (up to ~55 tokens for uuid needles).
    assert sample.num_tokens >= 0.94 * budget


@pytest.mark.parametrize("task", ["niah_single_2", "niah_multikey_3", "vt", "cwe", "fwe"])
def test_long_prompt_length_close_to_target(tokenizer, task):
    sample = make_sample(task, tokenizer, "4k", index=1)
    assert 0.98 * sample.prompt_budget <= sample.num_tokens <= sample.prompt_budget


def test_prompt_uses_chat_template_and_ends_with_answer_prefix(tokenizer):
    sample = make_sample("niah_single_1", tokenizer, 1024)
    assert sample.prompt.startswith("<|im_start|>")
    assert sample.prompt.endswith("<|im_start|>assistant\n" + sample.answer_prefix)
    assert sample.answer_prefix.startswith("The special magic number for ")


@pytest.mark.parametrize("task", NIAH_TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_at_requested_depth_with_right_answer(tokenizer, task, depth):
    spec = TASKS[task]
    sample = make_sample(task, tokenizer, 1024, index=2, depth=depth)
    assert sample.depth == depth
    text = _user_text(sample)
    context = text.split("afterwards.\n", 1)[1].rsplit("\nWhat ", 1)[0]
    question = text.rsplit("\nWhat ", 1)[1]
    needles = re.findall(r"One of the special magic \w+ for (\S+) is: (\S+?)\.(?=\s|$)", context)
    by_key: dict[str, list[str]] = {}
    for key, value in needles:
        by_key.setdefault(key, []).append(value)
    queried = [key for key in by_key if key in question]
    assert len(queried) == spec.num_queries
    # References are exactly the values of the queried keys, nothing from distractors.
    assert sorted(sample.references) == sorted(v for key in queried for v in by_key[key])
    assert len(sample.references) == spec.num_values * spec.num_queries
    assert all(len(by_key[key]) == spec.num_values for key in queried)
    # The first reference's needle is the one placed at the requested depth.
    value_at = context.index(f"is: {sample.references[0]}.")
    start = context.rindex("One of the special magic", 0, value_at)
    needle_length = context.index(".", value_at + 4 + len(sample.references[0])) + 1 - start
    relative = start / (len(context) - needle_length)
    # Needles go between whole units; a haystack of uuid needles has only ~10 of them at 1k.
    tolerance = 0.03 if spec.haystack != "needles" else 0.6 * needle_length / len(context) + 0.01
    assert abs(relative - depth) < tolerance
    if spec.value_kind == "number":
        assert all(re.fullmatch(r"\d{7}", ref) for ref in sample.references)
    if spec.value_kind == "uuid":
        assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", r) for r in sample.references)


def test_multikey_has_distractors_and_noise_haystack_is_noise(tokenizer):
    sample = make_sample("niah_multikey_1", tokenizer, 1024)
    assert len(re.findall(r"One of the special magic numbers for", sample.prompt)) == 4
    noise = make_sample("niah_single_1", tokenizer, 1024)
    assert _user_text(noise).count("The grass is green. The sky is blue.") > 20
    haystack_of_needles = make_sample("niah_multikey_2", tokenizer, 1024)
    assert len(re.findall(r"One of the special magic numbers for", haystack_of_needles.prompt)) > 20


def test_make_samples_spreads_depths(tokenizer):
    samples = make_samples("niah_single_1", tokenizer, 512, 5)
    assert [s.depth for s in samples] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert len({s.prompt for s in samples}) == 5


def test_variable_tracking_references_follow_the_chain(tokenizer):
    sample = make_sample("vt", tokenizer, 1024, index=1)
    task_text = _user_text(sample).split("\n\nMemorize and track", 1)[1]  # skip the solved example
    value = re.search(r"assigned the value (\d+)", task_text).group(1)
    assigned = {}
    for name, rhs in re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", task_text):
        assigned[name] = rhs
    resolved = set()
    changed = True
    while changed:
        changed = False
        for name, rhs in assigned.items():
            if name not in resolved and (rhs == value or rhs.removeprefix("VAR ") in resolved):
                resolved.add(name)
                changed = True
    assert resolved == set(sample.references) and len(resolved) == 5


def test_common_words_references_are_the_ten_most_common(tokenizer):
    sample = make_sample("cwe", tokenizer, 1024)
    listing = _user_text(sample).rsplit("most often.\n", 1)[1].split("\nQuestion:", 1)[0]
    counts = Counter(re.findall(r"\d+\. (\S+)", listing)).most_common()
    assert {word for word, _ in counts[:10]} == set(sample.references)
    assert counts[9][1] > counts[10][1]


def test_frequent_words_references_are_the_three_most_frequent(tokenizer):
    sample = make_sample("fwe", tokenizer, 1024)
    coded = _user_text(sample).rsplit("coded words. ", 1)[1].split("\nQuestion:", 1)[0]
    counts = Counter(w for w in coded.split() if w != "....").most_common()
    assert [word for word, _ in counts[:3]] == sample.references
    assert counts[2][1] > counts[3][1]


def test_unknown_task_and_bad_depth_are_rejected(tokenizer):
    with pytest.raises(KeyError):
        make_sample("qa_42", tokenizer, 1024)
    with pytest.raises(ValueError):
        make_sample("niah_single_1", tokenizer, 1024, depth=1.5)
