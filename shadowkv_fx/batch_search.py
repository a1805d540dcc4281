"""``bench --batches best``: the batch with the most decode tokens/s, which need not be the largest.

At 122K on one H100 a step is bound by bytes: past some batch the values that no longer fit in
spare HBM cross PCIe from pinned host memory, and the step grows faster than the batch, so tokens/s
falls although memory still holds more sequences (bf16: 368 tok/s at batch 12, 241 at its largest,
16). ``search`` measures a few batches and keeps the fastest; ``verdict`` says what bounds it, from
the rows it measured.

The search assumes tokens/s rises to one peak and then falls (one maximum, as the byte-bound model
above gives). It measures the largest batch and halves while that gets faster, then bisects the wider of the two
gaps beside the fastest point while points remain (as golden-section search probes the larger part). Each measurement is a full bench point (a
prefill or a random fill, then timed steps), so ``max_points`` bounds its cost.
"""
from __future__ import annotations

from typing import Callable, Protocol


class Row(Protocol):  # bench.BenchRow's fields the search reads
    batch: int
    tok_s: float | None
    v_on_gpu: float | None
    v_hit_rate: float | None
    error: str | None
    breakdown: list


def search(measure: Callable[[int], Row], largest: int, max_points: int = 8) -> tuple[Row | None, list[Row]]:
    """Measure batches up to ``largest`` (``measure(batch)`` -> a row) and return the fastest row
    (None if every point failed) and every row measured, in the order measured."""
    if largest < 1 or max_points < 1:
        raise ValueError(f"a batch search needs largest >= 1 and max_points >= 1, got {largest} and {max_points}")
    rows: dict[int, Row] = {}

    def run(batch: int) -> None:
        if batch not in rows and len(rows) < max_points:
            rows[batch] = measure(batch)

    batch = largest
    while len(rows) < max_points:
        run(batch)
        mine, above = _speed(rows[batch]), _speed(_above(rows, batch))
        # once a halving is no faster than the point above it, smaller batches only fall further
        if batch == 1 or (mine is not None and above is not None and mine <= above):
            break
        batch //= 2
    while len(rows) < max_points:  # one point a round, in the wider gap beside the fastest (golden-section's rule)
        best = _fastest(rows)
        gaps = [] if best is None else [g for g in (_gap(rows, best.batch, -1), _gap(rows, best.batch, +1)) if g]
        if not gaps:
            break
        run(max(gaps)[1])
    ordered = list(rows.values())
    return _fastest(rows), ordered


def verdict(best: Row, rows: list[Row], largest: int, memory_bound: str | None) -> str:
    """What bounds the fastest batch: memory when it is the largest, else what a larger batch's
    step pays for (values leaving HBM, fewer value hits, or a slower step that no one kernel explains)."""
    if best.batch >= largest:
        return f"batch {best.batch} is both the fastest and the largest that fits: bound by {memory_bound or 'memory'}"
    larger = [r for r in rows if r.batch > best.batch and r.tok_s]
    if not larger:
        return f"batch {best.batch} is the fastest measured; no larger batch ran (largest that fits: {largest})"
    nxt = min(larger, key=lambda r: r.batch)
    head = (f"batch {best.batch} ({best.tok_s:.1f} tok/s) beats batch {nxt.batch} ({nxt.tok_s:.1f}; largest that "
            f"fits: {largest}): ")
    if best.v_on_gpu is not None and nxt.v_on_gpu is not None and nxt.v_on_gpu < best.v_on_gpu - 0.02:
        why = (f"values in spare HBM fall from {best.v_on_gpu:.0%} to {nxt.v_on_gpu:.0%}, so more of each step's "
               "value chunks cross PCIe from pinned host memory")
    elif best.v_hit_rate is not None and nxt.v_hit_rate is not None and nxt.v_hit_rate < best.v_hit_rate - 0.02:
        why = f"value hits fall from {best.v_hit_rate:.0%} to {nxt.v_hit_rate:.0%}: more chunks fetched per step"
    else:
        why = "its step grows faster than its batch"
    grown = _kernel_growth(best, nxt)
    return head + why + (f" ({grown})" if grown else "")


def _kernel_growth(best: Row, nxt: Row) -> str:
    """The kernel whose time per sequence grew most between the two rows' breakdowns, if both have one."""
    if not best.breakdown or not nxt.breakdown:
        return ""
    mine, theirs = dict(best.breakdown), dict(nxt.breakdown)
    growth = {name: theirs[name] / nxt.batch - mine[name] / best.batch for name in mine.keys() & theirs.keys()}
    if not growth:
        return ""
    name = max(growth, key=growth.get)
    return (f"{name}: {mine[name] / best.batch:.3f} -> {theirs[name] / nxt.batch:.3f} ms per sequence per step")


def _speed(row: Row | None) -> float | None:
    return None if row is None or row.error or not row.tok_s else row.tok_s


def _fastest(rows: dict[int, Row]) -> Row | None:
    ran = [r for r in rows.values() if _speed(r) is not None]
    return max(ran, key=lambda r: (r.tok_s, -r.batch)) if ran else None


def _above(rows: dict[int, Row], batch: int) -> Row | None:
    larger = [b for b in rows if b > batch]
    return rows[min(larger)] if larger else None


def _gap(rows: dict[int, Row], batch: int, side: int) -> tuple[int, int] | None:
    """(width, midpoint) of the unmeasured batches between ``batch`` and its nearest measured
    neighbour on ``side``: a one-peak curve peaks between the fastest point's two neighbours."""
    others = [b for b in rows if (b - batch) * side > 0]
    if not others:
        return None
    neighbour = min(others, key=lambda b: abs(b - batch))
    width = abs(neighbour - batch)
    return (width, (batch + neighbour) // 2) if width > 1 else None
