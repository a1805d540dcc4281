"""``shadowkv-fx bench --workload``'s output: workload.json, table.txt and workload.png in ``--out``."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shadowkv_fx.workload_bench import WorkloadRequest, WorkloadRow

TARGET = 1.5  # issue #25: continuous batching over ShadowKV against its static batches, same workload


def speedup(rows: list["WorkloadRow"]) -> float | None:
    """shadowkv-cb's generated tokens/s over shadowkv-static's (None unless both ran)."""
    by = {r.method: r for r in rows if r.error is None and r.tok_s}
    if "shadowkv-cb" in by and "shadowkv-static" in by:
        return by["shadowkv-cb"].tok_s / by["shadowkv-static"].tok_s
    return None


def table(rows: list["WorkloadRow"], requests: list["WorkloadRequest"], device: str, output_dist: str = "uniform") -> str:
    prompts = [r.prompt_len for r in requests]
    outputs = [r.output_len for r in requests]
    arrivals = "all at t=0" if all(r.arrival_s == 0 for r in requests) else \
        f"Poisson, last at {max(r.arrival_s for r in requests):.1f} s"
    lines = [f"workload on {device}: {len(requests)} requests, prompts {min(prompts)}-{max(prompts)} tokens "
             f"(mean {sum(prompts) / len(prompts):.0f}), outputs {min(outputs)}-{max(outputs)} "
             f"({output_dist}, total {sum(outputs)}), arrivals {arrivals}",
             f"{'method':<17}{'slots':>6}{'at once':>8}{'total s':>9}{'req/hour':>10}{'tok/s':>9}"
             f"{'TTFT p50 s':>11}{'TTFT p95 s':>11}{'max gap s':>10}  note"]
    for r in rows:
        slots = "-" if r.slots is None else str(r.slots)
        if r.error:
            lines.append(f"{r.method:<17}{slots:>6}  {r.error}")
            continue
        gap = "-" if r.gap_max_s is None else f"{r.gap_max_s:.2f}"
        lines.append(f"{r.method:<17}{slots:>6}{r.max_concurrent or 0:>8}{r.total_s:>9.1f}{r.requests_per_hour:>10.0f}"
                     f"{r.tok_s:>9.1f}{r.ttft_p50_s:>11.2f}{r.ttft_p95_s:>11.2f}{gap:>10}  {r.note}")
    ratio = speedup(rows)
    if ratio is not None:
        verdict = "meets" if ratio >= TARGET else "misses"
        lines.append(f"shadowkv-cb / shadowkv-static tokens/s: {ratio:.2f}x ({verdict} the {TARGET}x target)")
    lines.append("'at once': most requests holding a slot at the same time; TTFT: arrival to first token; "
                 "max gap: the longest wait between two tokens of one request (a prefill piece run between "
                 "decode steps; '-': no per-token times); dense-cb's slots: its KV cache's tokens over the longest request's")
    return "\n".join(lines)


def plot(rows: list["WorkloadRow"], path: str) -> None:
    """TTFT CDF per method (left), generated tokens/s per method (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.error is None and r.per_request]
    fig, (cdf, bars) = plt.subplots(1, 2, figsize=(10, 4))
    for r in ok:
        ttfts = sorted(p["ttft_s"] for p in r.per_request)
        cdf.step(ttfts, [(k + 1) / len(ttfts) for k in range(len(ttfts))], where="post", label=r.method)
    cdf.set_xlabel("time to first token (s)")
    cdf.set_ylabel("fraction of requests")
    cdf.grid(alpha=0.3)
    cdf.legend(fontsize=8)
    colors = {"shadowkv-cb": "tab:blue", "shadowkv-static": "tab:orange", "dense-cb": "tab:gray"}
    bars.bar([r.method for r in ok], [r.tok_s for r in ok], color=[colors.get(r.method, "tab:green") for r in ok])
    for k, r in enumerate(ok):
        bars.annotate(f"{r.requests_per_hour:.0f} req/h", (k, r.tok_s), ha="center", va="bottom", fontsize=8)
    bars.set_ylabel("generated tokens/s")
    bars.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(out: Path, rows: list["WorkloadRow"], requests: list["WorkloadRequest"], settings: dict,
          device: str) -> str:
    """workload.json (settings, the stream, every row with its per-request results), table.txt and
    workload.png; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    text = table(rows, requests, device, settings.get("output_dist", "uniform"))
    (out / "workload.json").write_text(json.dumps({
        "settings": settings, "device": device, "requests": [asdict(r) for r in requests],
        "rows": [asdict(r) for r in rows], "speedup_vs_static": speedup(rows), "target": TARGET}, indent=1))
    (out / "table.txt").write_text(text + "\n")
    plot(rows, str(out / "workload.png"))
    return text
