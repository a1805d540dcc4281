"""The request stream of ``bench --workload`` (``workload_bench``): seeded lengths and arrival times,
random prompts, and the statistics its rows report."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch


@dataclass
class WorkloadRequest:
    prompt_len: int
    output_len: int
    arrival_s: float  # after the stream starts


OUTPUT_DISTRIBUTIONS = ("uniform", "log-uniform")


def make_requests(n: int, min_context: int, max_context: int, min_output: int, max_output: int, chunk: int,
                  rate: float = 0.0, seed: int = 0, output_dist: str = "uniform") -> list[WorkloadRequest]:
    """The seeded request stream; ``rate`` > 0: Poisson arrivals at ``rate`` requests/s, else all at 0.

    ``output_dist``: output lengths uniform in [min, max], or log-uniform (as many requests between
    64 and 128 tokens as between 1024 and 2048: the heavy tail of real chat outputs, where a static
    batch waits longest for its longest row).
    """
    if output_dist not in OUTPUT_DISTRIBUTIONS:
        raise ValueError(f"output_dist must be one of {OUTPUT_DISTRIBUTIONS}, got {output_dist!r}")
    if n < 1 or chunk < 1 or not 0 < min_context <= max_context or not 0 < min_output <= max_output or rate < 0:
        raise ValueError(f"a workload needs n >= 1 requests, 0 < min_context <= max_context, 0 < min_output <= "
                         f"max_output and rate >= 0 (0: all at t=0), got n={n}, contexts [{min_context}, "
                         f"{max_context}], outputs [{min_output}, {max_output}], rate {rate}")
    if max_context // chunk * chunk < min_context:
        raise ValueError(f"no multiple of the chunk size {chunk} lies in [{min_context}, {max_context}]: "
                         "widen the context range")
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        prompt = max(rng.randint(min_context, max_context) // chunk * chunk, -(-min_context // chunk) * chunk)
        if rate > 0:
            t += rng.expovariate(rate)
        if output_dist == "uniform":
            output = rng.randint(min_output, max_output)
        else:
            output = min(max_output, round(math.exp(rng.uniform(math.log(min_output), math.log(max_output)))))
        out.append(WorkloadRequest(prompt, output, t if rate > 0 else 0.0))
    return out


def make_prompts(requests: list[WorkloadRequest], vocab: int, seed: int = 0) -> list[list[int]]:
    """Random token ids (3 and up: never the pad / bos / eos ids of the small test models)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (r.prompt_len,), generator=gen).tolist() for r in requests]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated ``q``-th percentile (numpy's default, ``torch.quantile``'s)."""
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q / 100))


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """Most of the ``(start, end)`` intervals open at one time."""
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    best = now = 0
    for _, step in edges:
        now += step
        best = max(best, now)
    return best
