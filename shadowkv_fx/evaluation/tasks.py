"""Seeded, offline RULER-style long-context tasks sized with the model's tokenizer.

Follows RULER (Hsieh et al., 2024) closely: needle-in-a-haystack variants, variable
tracking, common-words and frequent-words extraction. Everything is generated from
text shipped with the package so runs need no network and are reproducible: a sample is a
pure function of ``(task, length, index, seed)`` (plus an explicit needle depth).
"""
from __future__ import annotations

import functools
import random
import re
import string
from dataclasses import asdict, dataclass
from typing import Callable

from .sources import (
    NOISE_TEXT,
    TYPE_NAMES,
    boundary_at_depth,
    haystack_units,
    make_key,
    make_value,
    needle_sentence,
    unique_words,
    word_list,
)

__all__ = [
    "TaskSample",
    "NiahSpec",
    "TASKS",
    "NOISE_TEXT",
    "make_sample",
    "make_samples",
    "format_prompt",
    "count_tokens",
    "parse_length",
]


@dataclass(frozen=True)
class TaskSample:
    """One prompt of the suite with what a correct answer must contain.

    Attributes
    ----------
    task:
        Task name (a key of :data:`TASKS`).
    prompt:
        Chat-formatted prompt ending with the answer prefix; tokenize it with
        ``add_special_tokens=False`` (the template already holds the special tokens).
    references:
        Strings a correct answer contains (scored by :mod:`.scoring`).
    depth:
        Relative position (0 = start, 1 = end of the haystack) of the queried
        needle, ``None`` for tasks without one.
    target_length:
        Context length label (prompt plus ``max_new_tokens``), as in RULER.
    num_tokens:
        Actual prompt tokens.
    seed, index:
        Generation seed and sample index.
    max_new_tokens:
        Decode budget sized for the answer.
    answer_prefix:
        The assistant text the prompt ends with.
    """

    task: str
    prompt: str
    references: list[str]
    depth: float | None
    target_length: int
    num_tokens: int
    seed: int
    index: int
    max_new_tokens: int
    answer_prefix: str = ""

    @property
    def prompt_budget(self) -> int:
        """Prompt tokens aimed at: the context length minus the decode budget."""
        return self.target_length - self.max_new_tokens

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class NiahSpec:
    """A needle-in-a-haystack variant.

    Attributes
    ----------
    haystack:
        ``"noise"`` (repeated sentences), ``"essay"`` (shipped prose) or
        ``"needles"`` (the haystack is made of distractor needles).
    key_kind, value_kind:
        ``"word"`` (adjective-noun key / noun value), ``"number"`` (7 digits) or ``"uuid"``.
    num_keys:
        Needles with distinct keys; all but the queried ones are distractors.
    num_values:
        Values hidden for each queried key.
    num_queries:
        Keys asked about at once.
    max_new_tokens:
        Decode budget.
    description:
        One line for listings.
    """

    haystack: str
    key_kind: str = "word"
    value_kind: str = "number"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    max_new_tokens: int = 16
    description: str = ""


@dataclass(frozen=True)
class OtherSpec:
    """A non-needle task (built by a dedicated function)."""

    builder: str
    max_new_tokens: int
    description: str = ""


TASKS: dict[str, NiahSpec | OtherSpec] = {
    "niah_single_1": NiahSpec("noise", description="one number needle in repeated noise"),
    "niah_single_2": NiahSpec("essay", description="one number needle in essay text"),
    "niah_single_3": NiahSpec("essay", value_kind="uuid", max_new_tokens=40, description="one uuid needle in essay text"),
    "niah_single_word": NiahSpec("essay", value_kind="word", max_new_tokens=12, description="one word needle in essay text"),
    "niah_multikey_1": NiahSpec("essay", num_keys=4, description="number needle among 3 distractor needles"),
    "niah_multikey_2": NiahSpec("needles", description="number needle in a haystack of distractor needles"),
    "niah_multikey_3": NiahSpec(
        "needles", key_kind="uuid", value_kind="uuid", max_new_tokens=40, description="uuid->uuid needle among needles"
    ),
    "niah_multivalue": NiahSpec("essay", num_values=4, max_new_tokens=48, description="4 numbers for one key"),
    "niah_multiquery": NiahSpec("essay", num_keys=4, num_queries=4, max_new_tokens=48, description="4 keys asked at once"),
    "vt": OtherSpec("variable_tracking", 36, "follow a 4-hop chain of variable assignments"),
    "cwe": OtherSpec("common_words", 48, "10 most common words of a numbered list"),
    "fwe": OtherSpec("frequent_words", 24, "3 most frequent coded words (Zipf)"),
}


def parse_length(text: str | int) -> int:
    """``"8k"`` -> 8192, ``"4096"`` -> 4096 (RULER's convention, k = 1024)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", str(text))
    if not match:
        raise ValueError(f"not a context length: {text!r} (use e.g. 4096 or 4k)")
    return int(match.group(1)) * (1024 if match.group(2) else 1)


def format_prompt(tokenizer, body: str, answer_prefix: str) -> str:
    """Wrap ``body`` as a user turn with the tokenizer's chat template and start the answer.

    Tokenizers without a chat template (tiny test models) get the plain text.
    """
    if getattr(tokenizer, "chat_template", None):
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
        )
        return chat + answer_prefix
    return f"{body}\n{answer_prefix}"


def count_tokens(tokenizer, text: str) -> int:
    """Prompt tokens as the runner feeds them (no extra special tokens)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _fit(render: Callable[[int], tuple], tokenizer, budget: int, unit_guess: float) -> tuple:
    """Largest ``n`` whose rendered prompt stays within ``budget`` tokens (binary search).

    ``render(n)`` must be deterministic and roughly monotonic in ``n``.
    """

    def size(n: int) -> int:
        return count_tokens(tokenizer, render(n)[0])

    lo, hi = 0, max(2, int(budget / unit_guess * 1.5))
    if size(lo) > budget:
        raise ValueError(f"the task template alone takes {size(lo)} tokens, over the {budget}-token prompt budget")
    while size(hi) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if size(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return render(lo)


def _render_niah(spec: NiahSpec, sample_rng_seed: str, depth: float, n: int) -> tuple[str, str, list[str]]:
    rng = random.Random(sample_rng_seed)
    keys: set[str] = set()
    values: set[str] = set()
    needle_keys = [make_key(rng, spec.key_kind, keys) for _ in range(spec.num_keys)]
    needle_values = [[make_value(rng, spec.value_kind, values) for _ in range(spec.num_values)] for _ in needle_keys]
    # Haystack randomness comes from its own stream so the needles stay the same whatever n is.
    haystack_rng = random.Random(sample_rng_seed + "|haystack")
    units = haystack_units(spec.haystack, haystack_rng, n, spec.key_kind, spec.value_kind, keys, values)
    needles = [(k, v) for k, vs in zip(needle_keys, needle_values) for v in vs]
    place_rng = random.Random(sample_rng_seed + "|depths")
    for key, value in needles[1:]:
        units.insert(place_rng.randint(0, len(units)), needle_sentence(key, value, spec.value_kind))
    # The first needle's depth is the controlled one (the heatmap axis); placing it last
    # keeps the other insertions from shifting it.
    units.insert(boundary_at_depth(units, depth), needle_sentence(*needles[0], spec.value_kind))
    context = " ".join(units)

    singular, plural = TYPE_NAMES[spec.value_kind]
    queried = needle_keys[: spec.num_queries]
    query = queried[0] if len(queried) == 1 else ", ".join(queried[:-1]) + f" and {queried[-1]}"
    references = [v for vs in needle_values[: spec.num_queries] for v in vs]
    preamble = (
        f"Some special magic {plural} are hidden within the following text. Make sure to memorize it. "
        f"I will quiz you about the {plural} afterwards.\n"
    )
    if len(references) == 1:
        question = f"What is the special magic {singular} for {query} mentioned in the provided text?"
        prefix = f"The special magic {singular} for {query} mentioned in the provided text is"
    else:
        question = f"What are all the special magic {plural} for {query} mentioned in the provided text?"
        prefix = f"The special magic {plural} for {query} mentioned in the provided text are"
    return preamble + context + "\n" + question, prefix, references


def _variable_chain(rng: random.Random, num_hops: int) -> tuple[list[str], str, list[str]]:
    names: list[str] = []
    while len(names) < num_hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(num_hops)]
    return names, value, chain


def _variable_tracking_text(rng: random.Random, n: int, num_hops: int) -> tuple[str, str, str, list[str]]:
    names, value, chain = _variable_chain(rng, num_hops)
    units = [NOISE_TEXT] * n
    positions = sorted(rng.sample(range(n + 1), len(chain))) if n + 1 >= len(chain) else [n] * len(chain)
    # Insert back to front so earlier positions stay valid and the chain keeps its order.
    for position, statement in sorted(zip(positions, chain), key=lambda item: -item[0]):
        units.insert(position, statement)
    body = (
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        + " ".join(units)
        + f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
    )
    prefix = (
        f"Answer: According to the chain(s) of variable assignment in the text above, {num_hops + 1} variables "
        f"are assigned the value {value}, they are:"
    )
    return body, prefix, value, names


def _render_variable_tracking(seed: str, n: int, num_hops: int = 4) -> tuple[str, str, list[str]]:
    # RULER prepends one solved short example (in-context learning) to show the answer format.
    example_body, example_prefix, _, example_names = _variable_tracking_text(random.Random(seed + "|icl"), 2, num_hops)
    body, prefix, _, names = _variable_tracking_text(random.Random(seed), n, num_hops)
    example = f"{example_body}\n{example_prefix} {' '.join(example_names)}\n\n"
    return example + body, prefix, names


def _common_words_text(seed: str, n: int, freq_common: int, freq_uncommon: int, num_common: int = 10):
    rng = random.Random(seed)
    pool = word_list("words_nouns.txt") + word_list("words_adjectives.txt")
    words = unique_words(rng, num_common + n, pool)
    common, uncommon = words[:num_common], words[num_common:]
    entries = common * freq_common + uncommon * freq_uncommon
    random.Random(seed + "|order").shuffle(entries)
    listing = " ".join(f"{i + 1}. {word}" for i, word in enumerate(entries))
    body = (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.\n"
        f"{listing}\nQuestion: What are the {num_common} most common words in the above list?"
    )
    prefix = f"Answer: The top {num_common} words that appear most often in the list are:"
    return body, prefix, common


def _render_common_words(seed: str, n: int, target: int) -> tuple[str, str, list[str]]:
    # RULER repeats the common words 30 times; scale that down for short contexts so
    # they do not crowd out the uncommon ones (about 6 tokens per entry).
    freq_common = max(6, min(30, round(0.3 * target / 60)))
    # As in RULER, one short solved example shows the expected answer format.
    example_body, example_prefix, example_answer = _common_words_text(seed + "|icl", 10, 4, 2)
    body, prefix, common = _common_words_text(seed, n, freq_common, 3)
    return f"{example_body}\n{example_prefix} {' '.join(example_answer)}\n\n{body}", prefix, common


def _frequent_words_text(seed: str, n: int, alpha: float = 2.0, num_answers: int = 3):
    rng = random.Random(seed)
    vocab_size = max(num_answers + 2, n // 8)
    vocab: dict[str, None] = {}
    while len(vocab) < vocab_size:
        vocab["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 5)))] = None
    words = list(vocab)
    # Expected Zipf counts instead of sampling: the top words are then strictly ranked,
    # so the references are never ambiguous.
    weights = [1 / (rank + 1) ** alpha for rank in range(vocab_size)]
    counts = [int(n * w / sum(weights)) for w in weights]
    counts[0] += n - sum(counts)
    tokens = [word for word, count in zip(words, counts) for _ in range(count)]
    random.Random(seed + "|order").shuffle(tokens)
    text = " .... ".join(" ".join(tokens[i : i + 10]) for i in range(0, len(tokens), 10))
    body = (
        "Read the following coded text and track the frequency of each coded word. "
        f"Find the three most frequently appeared coded words. {text}\n"
        "Question: Do not provide any explanation. Please ignore the dots '....'. "
        "What are the three most frequently appeared words in the above coded text?"
    )
    prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
    return body, prefix, words[:num_answers]


def _render_frequent_words(seed: str, n: int) -> tuple[str, str, list[str]]:
    example_body, example_prefix, example_answer = _frequent_words_text(seed + "|icl", 40)
    body, prefix, answer = _frequent_words_text(seed, n)
    return f"{example_body}\n{example_prefix} {' '.join(example_answer)}\n\n{body}", prefix, answer


def make_sample(
    task: str,
    tokenizer,
    length: int | str,
    index: int = 0,
    seed: int = 0,
    depth: float | None = None,
) -> TaskSample:
    """Generate one sample sized to ``length`` tokens of context.

    Parameters
    ----------
    task:
        A key of :data:`TASKS`.
    tokenizer:
        The evaluated model's tokenizer (sizing and chat template).
    length:
        Context length (prompt + ``max_new_tokens``), e.g. ``4096`` or ``"4k"``.
    index, seed:
        Sample identity: the same ``(task, length, index, seed, depth)`` gives the same prompt.
    depth:
        Needle depth in ``[0, 1]``; ``None`` draws it from the sample's seed. Ignored
        by tasks without a needle.

    Returns
    -------
    TaskSample
    """
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    spec = TASKS[task]
    length = parse_length(length)
    budget = length - spec.max_new_tokens
    sample_seed = f"{task}|{length}|{index}|{seed}"
    if isinstance(spec, NiahSpec):
        if depth is None:
            depth = round(random.Random(sample_seed + "|depth").random(), 3)
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        render = functools.partial(_render_niah, spec, sample_seed, depth)
        unit_guess = 20.0
    elif spec.builder == "variable_tracking":
        depth, render, unit_guess = None, functools.partial(_render_variable_tracking, sample_seed), 22.0
    elif spec.builder == "common_words":
        depth, render, unit_guess = None, lambda n: _render_common_words(sample_seed, n, budget), 18.0
    else:
        depth, render, unit_guess = None, functools.partial(_render_frequent_words, sample_seed), 2.5

    def render_prompt(n: int) -> tuple[str, str, list[str]]:
        body, prefix, references = render(n)
        return format_prompt(tokenizer, body, prefix), prefix, references

    prompt, prefix, references = _fit(render_prompt, tokenizer, budget, unit_guess)
    return TaskSample(
        task=task,
        prompt=prompt,
        references=list(references),
        depth=depth,
        target_length=length,
        num_tokens=count_tokens(tokenizer, prompt),
        seed=seed,
        index=index,
        max_new_tokens=spec.max_new_tokens,
        answer_prefix=prefix,
    )


def make_samples(task: str, tokenizer, length: int | str, num_samples: int, seed: int = 0) -> list[TaskSample]:
    """``num_samples`` samples of one task; needle depths evenly cover ``[0, 1]``.

    Evenly spaced depths (as in the classic needle-in-a-haystack sweep) make the
    depth x length heatmap meaningful even with few samples.
    """
    depths = [i / (num_samples - 1) if num_samples > 1 else 0.5 for i in range(num_samples)]
    return [make_sample(task, tokenizer, length, index=i, seed=seed, depth=round(d, 3)) for i, d in enumerate(depths)]
