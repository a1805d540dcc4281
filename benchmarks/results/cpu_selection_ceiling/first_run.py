"""MODE=oracle: oracle selection: each decode step picks the chunks holding the most exact attention mass
(keys rebuilt for every chunk), in place of the landmark scores. Ceiling of any chunk scoring."""
import dataclasses, sys
import weakref

import torch
from shadowkv_fx import ShadowKVConfig, load_smollm2, decode_step
from shadowkv_fx.kernels import dispatch
from shadowkv_fx.evaluation.runner import run_eval


_KEYS = {}  # id(state.u) -> a prompt's keys, rebuilt once per layer, dropped with u


def oracle_select(state, q, scale, rope_fn):
    b, hkv, c = state.selectable.shape
    chunk = state.config.chunk_size
    version, keys = _KEYS.get(id(state.u), (None, None))
    now = (state.u._version, state.sv._version, c)
    if keys is None or version != now:
        idx = torch.arange(c, device=q.device).expand(b, hkv, c)
        keys = torch.empty(b, hkv, c * chunk, q.shape[-1], dtype=state.k_buf.dtype, device=q.device)
        dispatch.rebuild_rope_keys(state.u, state.sv, idx, chunk, state.pad, state.rope_tables, state.rope_form,
                                   rope_fn, keys)
        if id(state.u) not in _KEYS:
            weakref.finalize(state.u, _KEYS.pop, id(state.u), None)
        _KEYS[id(state.u)] = (now, keys)
    hq, n, d = q.shape[1:]
    g = q.float().view(b, hkv, hq // hkv, n, d)
    if MODE.startswith("rescore"):  # landmarks pick m x k candidates, their exact mass the k
        m = int(MODE[len("rescore"):])
        first = dispatch.score_chunks(q, state.landmarks, state.selectable, scale, state.landmark_scale)
        cand_idx, cand_real = dispatch.top_chunks(first, min(m * state.select_k, c))
        tok = (cand_idx.long()[..., None] * chunk + torch.arange(chunk)).flatten(-2)
        ck = keys.float().gather(2, tok[..., None].expand(*tok.shape, d))
        logits = torch.einsum("bhgnd,bhtd->bhgnt", g, ck) * scale
        real = cand_real.repeat_interleave(chunk, -1)
        logits = logits.masked_fill(~real[:, :, None, None, :], float("-inf"))
        mass = torch.softmax(logits, -1).nan_to_num(0.0).view(b, hkv, hq // hkv, n, -1, chunk).sum(-1).sum(3).amax(2)
        mass = mass.masked_fill(~cand_real, float("-inf"))
        top = mass.topk(state.select_k, dim=-1).indices
        return cand_idx.gather(-1, top), cand_real.gather(-1, top)
    if MODE == "bounds":  # Quest's page bound per chunk, from the rebuilt keys
        pages = keys.float().view(b, hkv, c, chunk, d)
        lo, hi = pages.amin(3), pages.amax(3)
        bound = torch.einsum("bhgnd,bhcd->bhgnc", g.clamp(min=0), hi) + torch.einsum("bhgnd,bhcd->bhgnc", g.clamp(max=0), lo)
        bound = (bound * scale).masked_fill(~state.selectable[:, :, None, None, :], float("-inf"))
        score = torch.softmax(bound, -1).nan_to_num(0.0).sum(3).amax(2)
        return dispatch.top_chunks(score.masked_fill(~state.selectable, float("-inf")), state.select_k)
    logits = torch.einsum("bhgnd,bhtd->bhgnt", g, keys.float()) * scale
    tokens = state.selectable.repeat_interleave(chunk, -1)
    logits = logits.masked_fill(~tokens[:, :, None, None, :], float("-inf"))
    mass = torch.softmax(logits, -1).nan_to_num(0.0).view(b, hkv, hq // hkv, n, c, chunk).sum(-1).sum(3).amax(2)
    return dispatch.top_chunks(mass.masked_fill(~state.selectable, float("-inf")), state.select_k)


def _attend(state, q, rope_fn, scale, newer):
    if state.compressed:
        decode_step.fill_selected(state, *oracle_select(state, q, scale, rope_fn), rope_fn)
    fill = state.tail_fill - newer if newer else state.tail_fill
    return dispatch.decode_attention(q, state.k_buf, state.v_buf, state.key_valid, state.tail_start, fill, scale,
                                     state.tail_first)


decode_step._attend = _attend
MODE = sys.argv[4] if len(sys.argv) > 4 else "oracle"
model, tok = load_smollm2()
base = ShadowKVConfig()
RANK = int(sys.argv[5]) if len(sys.argv) > 5 else base.rank
variants = {
    f"{MODE}+chunk=4+local=128" + (f"+rank={RANK}" if RANK != base.rank else ""):
        dataclasses.replace(base, chunk_size=4, outlier_chunks=72, local_chunks=32, rank=RANK),
}
run_eval(lambda: load_smollm2()[0], tok, tasks=["extract_json", "multi_needle_all", "table_convert"],
         lengths=[sys.argv[3] if len(sys.argv) > 3 else "2k"],
         budgets=["1/16"], samples_per_task=int(sys.argv[2]), methods=["shadowkv"], variants=variants,
         output_json=sys.argv[1])
