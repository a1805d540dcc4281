"""PNG plots of :func:`.runner.run_eval` records (matplotlib, headless Agg backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

__all__ = ["plot_accuracy", "plot_depth_heatmaps", "plot_all"]


def _pyplot():
    import matplotlib

    # Evaluation runs on headless machines; never try to open a window.
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _length_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def plot_accuracy(records: Sequence[dict], path: str | Path) -> Path:
    """One panel per task: mean score (x100) against context length, one line per method.

    Parameters
    ----------
    records:
        :func:`.runner.run_eval` output.
    path:
        PNG to write.

    Returns
    -------
    Path
        ``path``.
    """
    plt = _pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in records))
    labels = list(dict.fromkeys(r["label"] for r in records))
    lengths = sorted({r["length"] for r in records})
    columns = min(4, len(tasks)) or 1
    rows = -(-len(tasks) // columns) or 1
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False, sharey=True)
    for ax, task in zip(axes.flat, tasks):
        for label in labels:
            scores = [
                100 * _mean([r["score"] for r in records if r["task"] == task and r["label"] == label and r["length"] == n])
                for n in lengths
            ]
            ax.plot(range(len(lengths)), scores, marker="o", label=label)
        ax.set_title(task)
        ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(tasks) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("score (x100)")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(4, len(labels)), frameon=False)
    fig.tight_layout(rect=(0, 0.07 + 0.03 * (len(labels) // 4), 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_depth_heatmaps(records: Sequence[dict], path: str | Path, depth_bins: int = 5) -> Path | None:
    """Needle depth x context length heatmap of the mean score, one panel per method.

    Only records with a needle depth are used (NIAH tasks), pooled over those tasks.
    Depths are grouped into ``depth_bins`` equal bins so any sample count fills the grid.

    Returns
    -------
    Path or None
        ``path``, or ``None`` when no record has a depth.
    """
    records = [r for r in records if r.get("depth") is not None]
    if not records:
        return None
    plt = _pyplot()
    labels = list(dict.fromkeys(r["label"] for r in records))
    lengths = sorted({r["length"] for r in records})

    def depth_bin(depth: float) -> int:
        return min(int(depth * depth_bins), depth_bins - 1)

    width = max(4.0, (0.9 * len(lengths) + 1.6) * len(labels))
    fig, axes = plt.subplots(1, len(labels), figsize=(width, 3.8), squeeze=False, sharey=True)
    image = None
    for ax, label in zip(axes.flat, labels):
        grid = [
            [
                100 * _mean([r["score"] for r in records if r["label"] == label and r["length"] == n and depth_bin(r["depth"]) == b])
                for n in lengths
            ]
            for b in range(depth_bins)
        ]
        image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", origin="upper")
        for b, row in enumerate(grid):
            for i, value in enumerate(row):
                if value == value:  # skip NaN (empty bins)
                    ax.text(i, b, f"{value:.0f}", ha="center", va="center", fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
        ax.set_xlabel("context length")
    axes.flat[0].set_yticks(range(depth_bins), [f"{100 * b // depth_bins}-{100 * (b + 1) // depth_bins}%" for b in range(depth_bins)])
    axes.flat[0].set_ylabel("needle depth")
    fig.colorbar(image, ax=list(axes.flat), shrink=0.8, label="score (x100)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_all(records: Sequence[dict], out_dir: str | Path) -> list[Path]:
    """Write ``accuracy_by_task.png`` and ``needle_depth_heatmap.png`` (if any needle) into ``out_dir``."""
    out = Path(out_dir)
    written = [plot_accuracy(records, out / "accuracy_by_task.png")]
    heatmap = plot_depth_heatmaps(records, out / "needle_depth_heatmap.png")
    if heatmap is not None:
        written.append(heatmap)
    return written
