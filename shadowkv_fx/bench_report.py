"""``shadowkv-fx bench``'s output: the table of rows side by side and the plot of tokens/s by batch."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shadowkv_fx.bench import BenchRow


def table(rows: list["BenchRow"], gpus: int = 1) -> str:
    """Per-sequence GPU bytes are one GPU's (with ``gpus`` > 1, each holds 1/gpus of the KV heads)."""
    head = (f"{'method':<16}{'context':>8}{'batch':>6}{'tok/s':>9}{'ms/step':>9}{'prefill s':>10}"
            f"{'GPU GiB/seq':>12}{'state GiB/seq':>14}{'host GiB/seq':>13}{'V on GPU':>9}{'V hits':>8}{'peak GiB':>9}")
    lines = [f"{gpus} GPU(s), tensor parallel over KV heads" if gpus > 1 else "1 GPU", head]
    # 'state': GPU bytes a sequence needs (dense: its KV cache); 'GPU' adds values kept in spare HBM
    for r in rows:
        if r.error:
            lines.append(f"{r.method:<16}{r.context:>8}{r.batch:>6}  {r.error}")
            continue
        prefill = r.fill if r.prefill_s is None else f"{r.prefill_s:.2f}"
        lines.append(f"{r.method:<16}{r.context:>8}{r.batch:>6}{r.tok_s:>9.1f}{r.step_ms:>9.2f}{prefill:>10}"
                     f"{r.gpu_gib_per_seq:>12.3f}{'-' if r.state_gib_per_seq is None else f'{r.state_gib_per_seq:.3f}':>14}"
                     f"{r.host_gib_per_seq:>13.3f}{r.v_on_gpu:>9.0%}"
                     f"{'-' if r.v_hit_rate is None else f'{r.v_hit_rate:.0%}':>8}{r.peak_gib:>9.1f}")
    fits = {(r.method, r.context): (r.largest_batch, r.bound) for r in rows if r.largest_batch is not None}
    for (method, context), (largest, bound) in sorted(fits.items()):
        how = "preflight" if method == "shadowkv" else "per-sequence peak of this run"
        lines.append(f"{method} largest batch at context {context}: {largest} ({how}), bound by {bound}")
    lines += [f"{r.method} fastest batch at context {r.context}: {r.best}" for r in rows if r.best]
    if any(r.fill == "random" for r in rows):
        lines.append("prefill 'random': the cache was filled from random K/V through the same compression path")
    if any(r.fill == "replicate" for r in rows):
        lines.append("prefill 'replicate': one real prefill of the first prompt, its K/V compressed into every row "
                     "(a real prefill's state and value hits; its time is one sequence's, not the batch's)")
    for r in rows:
        if r.breakdown:
            lines.append(f"\nbreakdown of one ShadowKV decode step (no CUDA graph), context {r.context}, batch {r.batch}:")
            lines += [f"  {ms:8.3f} ms  {name}" for name, ms in r.breakdown]
        alone = r.steps_alone
        if alone:
            fold_ms = "-" if alone["folding_mean_ms"] is None else f"{alone['folding_mean_ms']:.2f} ms"
            lines.append(f"{alone['steps']} steps timed alone: median {alone['median_ms']:.2f} ms; "
                         f"{alone['folding_steps']} folded the tail first, mean {fold_ms}")
            if alone["folding_host_ops"]:
                lines.append("  host time of one folding step, by op (ms, calls):")
                lines += [f"  {ms:8.3f} ms {n:6d}  {name}" for name, ms, n in alone["folding_host_ops"]]
    return "\n".join(lines)


def plot(rows: list["BenchRow"], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (method, context) in sorted({(r.method, r.context) for r in rows}):
        points = sorted((r.batch, r.tok_s) for r in rows if r.method == method and r.context == context and r.tok_s)
        if points:
            ax.plot(*zip(*points), marker="o", label=f"{method} {context // 1024}K")
    ax.set_xlabel("batch")
    ax.set_ylabel("decode tokens/s")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
