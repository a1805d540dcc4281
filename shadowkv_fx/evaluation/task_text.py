"""The text of each task: prompt body, answer prefix and references, a pure function of a seed and a
size ``n`` (haystack units, list entries, words) that ``tasks.make_sample`` grows to fill a token budget.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass

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


def render_niah(spec: NiahSpec, sample_rng_seed: str, depth: float, n: int) -> tuple[str, str, list[str]]:
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


def render_variable_tracking(seed: str, n: int, num_hops: int = 4) -> tuple[str, str, list[str]]:
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


def render_common_words(seed: str, n: int, target: int) -> tuple[str, str, list[str]]:
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


def render_frequent_words(seed: str, n: int) -> tuple[str, str, list[str]]:
    example_body, example_prefix, example_answer = _frequent_words_text(seed + "|icl", 40)
    body, prefix, answer = _frequent_words_text(seed, n)
    return f"{example_body}\n{example_prefix} {' '.join(example_answer)}\n\n{body}", prefix, answer
