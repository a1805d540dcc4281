"""One attention layer's compressed cache: built at prefill, read at every decode step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from shadowkv_fx.config import ShadowKVConfig
from shadowkv_fx.kernels import dispatch, reference as ref

RopeFn = Callable[..., torch.Tensor]


@dataclass
class PromptLayout:
    """Where each sequence's prompt sits in the left-padded batch (shared by all layers).

    ``pad[b]`` leading pad tokens, ``lengths[b]`` real tokens, ``chunks[b]`` compressed chunks
    (0: the prompt is too short to compress and decodes densely).
    """

    pad: list[int]
    lengths: list[int]
    chunks: list[int]
    padded_len: int

    @classmethod
    def from_mask(cls, key_valid: torch.Tensor, config: ShadowKVConfig) -> "PromptLayout":
        lengths = key_valid.sum(dim=1).tolist()
        padded_len = key_valid.shape[1]
        chunks = []
        for n in lengths:
            c = n // config.chunk_size - config.local_chunks
            chunks.append(c if c >= config.outlier_chunks + 1 else 0)
        return cls([padded_len - n for n in lengths], lengths, chunks, padded_len)

    @property
    def max_chunks(self) -> int:
        return max(self.chunks)


def chunk_tokens(chunk_idx: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Token indices of chunks: ``[..., k]`` chunk ids -> ``[..., k * chunk_size]`` token ids."""
    offsets = torch.arange(chunk_size, device=chunk_idx.device)
    return (chunk_idx[..., None] * chunk_size + offsets).flatten(-2)


def _pad_stack(rows: Sequence[torch.Tensor], length: int, dim: int) -> torch.Tensor:
    """Stack tensors along a new batch dim, zero-padding ``dim`` (of each row) to ``length``."""
    out = []
    for row in rows:
        missing = length - row.shape[dim]
        if missing:
            shape = list(row.shape)
            shape[dim] = missing
            row = torch.cat([row, row.new_zeros(shape)], dim=dim)
        out.append(row)
    return torch.stack(out)


def _host_buffer_like(t: torch.Tensor) -> torch.Tensor:
    """Values leave the accelerator: pinned host memory there, the tensor itself on CPU."""
    if t.device.type == "cpu":
        return t.contiguous()
    _check_host_memory(t.numel() * t.element_size())
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t)
    return host


def _check_host_memory(needed: int) -> None:
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    except OSError:
        return
    available = info.get("MemAvailable")
    if available is not None and needed > 0.9 * available:
        raise MemoryError(
            f"offloading values needs {needed / 2**30:.1f} GiB of pinned host memory but only "
            f"{available / 2**30:.1f} GiB is available: use a smaller batch or a shorter prompt"
        )


class LayerState:
    """Compressed K/V of one layer for a batch: low-rank keys, landmarks, outliers, local window,
    offloaded values, and a dense tail of generated tokens that only grows.

    A decode step reads and writes only device tensors at fixed addresses, with fixed shapes and
    no host sync, so it can be captured as a CUDA graph and replayed: the tail is preallocated
    (``reserve_tail``, outside the step) and its fill level lives on the device (``tail_fill``).
    ``tail_len`` is the host's copy of that count, advanced by the cache once a step completes.
    """

    def __init__(self, config: ShadowKVConfig) -> None:
        self.config = config
        self.tail_k: torch.Tensor | None = None
        self.tail_v: torch.Tensor | None = None
        self.tail_len = 0
        self.tail_fill: torch.Tensor | None = None

    def prefill(
        self,
        k_pre: torch.Tensor,
        k_rot: torch.Tensor,
        v: torch.Tensor,
        rope_tables: list[torch.Tensor],
        layout: PromptLayout,
        tail_capacity: int,
    ) -> None:
        """Compress a left-padded prompt. ``k_pre, k_rot, v: [B, Hkv, S, D]``; tables ``[B, 1, S, c]``.

        ``tail_capacity`` generated tokens fit before the tail buffers must move (``reserve_tail``).
        """
        cfg = self.config
        chunk = cfg.chunk_size
        b_size, hkv, _, d = k_pre.shape
        c_max = layout.max_chunks
        outlier_tokens = cfg.outlier_chunks * chunk if c_max else 0
        self.rope_tables = rope_tables
        self.pad = torch.tensor(layout.pad, device=k_pre.device)
        self.outlier_valid = torch.tensor([c > 0 for c in layout.chunks], device=k_pre.device)
        us, svs, lms, sels, oks, ovs, lks, lvs, vcs = ([] for _ in range(9))
        for b in range(b_size):
            start, n_chunks = layout.pad[b], layout.chunks[b]
            t = n_chunks * chunk
            kp, kr, vb = (x[b, :, start:] for x in (k_pre, k_rot, v))
            lks.append(kr[:, t:])
            lvs.append(vb[:, t:])
            if not c_max:
                continue
            if n_chunks:
                u, sv = ref.low_rank_keys(kp[:, :t], cfg.rank)
                landmarks, min_cos = ref.chunk_landmarks(kr[:, :t], chunk)
                outliers = torch.topk(-min_cos, cfg.outlier_chunks, dim=-1).indices
                selectable = torch.ones(hkv, n_chunks, dtype=torch.bool, device=k_pre.device)
                selectable.scatter_(1, outliers, False)
                token_idx = chunk_tokens(outliers, chunk)
                oks.append(torch.gather(kr, 1, token_idx[..., None].expand(-1, -1, d)))
                ovs.append(torch.gather(vb, 1, token_idx[..., None].expand(-1, -1, d)))
            else:
                u = k_pre.new_zeros(0, cfg.rank, dtype=torch.float32)
                sv = k_pre.new_zeros(hkv, cfg.rank, d, dtype=torch.float32)
                landmarks = k_pre.new_zeros(hkv, 0, d, dtype=torch.float32)
                selectable = torch.zeros(hkv, 0, dtype=torch.bool, device=k_pre.device)
                oks.append(k_rot.new_zeros(hkv, outlier_tokens, d))
                ovs.append(v.new_zeros(hkv, outlier_tokens, d))
            us.append(u.to(k_pre.dtype))
            svs.append(sv.to(k_pre.dtype))
            lms.append(landmarks.to(k_rot.dtype))
            sels.append(selectable)
            vcs.append(vb[:, :t].reshape(hkv, n_chunks, chunk, d))
        local_max = max(x.shape[1] for x in lks)
        self.local_k, self.local_v = _pad_stack(lks, local_max, 1), _pad_stack(lvs, local_max, 1)
        local_lens = torch.tensor([x.shape[1] for x in lks], device=k_pre.device)
        self.local_valid = torch.arange(local_max, device=k_pre.device) < local_lens[:, None]
        self.compressed = c_max > 0
        if self.compressed:
            # fixed at prefill so a decode step needs no device-to-host read to size its top-k
            self.select_k = min(cfg.budget_chunks, max(c - cfg.outlier_chunks for c in layout.chunks if c))
            self.u = _pad_stack(us, c_max * chunk, 0)
            self.sv = torch.stack(svs)
            self.landmarks = _pad_stack(lms, c_max, 1)
            self.selectable = _pad_stack(sels, c_max, 1)
            self.outlier_k, self.outlier_v = torch.stack(oks), torch.stack(ovs)
            self.v_chunks = _host_buffer_like(_pad_stack(vcs, c_max, 1))
        # zeros, not empty: unwritten slots are masked, but NaN garbage would survive a 0 weight
        self.tail_k = k_rot.new_zeros(b_size, hkv, tail_capacity, d)
        self.tail_v = v.new_zeros(b_size, hkv, tail_capacity, v.shape[-1])
        self.tail_len = 0
        self.tail_fill = torch.zeros((), dtype=torch.long, device=k_pre.device)

    def reserve_tail(self, tokens: int) -> bool:
        """Make room for ``tokens`` more generated tokens; True when the buffers had to move.

        Runs before a step, never inside one: a captured step would keep writing to the old buffers.
        The capacity doubles, so no generated token is ever dropped.
        """
        needed = self.tail_len + tokens
        capacity = self.tail_k.shape[2]
        if needed <= capacity:
            return False
        capacity = max(2 * capacity, needed)
        for name in ("tail_k", "tail_v"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
            new[:, :, : self.tail_len] = old[:, :, : self.tail_len]
            setattr(self, name, new)
        return True

    def rewind_tail(self) -> None:
        """Forget tokens a failed step appended: the device count goes back to the host's."""
        if self.tail_fill is not None:
            self.tail_fill.fill_(self.tail_len)

    def append_tail(self, k_rot: torch.Tensor, v: torch.Tensor) -> None:
        """Write new tokens at the device-side fill level (a replayed step reads the current one)."""
        n = k_rot.shape[2]
        slots = self.tail_fill + torch.arange(n, device=self.tail_fill.device)
        self.tail_k.index_copy_(2, slots, k_rot.to(self.tail_k.dtype))
        self.tail_v.index_copy_(2, slots, v.to(self.tail_v.dtype))
        self.tail_fill.add_(n)

    def select(self, q: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k chunks per KV head: ``chunk_idx [B, Hkv, k]`` and whether each pick is real."""
        scores = ref.score_chunks(q, self.landmarks, self.selectable, scale)
        top = torch.topk(scores, self.select_k, dim=-1)
        return top.indices, torch.isfinite(top.values)

    def sparse_keys_values(self, chunk_idx: torch.Tensor, rope_fn: RopeFn) -> tuple[torch.Tensor, torch.Tensor]:
        """Rebuild the chosen chunks' keys (low rank, then RoPE at their positions) and fetch their values."""
        chunk = self.config.chunk_size
        token_idx = chunk_tokens(chunk_idx, chunk)
        k_pre = ref.rebuild_keys(self.u, self.sv, token_idx)
        # picks of a shorter sequence's padding chunks point past its prompt; they are masked later
        positions = (token_idx + self.pad[:, None, None]).clamp(max=self.rope_tables[0].shape[2] - 1)
        tables = [ref.gather_positions(t, positions) for t in self.rope_tables]
        k_rot = rope_fn(k_pre, *tables).to(self.local_k.dtype)
        v = dispatch.gather_value_chunks(self.v_chunks, chunk_idx, self.local_v.device)
        return k_rot, v

    def decode(self, q: torch.Tensor, k_rot_new: torch.Tensor, v_new: torch.Tensor, rope_fn: RopeFn, scale: float) -> torch.Tensor:
        """Attend ``q [B, Hq, n, D]`` over outliers + selected chunks + local window + generated tail.

        With several new tokens (speculative verification) each selects its own chunks, as it
        would decoding one at a time, so speculation never changes the output.
        """
        self.append_tail(k_rot_new, v_new)
        n = q.shape[2]
        if n > 1 and self.compressed:
            return torch.cat([self._attend(q[:, :, i : i + 1], rope_fn, scale, n - 1 - i) for i in range(n)], dim=2)
        return self._attend(q, rope_fn, scale, 0)

    def _attend(self, q: torch.Tensor, rope_fn: RopeFn, scale: float, newer: int) -> torch.Tensor:
        """``q``'s rows are the tail tokens just before the ``newer`` newest ones."""
        b, hkv = self.local_k.shape[:2]
        n = q.shape[2]
        keys, values, allowed = [], [], []
        if self.compressed:
            chunk_idx, picked = self.select(q, scale)
            k_sel, v_sel = self.sparse_keys_values(chunk_idx, rope_fn)
            keys += [self.outlier_k, k_sel]
            values += [self.outlier_v, v_sel]
            allowed += [
                self.outlier_valid[:, None, None, None].expand(b, hkv, n, self.outlier_k.shape[2]),
                picked.repeat_interleave(self.config.chunk_size, dim=-1)[:, :, None, :].expand(b, hkv, n, -1),
            ]
        keys += [self.local_k, self.tail_k]
        values += [self.local_v, self.tail_v]
        # the whole preallocated tail, masked past the fill level: shapes stay fixed step to step
        tail_pos = torch.arange(self.tail_k.shape[2], device=q.device)
        query_pos = self.tail_fill - newer - n + torch.arange(n, device=q.device)
        allowed += [
            self.local_valid[:, None, None, :].expand(b, hkv, n, -1),
            (tail_pos[None, :] <= query_pos[:, None])[None, None].expand(b, hkv, n, -1),
        ]
        return dispatch.masked_attention(q, torch.cat(keys, 2), torch.cat(values, 2), torch.cat(allowed, 3), scale)

    def memory_bytes(self) -> dict[str, tuple[str, int]]:
        """Bytes per component as ``name -> (side, bytes)``; side is "gpu" (the model's device) or "cpu" (host)."""
        def size(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.numel() * t.element_size()

        parts: dict[str, tuple[str, int]] = {}
        if self.compressed:
            parts["U"] = ("gpu", size(self.u))
            parts["SV"] = ("gpu", size(self.sv))
            parts["landmarks"] = ("gpu", size(self.landmarks))
            parts["outliers"] = ("gpu", size(self.outlier_k) + size(self.outlier_v))
            parts["offloaded_V"] = ("cpu", size(self.v_chunks))
        parts["local"] = ("gpu", size(self.local_k) + size(self.local_v))
        parts["tail"] = ("gpu", size(self.tail_k) + size(self.tail_v))
        return parts
