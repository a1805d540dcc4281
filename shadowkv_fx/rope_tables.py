"""The batch's per-position RoPE inputs (cos/sin or their like), kept once for all layers that
share them, at one row for a batch of equal-length prompts."""
from __future__ import annotations

import torch

from shadowkv_fx.column_staging import column_buffers, write_columns
from shadowkv_fx.prompt_layout import PromptLayout


class SharedRopeTables:
    """Sets of ``[B or 1, 1, S, c]`` tables in the batch's padded layout; each layer reads one set.

    Layers whose tables are equal share one copy (they usually do: cos/sin are computed once per
    forward). A batch of equal-length prompts (one padded layout) keeps one row, read with a zero
    batch stride, while every sequence's table equals it, as tables of positions do: 59 MiB per
    122K sequence of a Llama-3.1-8B shape. The first sequence that differs widens it to a row each.
    """

    def __init__(self) -> None:
        self.sets: list[list[torch.Tensor]] = []
        # per set, what this prefill forward last wrote into it: (_source_key, the tables themselves). Held, so no
        # other tensor can take their memory while a later layer's key is compared with it
        self._sources: dict[int, tuple[tuple, list[torch.Tensor]]] = {}
        self.pieces = PieceTables()  # a prompt prefilled in pieces: its tables so far
        self._of_layer: dict[int, int] = {}
        self._filled: set[int] = set()  # sets a sequence's rows were written into

    def for_layer(self, layer_idx: int, tables: list[torch.Tensor], rows: list[int], group: PromptLayout,
                  layout: PromptLayout) -> tuple[list[torch.Tensor], bool]:
        """Write this prefill group's rows (``rows`` of the batch, laid out as ``group``) of one
        layer's tables into the batch's set; return the set and whether this layer is the first
        reading it (layers run in order each step, so that one writes the new columns for all)."""
        batch = len(layout.lengths)
        key = _source_key(tables, rows, group)
        index = self._of_layer.get(layer_idx)
        if index is None:  # a set written from these very tensors needs no look at their values (a host sync)
            index = next((i for i, (k, _) in self._sources.items() if k == key), None)
            if index is None:
                index = next((i for i, shared in enumerate(self.sets)
                              if self._holds(shared, tables, rows, group, layout)), None)
            if index is None:
                # a copy, never a view: under CUDA graphs the inputs live in memory the next replay reuses
                height = 1 if len(set(layout.pad)) == 1 else batch
                self.sets.append([t.new_zeros(height, 1, layout.padded_len, t.shape[-1]) for t in tables])
                index = len(self.sets) - 1
            self._of_layer[layer_idx] = index
        shared = self.sets[index]
        written = index in self._sources and self._sources[index][0] == key  # this forward, from these tensors
        for j, b in enumerate(() if written else rows):
            first = index not in self._filled
            self._filled.add(index)
            for i, t in enumerate(tables):
                new, table = t[min(j, t.shape[0] - 1), :, group.pad[j]:], shared[i]
                if table.shape[0] < batch and not first:
                    if torch.equal(table[0, :, layout.pad[b]:], new):
                        continue
                    table = self._widen(shared, i, batch)
                table[b if table.shape[0] == batch else 0, :, layout.pad[b]:] = new
        self._sources[index] = (key, list(tables))
        writes = min(i for i, j in self._of_layer.items() if j == index) == layer_idx
        return shared, writes

    @staticmethod
    def _holds(shared, tables, rows, group, layout) -> bool:
        return len(shared) == len(tables) and all(
            s.shape[-1] == t.shape[-1] and s.dtype == t.dtype
            and all(torch.equal(s[min(b, s.shape[0] - 1), :, layout.pad[b]:],
                                t[min(j, t.shape[0] - 1), :, group.pad[j]:])
                    for j, b in enumerate(rows))
            for s, t in zip(shared, tables))

    def widen_for(self, position_ids: torch.Tensor, batch: int) -> bool:
        """Give every sequence its own rows before a step whose caller-given positions differ
        between sequences (one-row tables assume they do not); True when a table was widened."""
        if position_ids.shape[0] < 2 or not any(t.shape[0] == 1 for ts in self.sets for t in ts):
            return False
        if bool((position_ids == position_ids[:1]).all()):
            return False
        for shared in self.sets:
            for i, table in enumerate(shared):
                if table.shape[0] == 1:
                    self._widen(shared, i, batch)
        return True

    @staticmethod
    def _widen(shared: list[torch.Tensor], i: int, batch: int) -> torch.Tensor:
        """Table ``i`` of ``shared`` as a row per sequence, in place in the list (the layers'
        states hold the list, so each reads the widened table)."""
        shared[i] = shared[i].expand(batch, -1, -1, -1).clone()
        return shared[i]

    def for_slots(self, tables: list[torch.Tensor], rows: int, width: int) -> list[torch.Tensor]:
        """A set of tables shaped like ``tables`` for the slots of a running cache (``slot_cache``):
        ``[rows, 1, width, c]``, a row per slot and a column per position (no padding)."""
        shared = [t.new_zeros(rows, 1, width, t.shape[-1]) for t in tables]
        self.sets.append(shared)
        return shared

    def restore(self, sets: list[list[torch.Tensor]], of_layer: dict[int, int]) -> None:
        """Tables a saved cache held (cache_io.load): ``sets``, already filled, and the set each layer reads."""
        self.sets, self._of_layer, self._filled = sets, dict(of_layer), set(range(len(sets)))
        self._sources = {}

    def forget_sources(self, prompt_done: bool) -> None:
        """Drop the tables a prefill forward wrote from (``for_layer``'s identity check), at its end, and once the
        prompt's last piece is done, its staged pieces."""
        self._sources = {}
        if prompt_done:
            self.pieces = PieceTables()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.sets for t in ts)


class PieceTables:
    """The RoPE inputs of a prompt that goes through the model in pieces, staged until its last piece once for
    all the layers handed the same tables in every piece so far (views of one tensor: ``_source_key``), not once
    a layer: at 122K tokens a layer's cos and sin are 63 MB (bf16, D = 128), 2 GB over 32 layers, and the layers
    then share one set without comparing values (``SharedRopeTables.for_layer``)."""

    def __init__(self) -> None:
        self._sets: list[list[torch.Tensor]] = []  # [rows, *, total, c] buffers, columns up to the piece's end
        self._of_layer: dict[int, int] = {}
        self._span: tuple[int, int] | None = None
        # this piece: (the layer's set before it, _source_key) -> its set now; sets written; the tables, held
        self._piece: dict[tuple, int] = {}
        self._written: set[int] = set()
        self._held: list[list[torch.Tensor]] = []

    def stage(self, layer_idx: int, tables: list[torch.Tensor], span: tuple[int, int], total: int,
              rows: list[int]) -> list[torch.Tensor]:
        """Layer ``layer_idx``'s tables (``[rows, *, span, c]``, padded-prompt columns ``span`` of ``total``) added
        to its prompt's so far; returns its tables up to the span's end."""
        start, end = span
        if start == 0 and end == total:
            return tables
        if span != self._span:
            if start == 0:  # a group's first piece: the last group's tables are done with
                self._sets, self._of_layer = [], {}
            self._span, self._piece, self._written, self._held = span, {}, set(), []
        before = self._of_layer.get(layer_idx) if start else None
        key = (before, _source_key(tables, rows, None))
        index = self._piece.get(key)
        if index is None:
            if before is not None and before not in self._written:
                index = before  # the first of its set this piece: write the piece into the set
            else:  # a new set: the first piece, or tables that differ now from the others' of its set
                self._sets.append(column_buffers(tables, total))
                index = len(self._sets) - 1
                if before is not None:
                    for buf, old in zip(self._sets[index], self._sets[before]):
                        buf[:, :, :start] = old[:, :, :start]
            write_columns(self._sets[index], tables, start, end)
            self._piece[key], self._written = index, self._written | {index}
            self._held.append(list(tables))
        self._of_layer[layer_idx] = index
        return [buf[:, :, :end] for buf in self._sets[index]]


def _source_key(tables: list[torch.Tensor], rows: list[int], group: PromptLayout | None) -> tuple:
    """What makes two layers' tables the same values without reading them: the same memory, view, dtype and
    version (no write since) of each table, for the same rows of the batch in the same layout."""
    return (tuple(rows), None if group is None else tuple(group.pad), tuple(_memory(t) for t in tables))


def _memory(t: torch.Tensor):
    """A table's memory, view, dtype and version; a key equal to no other where there is none to read: an
    inference tensor counts no writes, a wrapper subclass (a DTensor) has no storage of its own."""
    if t.is_inference() or type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
        return object()
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device, t._version


def reserve_columns(tables: list[torch.Tensor], width: int) -> bool:
    """Widen each of a (layer-shared) set of per-position tables to ``width`` columns, in place in
    the list; True when any moved.

    Folded chunks of generated tokens are rotated at their own positions, read from the columns
    decode steps write after the prompt's.
    """
    moved = False
    for i, table in enumerate(tables):
        if table.shape[2] < width:
            wide = table.new_zeros(*table.shape[:2], width, table.shape[3])
            wide[:, :, : table.shape[2]] = table
            tables[i] = wide  # the list is shared: every layer reading it sees the new table
            moved = True
    return moved
