"""Seeded, offline RULER-style long-context tasks sized with the model's tokenizer.

Follows RULER (Hsieh et al., 2024) closely: needle-in-a-haystack variants, variable
tracking, common-words and frequent-words extraction. Everything is generated from
text shipped with the package so runs need no network and are reproducible: a sample is a
pure function of ``(task, length, index, seed)`` (plus an explicit needle depth). Here: the
task list and the sizing of a sample to a token budget; the text itself: ``task_text.py``.
"""
from __future__ import annotations

import functools
import random
import re
from dataclasses import asdict, dataclass
from typing import Callable

from .intensive_tasks import INTENSIVE_TASKS, RENDERERS, IntensiveSpec
from .sources import NOISE_TEXT
from .task_text import (
    NiahSpec,
    render_common_words,
    render_frequent_words,
    render_niah,
    render_variable_tracking,
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
    question:
        The last line of the user's message, after the haystack (``reuse_eval`` splits the prompt
        there into a document and a question).
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
    question: str = ""  # the prompt's last line before the answer: what follows the document (haystack)

    @property
    def prompt_budget(self) -> int:
        """Prompt tokens aimed at: the context length minus the decode budget."""
        return self.target_length - self.max_new_tokens

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class OtherSpec:
    """A non-needle task (built by a dedicated function)."""

    builder: str
    max_new_tokens: int
    description: str = ""


TASKS: dict[str, NiahSpec | OtherSpec | IntensiveSpec] = {
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
    **INTENSIVE_TASKS,  # context-intensive families (issue #32): intensive_tasks.py
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


def prompt_ids(tokenizer, text: str):
    """``[1, S]`` ids of a prompt as the runner feeds it (no extra special tokens: the chat template
    already holds them)."""
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


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
        render = functools.partial(render_niah, spec, sample_seed, depth)
        unit_guess = 20.0
    elif isinstance(spec, IntensiveSpec):
        depth, render, unit_guess = None, functools.partial(RENDERERS[spec.builder], sample_seed), spec.unit_guess
    elif spec.builder == "variable_tracking":
        depth, render, unit_guess = None, functools.partial(render_variable_tracking, sample_seed), 22.0
    elif spec.builder == "common_words":
        depth, render, unit_guess = None, lambda n: render_common_words(sample_seed, n, budget), 18.0
    else:
        depth, render, unit_guess = None, functools.partial(render_frequent_words, sample_seed), 2.5

    questions: dict[str, str] = {}  # prompt -> its body's last line (the question after the haystack)

    def render_prompt(n: int) -> tuple[str, str, list[str]]:
        body, prefix, references = render(n)
        prompt = format_prompt(tokenizer, body, prefix)
        questions[prompt] = body.rsplit("\n", 1)[-1]
        return prompt, prefix, references

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
        question=questions[prompt],
    )


def make_samples(task: str, tokenizer, length: int | str, num_samples: int, seed: int = 0) -> list[TaskSample]:
    """``num_samples`` samples of one task; needle depths evenly cover ``[0, 1]``.

    Evenly spaced depths (as in the classic needle-in-a-haystack sweep) make the
    depth x length heatmap meaningful even with few samples.
    """
    depths = [i / (num_samples - 1) if num_samples > 1 else 0.5 for i in range(num_samples)]
    return [make_sample(task, tokenizer, length, index=i, seed=seed, depth=round(d, 3)) for i, d in enumerate(depths)]
