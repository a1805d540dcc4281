"""User-facing configuration."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class ShadowKVConfig:
    """ShadowKV knobs, named after the paper (Sun et al., 2024).

    Parameters
    ----------
    sparse_budget:
        Tokens of the compressed prompt fetched per decode step and KV head
        (``sparse_budget / chunk_size`` chunks are selected). Must be a multiple of
        ``chunk_size``. A budget covering every chunk selects them all.
    rank:
        Rank of the truncated SVD of the pre-RoPE keys (at most ``H_kv * D``).
    chunk_size:
        Tokens per chunk; one landmark (mean post-RoPE key) per chunk, or ``landmark_runs``.
    local_chunks:
        Chunks at the end of the prompt kept dense on the device (plus the
        remainder that does not fill a chunk).
    outlier_chunks:
        Chunks per KV head whose tokens agree least with their landmark, kept dense.
    enabled:
        ``False`` leaves the traced graph untouched (dense attention, dense cache).
    reuse_values:
        Keep each step's fetched value chunks on the device and fetch only the chunks the next
        step adds (consecutive steps pick mostly the same chunks; the paper reports ~60% reuse).
    prefill_rows:
        Sequences that go through the model together at prefill (``None``: the whole batch). One
        at a time keeps prefill memory at one sequence's working set plus the batch's compressed
        state, and no sequence pays for another's padding.
    value_hbm_gib:
        Accelerator memory (GiB) the chunked values may occupy instead of pinned host memory,
        layer by layer, so spare HBM saves PCIe traffic. ``None``: as much as fits beside the batch's
        compressed state while one prefill group's working set and a margin stay free
        (``preflight.work_reserve``); ``0``: every value offloaded, as in the paper.
    fold_chunks:
        Generated tokens (and later turns) stay dense until a sequence holds ``local_chunks +
        fold_chunks`` whole chunks past its compressed store; then its oldest whole chunks are
        folded into the store (low-rank keys, landmarks, outliers, offloaded values) so that
        ``local_chunks`` chunks (+ the remainder) stay dense. ``None``: never fold (the tail stays
        dense for the rest of the sequence). Prompts too short to compress never fold. The default
        16 (128 tokens at chunk 8) spreads a fold's fixed cost (tens of kernels per layer, an
        incremental SVD where a basis must be refreshed) over 128 decode steps; the dense tail it
        leaves (<= 21 chunks) is small beside the selected budget.
    fold_refresh:
        A fold projects the new pre-RoPE keys onto the sequence's low-rank basis; when their
        relative projection error exceeds ``fold_refresh`` times the error the basis had on the
        keys it was fitted to (and 1e-5), the basis is refreshed by an incremental SVD instead.
    prefill_mlp_chunk:
        Tokens per chunk when a prefill runs the model's MLP (any token-wise region ending in a down
        projection, ``passes/token_chunks.py``): each chunk's result goes into one output, so the
        whole-prompt MLP intermediates (~10 GiB of a Llama-3.1-8B 122K-token prefill) never exist at
        once. A graph traced for at most this many tokens (decode steps, short prompts) keeps its MLP
        as it is. ``None``: off.
    value_bits:
        Bits per stored value element: 16 (the model's dtype) or 8. At 8 the offloaded values are
        int8 with one float32 scale per (chunk, KV head) (symmetric absmax, ``kernels/quantize.py``),
        dequantised inside the gather kernel: half the PCIe bytes per fetched chunk and half the
        host memory per sequence (the largest host-bound batch about doubles), for an error of at
        most half a scale step per element.
    landmark_bits:
        Bits per landmark element: 16 or 8 (int8, one scale per chunk and KV head, applied to the
        logits after the dot): half the bytes the scoring kernel reads each step; the selected
        chunks may differ from the 16-bit ones where two scores are close
        (``evaluation.landmark_drift`` measures it). On SmolLM2-135M (float32 on a CPU), a 4K
        needle prompt and ``sparse_budget=496``: 1.7% of the chosen chunks swapped (71% of the
        per-head selections differed by at least one of their 62 chunks), and over 16 greedy
        tokens of 3 RULER-style samples either knob at 8 bits left the answers unchanged.
    span_neighbors:
        Before the top-k, each chunk's score is raised to the best of its own and its selectable
        neighbours' within ``span_neighbors`` chunks (a max-pool along the prompt), so a chunk
        next to a strongly scoring one is chosen with it: a needle cut in two by a chunk boundary,
        whose other half's landmark scores low, comes back whole. The budget (``select_k``) is
        unchanged: each chosen peak spends up to ``2 * span_neighbors`` of it on neighbours. ``0``:
        plain top-k, the default: on SmolLM2 needles placed at every offset across a chunk boundary
        (benchmarks/results/cpu_needle_offsets) plain top-k already returned every number dense did,
        and ``1`` lost two digits-exact answers of 48 that plain top-k got right.
    landmark_runs:
        Landmarks per chunk: the means of its ``chunk_size // landmark_runs``-token runs, a chunk
        scoring the sum of its runs' scores (finer landmarks inside a chunk, #32). The top-k, the
        key rebuild and the value fetch stay at ``chunk_size``; the landmarks take ``landmark_runs``
        times the device bytes and the scoring read (``landmark_bits=8`` halves both). ``1``: one mean
        a chunk, the paper's landmark.
    key_code_bits:
        ``0``: chunks are ranked by their landmarks. ``4``: by exact attention mass over every key of
        the chunk rounded to a 4-bit code (each channel scaled by its min/max over the row's prompt,
        kept for folds), the selection ParisKV, SpeCache and YAKV use: per step, softmax over every
        stored token, summed per chunk (``kernels/key_codes.py``). The landmark row of a chunk then
        holds its tokens' codes, ``chunk_size * D / 2`` bytes (twice chunk-8 16-bit landmarks; equal
        to chunk-4), so the scoring read grows by as much. On SmolLM2's copying tasks at 1/16 it met
        #32's target at 2K and 8K where landmarks did not (README, accuracy); a decode step of the 8B
        shape costs 20-25% more on the H100/H200 (its kernel is not yet bandwidth-bound), so it is off.
    dense_layers:
        Layer indices whose prompt K/V is kept whole on the device and attended densely, as a prompt
        too short to compress is (``dense_fallback.py``): a safeguard for layers known to select
        badly. Each costs that layer's dense KV of the prompt and generated tokens (counted by the
        preflight and by ``memory_report()`` as ``dense_fallback``). ``()``: none.
    dense_fallback_error:
        A prompt whose pre-RoPE keys the rank-``rank`` basis fits with a relative error (``fit_err``,
        the share of the keys' norm it misses, in [0, 1]) above this bound is kept dense in that
        layer instead of compressed: measured per layer and prompt at prefill, at the cost of one
        device read per layer and prompt. Decided per row, so the cost is data dependent: the
        preflight cannot count it (its message says so). The layer's compressed store, sized before
        the fit is known, stays allocated (and counted) even where every prompt falls back. ``None``:
        off. On SmolLM2-135M this error was 1e-2 to 3.2e-2 per layer (2.6e-3 in layer 0) and did not
        single out the layers whose selection recalls least.
    dense_fallback_recall:
        A prompt whose landmark selection, scored at prefill with its last 16 queries, recalls less
        than this share of the exact attention mass of the budget's best chunks (the mean over KV
        heads and queries, ``dense_fallback.selection_recall``, the diagnostics' ``mass_recall``) is
        kept dense in that layer. Costs ``Hq * 16 * T`` attention logits per layer and prompt at
        prefill; data dependent like ``dense_fallback_error``, but measured before the layer's state
        is sized, so a layer whose every prompt falls back keeps no store when the batch is prefilled
        in one group (one prompt, or ``prefill_rows=None``). ``None``: off.
    layer_budgets:
        One ``sparse_budget`` per layer (tokens, multiples of ``chunk_size``), replacing
        ``sparse_budget`` layer by layer: more chunks where the landmark selection misses attention,
        fewer where it does not, at the same total (``evaluation.layer_budgets.allocate`` measures a
        prompt and splits a total). ``None``: every layer gets ``sparse_budget``.
    """

    sparse_budget: int = 2048
    rank: int = 160
    chunk_size: int = 8
    local_chunks: int = 4
    outlier_chunks: int = 48
    enabled: bool = True
    value_hbm_gib: float | None = None
    prefill_rows: int | None = 1
    reuse_values: bool = True
    fold_chunks: int | None = 16
    fold_refresh: float = 1.5
    prefill_mlp_chunk: int | None = 8192
    value_bits: int = 16
    landmark_bits: int = 16
    span_neighbors: int = 0
    landmark_runs: int = 1
    key_code_bits: int = 0
    dense_layers: tuple[int, ...] = ()
    dense_fallback_error: float | None = None
    dense_fallback_recall: float | None = None
    layer_budgets: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("sparse_budget", "rank", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ShadowKVConfig.{name} must be a positive int, got {value!r}")
        for name in ("local_chunks", "outlier_chunks", "span_neighbors"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ShadowKVConfig.{name} must be an int >= 0, got {value!r}")
        if self.value_hbm_gib is not None and (isinstance(self.value_hbm_gib, bool) or not isinstance(
                self.value_hbm_gib, (int, float)) or self.value_hbm_gib < 0):
            raise ValueError(f"ShadowKVConfig.value_hbm_gib must be None or a number >= 0, got {self.value_hbm_gib!r}")
        for name, none in (("prefill_rows", "None"), ("fold_chunks", "None (no folding)"),
                           ("prefill_mlp_chunk", "None (off)")):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"ShadowKVConfig.{name} must be {none} or an int >= 1, got {value!r}")
        if isinstance(self.fold_refresh, bool) or not isinstance(self.fold_refresh, (int, float)) \
                or not self.fold_refresh >= 1:
            raise ValueError(f"ShadowKVConfig.fold_refresh must be a number >= 1, got {self.fold_refresh!r}")
        runs = self.landmark_runs
        if type(runs) is not int or runs < 1 or self.chunk_size % runs:
            raise ValueError(f"ShadowKVConfig.landmark_runs must be an int >= 1 dividing chunk_size={self.chunk_size} "
                             f"(e.g. 2: a landmark per half chunk), got {runs!r}")
        self._check_key_codes()
        for name in ("value_bits", "landmark_bits"):
            value = getattr(self, name)
            if type(value) is not int or value not in (16, 8):
                raise ValueError(f"ShadowKVConfig.{name} must be 16 (the model's dtype) or 8 (int8 with a "
                                 f"per-chunk scale), got {value!r}")
        layers = self.dense_layers
        if not isinstance(layers, (tuple, list)) or any(type(i) is not int or i < 0 for i in layers) \
                or len(set(layers)) != len(layers):
            raise ValueError(f"ShadowKVConfig.dense_layers must be a tuple of distinct layer indices >= 0, "
                             f"e.g. (7, 8), got {layers!r}")
        object.__setattr__(self, "dense_layers", tuple(sorted(layers)))  # a saved config's list reads back equal
        for name, what in (("dense_fallback_error", "a relative fit error"), ("dense_fallback_recall", "a recall")):
            bound = getattr(self, name)
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float))
                                      or not 0 <= bound <= 1):
                raise ValueError(f"ShadowKVConfig.{name} must be None (off) or {what} in [0, 1], e.g. 0.3, "
                                 f"got {bound!r}")
        budgets = self.layer_budgets
        if budgets is not None:
            if not isinstance(budgets, (tuple, list)) or not budgets or any(
                    type(b) is not int or b < self.chunk_size or b % self.chunk_size for b in budgets):
                raise ValueError(f"ShadowKVConfig.layer_budgets must be None or one sparse budget per layer, each a "
                                 f"positive multiple of chunk_size={self.chunk_size} (e.g. from "
                                 f"shadowkv_fx.evaluation.layer_budgets.allocate), got {budgets!r}")
            object.__setattr__(self, "layer_budgets", tuple(budgets))
        if self.sparse_budget % self.chunk_size:
            lower = self.sparse_budget - self.sparse_budget % self.chunk_size
            raise ValueError(
                f"sparse_budget={self.sparse_budget} is not a multiple of chunk_size={self.chunk_size}: "
                f"use sparse_budget={lower or self.chunk_size} or {lower + self.chunk_size}"
            )

    def _check_key_codes(self) -> None:
        bits = self.key_code_bits
        if type(bits) is not int or bits not in (0, 4):
            raise ValueError(f"ShadowKVConfig.key_code_bits must be 0 (landmarks) or 4 (per-key 4-bit codes), "
                             f"got {bits!r}")
        if bits and (self.landmark_runs != 1 or self.landmark_bits != 16 or self.dense_fallback_recall is not None):
            raise ValueError("ShadowKVConfig.key_code_bits=4 scores every key, so it replaces the landmarks: leave "
                             "landmark_runs=1, landmark_bits=16 and dense_fallback_recall=None (which measures the "
                             f"landmark selection), got {self.landmark_runs}, {self.landmark_bits}, "
                             f"{self.dense_fallback_recall}")

    @property
    def budget_chunks(self) -> int:
        return self.sparse_budget // self.chunk_size

    @property
    def min_sparse_prompt(self) -> int:
        """Shortest prompt (tokens) that is compressed; shorter ones decode densely."""
        return (self.local_chunks + self.outlier_chunks + 1) * self.chunk_size

    def select_chunks(self, store_chunks: int) -> int:
        """Chunks a decode step selects per KV head from a store of ``store_chunks`` per row: the
        budget, or every chunk but the outliers when fewer (a row with fewer selectable chunks
        gets them all, the other picks masked). Fixed from the store's size, never read from the
        device, so a step needs no device-to-host sync to size its top-k."""
        return max(1, min(self.budget_chunks, store_chunks - self.outlier_chunks))

    @property
    def folds(self) -> bool:
        return self.fold_chunks is not None

    @property
    def fold_window(self) -> int:
        """Most dense tokens a folding sequence holds past its store between two decode steps."""
        return (self.local_chunks + self.fold_chunks + 1) * self.chunk_size

    @classmethod
    def from_options(cls, options: dict | None) -> "ShadowKVConfig":
        """Build from a ``torch.compile(options=...)`` dict, rejecting unknown keys."""
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown ShadowKV option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)

    def for_layer(self, index: int) -> "ShadowKVConfig":
        """The config layer ``index`` runs with: its own ``sparse_budget`` where ``layer_budgets`` gives one."""
        if self.layer_budgets is None:
            return self
        return replace(self, sparse_budget=self.layer_budgets[index], layer_budgets=None)

    def to_dict(self) -> dict:
        """JSON's types: tuples as lists (``from_options`` reads them back as tuples)."""
        budgets = None if self.layer_budgets is None else list(self.layer_budgets)
        return {**asdict(self), "dense_layers": list(self.dense_layers), "layer_budgets": budgets}


def default_windows(chunk_size: int, local_tokens: int | None = None) -> dict[str, int]:
    """``outlier_chunks`` and ``local_chunks`` holding the default windows' dense tokens in chunks of
    ``chunk_size``: a finer chunk then changes the landmarks, not what is attended densely.
    ``local_tokens`` moves tokens between the two windows (the local window gets that many, the
    outliers the rest): #32's copying tasks at 8K met dense with chunks of 4 and a 128-token window."""
    base = ShadowKVConfig()
    dense = (base.outlier_chunks + base.local_chunks) * base.chunk_size
    local = base.local_chunks * base.chunk_size if local_tokens is None else local_tokens
    if chunk_size < 1 or local % chunk_size or not chunk_size <= local <= dense:
        raise ValueError(f"a local window of {local} tokens in chunks of {chunk_size}: give a chunk size that divides "
                         f"it and a window that is a multiple of the chunk size from one chunk up to {dense} tokens "
                         "(the default's outlier + local tokens)")
    return {"outlier_chunks": (dense - local) // chunk_size, "local_chunks": local // chunk_size}
