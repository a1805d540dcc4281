"""Named mutants of the kernels' dispatch layer and of the cache state: each is a small, plausible
bug, applied as a monkeypatch for a whole test session (``SHADOWKV_MUTANT=name``, read by
tests/conftest.py). ``scripts/mutants.py`` runs a fast subset of the suite under each and requires
it to fail: a mutant the tests do not notice is a missing test.

Every mutant patches a module attribute that the code under test looks up at call time
(``dispatch.X``, ``compression.X``, ``value_reuse.X``, ``fold.X``, ``decode_step.X``, ``LayerState.X``,
``slot_state.X``, ``SlotCache.X``), so the eager path, the compiled
graph (whose ShadowKV op calls back into Python) and the Triton dispatch all see it.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from shadowkv_fx import decode_step, fold, prefill_attention, slot_state
from shadowkv_fx.cache import ShadowKVCache
from shadowkv_fx.kernels import compression, dispatch, value_reuse
from shadowkv_fx.layer_state import LayerState
from shadowkv_fx.slot_cache import SlotCache

MUTANTS: dict[str, tuple[str, Callable[[], None]]] = {}


def mutant(description: str):
    def register(apply: Callable[[], None]) -> Callable[[], None]:
        MUTANTS[apply.__name__] = (description, apply)
        return apply
    return register


def _wrap(owner, name: str, make: Callable[[Callable], Callable]) -> None:
    plain = getattr(owner, name)
    setattr(owner, name, functools.wraps(plain)(make(plain)))


@mutant("the low-rank key rebuild writes zeros instead of the chosen chunks' keys")
def lost_keys() -> None:
    def make(plain):
        def rebuild(*args):
            plain(*args)
            args[-1].zero_()
        return rebuild
    _wrap(dispatch, "rebuild_rope_keys", make)


@mutant("rebuilt keys are rotated at the position after their own")
def rope_off_by_one() -> None:
    def make(plain):
        def rebuild(u, sv, chunk_idx, chunk_size, pad, *rest):
            plain(u, sv, chunk_idx, chunk_size, pad + 1, *rest)
        return rebuild
    _wrap(dispatch, "rebuild_rope_keys", make)


@mutant("at decode, the compiled decoder-layer region of layer 0 reads layer 1's state, and 1 reads 0's")
def regions_swap_layers() -> None:
    from shadowkv_fx import ops

    def make(plain):
        def offset():
            index = plain()
            if ops.has_active_cache() and ops.current_cache().phase == "decode":
                return {0: 1, 1: 0}.get(index, index)
            return index
        return offset
    _wrap(ops, "layer_offset", make)


@mutant("the values of each chosen chunk are read from the next chunk")
def values_from_wrong_chunk() -> None:
    def make(plain):
        def gather(v_chunks, chunk_idx, *rest):
            return plain(v_chunks, (chunk_idx + 1) % v_chunks.shape[2], *rest)
        return gather
    _wrap(dispatch, "gather_value_chunks", make)


@mutant("8-bit values are gathered without their scales: the int8 codes are read as the values")
def dequant_scale_ignored() -> None:
    def make(plain):
        def gather(v_chunks, chunk_idx, device, out=None, fetch=None, scales=None):
            return plain(v_chunks, chunk_idx, device, out, fetch, None if scales is None else torch.ones_like(scales))
        return gather
    _wrap(dispatch, "gather_value_chunks", make)


@mutant("8-bit landmarks are scored without their scales: chunks compare by their codes alone")
def landmark_scale_ignored() -> None:
    def make(plain):
        def score(q, landmarks, selectable, scale, landmark_scale=None):
            ones = None if landmark_scale is None else torch.ones_like(landmark_scale)
            return plain(q, landmarks, selectable, scale, ones)
        return score
    _wrap(dispatch, "score_chunks", make)


@mutant("key codes are scored with every channel's step taken as 1: channels compare by their codes alone")
def code_steps_ignored() -> None:
    def make(plain):
        def score(q, codes, code_scale, selectable, scale):
            flat = code_scale.clone()
            flat[:, :, 0] = 1.0
            return plain(q, codes, flat, selectable, scale)
        return score
    _wrap(dispatch, "score_code_chunks", make)


@mutant("key codes are scored from their low nibbles only: the second half of each key's channels is lost")
def code_high_nibble_dropped() -> None:
    def make(plain):
        def score(q, codes, *rest):
            return plain(q, codes & 15, *rest)
        return score
    _wrap(dispatch, "score_code_chunks", make)


@mutant("top-k picks the lowest-scoring selectable chunks")
def topk_inverted() -> None:
    def make(plain):
        def top(scores, k):
            return plain(torch.where(torch.isfinite(scores), -scores, scores), k)
        return top
    _wrap(dispatch, "top_chunks", make)


@mutant("chunk scores come from the first query head of each GQA group, not the max over the group")
def score_first_head_only() -> None:
    def make(plain):
        def score(q, landmarks, selectable, scale, *rest):
            b, hq, n, d = q.shape
            hkv = landmarks.shape[1]
            first = q.view(b, hkv, hq // hkv, n, d)[:, :, :1].expand(-1, -1, hq // hkv, -1, -1)
            return plain(first.reshape(b, hq, n, d), landmarks, selectable, scale, *rest)
        return score
    _wrap(dispatch, "score_chunks", make)


@mutant("a new token's K/V land one tail slot late: the step reads a stale slot as its own")
def stale_tail_slot() -> None:
    def make(plain):
        def append(state, *args):
            state.tail_fill.add_(1)
            plain(state, *args)
            state.tail_fill.sub_(1)
        return append
    _wrap(decode_step, "append_tail", make)


@mutant("decode attention ignores the key mask (padding and unpicked slots are attended)")
def mask_ignored() -> None:
    def make(plain):
        def attend(q, k_buf, v_buf, key_valid, *rest, **kwargs):
            return plain(q, k_buf, v_buf, torch.ones_like(key_valid), *rest, **kwargs)
        return attend
    _wrap(dispatch, "decode_attention", make)


@mutant("the outlier chunks, kept dense, are masked out of decode attention")
def outliers_ignored() -> None:
    def make(plain):
        def build(self, *args):
            plain(self, *args)
            self.key_valid[:, :, : self.sel_start] = False
        return build
    _wrap(LayerState, "_build_buffers", make)


@mutant("the oldest token of the local window is masked out of decode attention")
def local_window_short() -> None:
    def make(plain):
        def build(self, *args):
            plain(self, *args)
            self.key_valid[:, :, self.local_start] = False
        return build
    _wrap(LayerState, "_build_buffers", make)


@mutant("a chunk's landmark is its first token instead of the mean of its keys")
def landmarks_first_token() -> None:
    def landmarks(k_rot, chunk_size):
        hkv, t, d = k_rot.shape
        chunks = k_rot.float().view(hkv, t // chunk_size, chunk_size, d)
        first = chunks[:, :, 0]
        cosine = torch.nn.functional.cosine_similarity(chunks, first.unsqueeze(2), dim=-1)
        return first, cosine.min(dim=-1).values
    compression.chunk_landmarks = landmarks


@mutant("the low-rank factors drop their smallest kept singular component")
def svd_drops_a_component() -> None:
    def make(plain):
        def factors(flat, hkv, rank):
            u, sv, fit_err = plain(flat, hkv, rank)
            kept = int((sv.square().sum(dim=(0, 2)) > 0).sum())  # sv: [Hkv, r, D], components by size
            if kept:
                sv[:, kept - 1] = 0
            return u, sv, fit_err
        return factors
    _wrap(compression, "factor_keys", make)


@mutant("the subspace solver skips its rounds: the key basis is its fixed start's Ritz vectors")
def subspace_skips_its_rounds() -> None:
    compression.SUBSPACE_ROUNDS = 0


@mutant("with value reuse, a slot whose chunk changed keeps the old chunk's values")
def reuse_stale_values() -> None:
    def make(plain):
        def slots(chunk_idx, picked, prev_idx):
            slot_idx, slot_picked, fetch = plain(chunk_idx, picked, prev_idx)
            return slot_idx, slot_picked, fetch & (prev_idx < 0)
        return slots
    _wrap(value_reuse, "stable_slots", make)


@mutant("a fold drops the last chunk it folds: its tokens leave the dense tail and are never selectable")
def fold_drops_a_chunk() -> None:
    def make(plain):
        def fold_rows(state, rows, m, undo):
            plain(state, rows, m, undo)
            state.selectable[rows, :, state.chunks[rows[0]] - 1] = False
        return fold_rows
    _wrap(fold, "_fold_rows", make)


@mutant("folding never refreshes the low-rank basis, however badly new keys project onto it")
def fold_never_refreshes() -> None:
    fold.REFRESH_FLOOR = float("inf")


@mutant("a crop of rejected drafts does not take back the folds made past it")
def fold_undo_ignored() -> None:
    fold.FoldUndo.restore = lambda self: None


@mutant("generated tokens' RoPE inputs are stored one column late: their folded keys rotate wrongly")
def rope_columns_off_by_one() -> None:
    def make(plain):
        def append(state, *args):
            if state.folds:
                state.gen_count.add_(1)
            plain(state, *args)
            if state.folds:
                state.gen_count.sub_(1)
        return append
    _wrap(decode_step, "append_tail", make)


@mutant("decode attention ignores tail_first: tail slots already folded are attended twice")
def folded_tail_attended_twice() -> None:
    def make(plain):
        def attend(q, k_buf, v_buf, key_valid, tail_start, tail_fill, scale, tail_first=None):
            return plain(q, k_buf, v_buf, key_valid, tail_start, tail_fill, scale, None)
        return attend
    _wrap(dispatch, "decode_attention", make)


@mutant("a crop of rejected drafts keeps one of them")
def crop_keeps_a_rejected_draft() -> None:
    def make(plain):
        def crop(self, max_length):
            return plain(self, int(max_length) + 1)
        return crop
    _wrap(ShadowKVCache, "crop", make)


@mutant("the cache numbers a re-aligned (right-padded) batch's new tokens one position late")
def next_positions_off_by_one() -> None:
    def make(plain):
        def positions(self, *args):
            return plain(self, *args) + 1
        return positions
    _wrap(ShadowKVCache, "next_positions", make)


@mutant("a request joining a running slot cache reads the shared tail from its first slot: older rows' tokens too")
def slot_reads_older_rows() -> None:
    def make(plain):
        def adopt(state, b, other):
            dropped = plain(state, b, other)
            state.tail_first[b] = 0
            return dropped
        return adopt
    _wrap(slot_state, "adopt_row", make)


@mutant("a slot's positions count every step of the running cache, not those since its request joined")
def slot_positions_ignore_join() -> None:
    def make(plain):
        def row_positions(self):
            origins = self.layers[0].state.tail_origin
            return [p + origin if live else p for p, origin, live in zip(plain(self), origins, self.live)]
        return row_positions
    _wrap(SlotCache, "row_positions", make)


@mutant("a row joining with a question in its tail (prefix store) counts it as prompt: positions and folds shift")
def slot_question_not_generated() -> None:
    def make(plain):
        def commit(self, b, other, first):
            dropped = plain(self, b, other, first)
            self.tail_origin[b] = self.tail_len
            return dropped
        return commit
    _wrap(LayerState, "commit_adoption", make)


@mutant("several tokens in one forward: each token before the newest also sees the tail slot after its own")
def earlier_tokens_see_the_next() -> None:
    def make(plain):
        def attend(state, q, *rest):
            state.tail_fill.add_(1)
            try:
                return plain(state, q, *rest)
            finally:
                state.tail_fill.sub_(1)
        return attend
    _wrap(decode_step, "attend_earlier", make)


@mutant("a later prefill piece's two halves averaged, not weighted by their log-sum-exps")
def piece_merge_ignores_lse() -> None:
    def make(plain):
        def merge(out_a, lse_a, out_b, lse_b):
            return plain(out_a, torch.zeros_like(lse_a), out_b, torch.zeros_like(lse_b))
        return merge
    _wrap(prefill_attention, "merge_partial", make)


def apply(name: str) -> None:
    if name not in MUTANTS:
        raise ValueError(f"unknown mutant {name!r}; known: {', '.join(MUTANTS)}")
    MUTANTS[name][1]()
