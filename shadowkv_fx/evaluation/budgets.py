"""Budget specs for the eval: a token count (``256``) or a fraction of the context length (``"1/16"``).

A fraction resolves per context length, so one spec gives the same attended share at 2k, 4k
and 8k; results are labelled and grouped by the spec, and each record also stores the
resolved ``sparse_budget``.
"""
from __future__ import annotations

import re
from dataclasses import replace
from fractions import Fraction

__all__ = ["budget_key", "parse_budget", "resolve_budget", "with_budget"]


def parse_budget(spec: int | str) -> int | Fraction:
    """A budget spec: ``256`` / ``"256"`` (tokens) or ``"1/16"`` (that fraction of the context length).

    Returns
    -------
    int or Fraction
        Tokens, or the fraction (``0 < f <= 1``).
    """
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 1:
            raise ValueError(f"budget must be positive, got {spec}")
        return spec
    text = str(spec).strip()
    if re.fullmatch(r"\d+", text):
        return parse_budget(int(text))
    match = re.fullmatch(r"(\d+)\s*/\s*(\d+)", text)
    if not match or int(match.group(2)) == 0 or not 0 < Fraction(int(match.group(1)), int(match.group(2))) <= 1:
        raise ValueError(f"not a budget: {spec!r} (use tokens, e.g. 256, or a fraction of the context, e.g. 1/16)")
    return Fraction(int(match.group(1)), int(match.group(2)))


def resolve_budget(spec: int | str, length: int) -> int:
    """Tokens of a budget spec at a context length (before rounding down to whole chunks).

    ``"1/16"`` at ``length=4096`` is 256; an int spec is returned as is.
    """
    budget = parse_budget(spec)
    return budget if isinstance(budget, int) else int(budget * length)


def with_budget(config, budget: int):
    """``config`` (a ``ShadowKVConfig``) at ``budget`` tokens, rounded down to whole chunks (at least
    one): rounding rather than refusing lets one budget list fit every chunk size."""
    return replace(config, sparse_budget=max(config.chunk_size, budget - budget % config.chunk_size))


def budget_key(spec: int | str) -> int | str:
    """How a spec is stored and labelled: ints stay ints, fractions read ``"1/16"``."""
    budget = parse_budget(spec)
    return budget if isinstance(budget, int) else f"{budget.numerator}/{budget.denominator}"
