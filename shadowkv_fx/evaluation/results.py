"""What a suite run scored: the mean per method and cell, and the table printed after a run."""
from __future__ import annotations

from typing import Iterable, Sequence


def summarize(records: Iterable[dict]) -> dict[str, dict[tuple[str, int], float]]:
    """Mean score per ``label`` and ``(task, length)``."""
    sums: dict[str, dict[tuple[str, int], list[float]]] = {}
    for record in records:
        sums.setdefault(record["label"], {}).setdefault((record["task"], record["length"]), []).append(record["score"])
    return {label: {key: sum(v) / len(v) for key, v in cells.items()} for label, cells in sums.items()}


def print_results_table(records: Sequence[dict], console=None) -> None:
    """Rich table: one row per method/config, mean score (x100) per task, per length and overall."""
    from rich.console import Console
    from rich.table import Table

    records = list(records)
    if not records:
        return
    tasks = list(dict.fromkeys(r["task"] for r in records))
    lengths = sorted({r["length"] for r in records})
    table = Table(title="RULER-style accuracy (x100)")
    table.add_column("method", no_wrap=True)
    for column in ["attended", *tasks, *[f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths], "avg"]:
        table.add_column(column, justify="right")

    def mean(values: list[float]) -> str:
        return f"{100 * sum(values) / len(values):.1f}" if values else "-"

    labels = list(dict.fromkeys(r["label"] for r in records))
    for label in labels:
        rows = [r for r in records if r["label"] == label]
        attended = f"{100 * sum(r['attended_fraction'] for r in rows) / len(rows):.0f}%"
        per_task = [mean([r["score"] for r in rows if r["task"] == t]) for t in tasks]
        per_length = [mean([r["score"] for r in rows if r["length"] == n]) for n in lengths]
        table.add_row(label, attended, *per_task, *per_length, mean([r["score"] for r in rows]))
    if console is None:
        # Non-terminal output defaults to 80 columns, which would truncate the task names.
        needed = max(len(label) for label in labels) + sum(len(t) + 3 for t in tasks) + 9 * (len(lengths) + 3)
        console = Console(width=max(Console().width, needed))
    console.print(table)
