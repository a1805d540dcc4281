"""Text the tasks are built from: shipped essay and word lists, noise, keys, values, needles.

Kept apart from :mod:`.tasks` so task templates read as templates. All randomness
comes from the ``random.Random`` passed in, which keeps samples reproducible.
"""
from __future__ import annotations

import functools
import random
import re
import uuid
from pathlib import Path

# The shipped texts sit next to the code so the package-data glob "*.txt" picks them up.
DATA_DIR = Path(__file__).parent
# RULER's repeated-noise haystack, verbatim.
NOISE_TEXT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@functools.cache
def word_list(name: str) -> tuple[str, ...]:
    """Deduplicated words of a shipped word list (``#`` lines are comments)."""
    words: dict[str, None] = {}
    for line in (DATA_DIR / name).read_text().splitlines():
        if not line.startswith("#"):
            words.update(dict.fromkeys(line.split()))
    return tuple(words)


@functools.cache
def essay_paragraphs() -> tuple[str, ...]:
    """Paragraphs of the shipped essay haystack."""
    text = (DATA_DIR / "haystack_essay.txt").read_text()
    return tuple(p.strip() for p in text.split("\n\n") if p.strip())


@functools.cache
def essay_sentences(rng: random.Random, n: int) -> list[str]:
    """``n`` sentences of the shipped essay; each pass over it shuffles its paragraphs, so a long
    haystack does not repeat in lockstep."""
    sentences: list[str] = []
    while len(sentences) < n:
        paragraphs = list(essay_paragraphs())
        rng.shuffle(paragraphs)
        for paragraph in paragraphs:
            sentences.extend(re.split(r"(?<=[.!?])\s+", paragraph))
    return sentences[:n]


def essay_vocabulary() -> frozenset[str]:
    """Lower-case words of the essay; word needles avoid them so the answer is unambiguous."""
    return frozenset(re.findall(r"[a-z]+", " ".join(essay_paragraphs()).lower()))


def pseudo_word(rng: random.Random) -> str:
    """A pronounceable made-up word."""
    # Pronounceable filler words, only needed once the shipped lists run out (very long contexts).
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    return "".join(rng.choice(syllables) for _ in range(rng.randint(2, 3)))


def unique_words(rng: random.Random, count: int, pool: tuple[str, ...], exclude: set[str] = frozenset()) -> list[str]:
    """``count`` distinct words drawn from ``pool`` (then made-up words), none in ``exclude``."""
    candidates = [w for w in pool if w not in exclude]
    rng.shuffle(candidates)
    chosen = candidates[:count]
    seen = set(chosen) | set(exclude)
    while len(chosen) < count:
        word = pseudo_word(rng)
        if word not in seen:
            seen.add(word)
            chosen.append(word)
    return chosen


def make_value(rng: random.Random, kind: str, used: set[str]) -> str:
    """A fresh needle value of ``kind`` (``number``/``word``/``uuid``), recorded in ``used``."""
    while True:
        if kind == "number":
            value = str(rng.randint(1_000_000, 9_999_999))
        elif kind == "uuid":
            value = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        elif kind == "word":
            value = rng.choice([w for w in word_list("words_nouns.txt") if w not in essay_vocabulary()])
        else:
            raise ValueError(f"unknown value kind {kind!r}")
        if value not in used:
            used.add(value)
            return value


def make_key(rng: random.Random, kind: str, used: set[str]) -> str:
    """A fresh needle key: ``adjective-noun`` for ``word``, else a value of ``kind``."""
    while True:
        if kind == "word":
            key = f"{rng.choice(word_list('words_adjectives.txt'))}-{rng.choice(word_list('words_nouns.txt'))}"
        else:
            key = make_value(rng, kind, set())
        if key not in used:
            used.add(key)
            return key


def haystack_units(
    kind: str, rng: random.Random, n: int, key_kind: str, value_kind: str, keys: set[str], values: set[str]
) -> list[str]:
    """``n`` haystack units (sentences, noise blocks or distractor needles) to insert needles between.

    ``keys`` and ``values`` are the queried needle's; distractor needles avoid them.
    """
    if kind == "noise":
        return [NOISE_TEXT] * n
    if kind == "essay":
        return essay_sentences(rng, n)  # sentences are the units so depths are fine-grained
    if kind == "needles":
        # Distractor keys and values never repeat the queried ones, or the answer would be ambiguous.
        keys, values = set(keys), set(values)
        return [needle_sentence(make_key(rng, key_kind, keys), make_value(rng, value_kind, values), value_kind) for _ in range(n)]
    raise ValueError(f"unknown haystack {kind!r}")


TYPE_NAMES = {"number": ("number", "numbers"), "word": ("word", "words"), "uuid": ("uuid", "uuids")}


def needle_sentence(key: str, value: str, value_kind: str) -> str:
    """RULER's needle wording."""
    return f"One of the special magic {TYPE_NAMES[value_kind][1]} for {key} is: {value}."


def boundary_at_depth(units: list[str], depth: float) -> int:
    """Index of the unit boundary closest to ``depth`` of the joined text, measured in characters.

    Units vary in length, so ``round(depth * len(units))`` would drift from the true depth.
    """
    offsets = [0]
    for unit in units:
        offsets.append(offsets[-1] + len(unit) + 1)
    total = max(1, offsets[-1] - 1)
    return min(range(len(offsets)), key=lambda i: abs(min(offsets[i], total) / total - depth))
