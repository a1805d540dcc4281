"""Quest baseline (Tang et al., 2024) for unmodified HF models, as a custom attention function.

Quest keeps, per page of ``page_size`` prompt tokens and per KV head, the elementwise min and
max of the post-RoPE keys. At each decode step the page score ``sum_d max(q_d * min_d, q_d *
max_d)`` bounds ``q . k`` from above for every key of the page; the top pages fill the token
budget and the step attends exactly over those pages, the recent local window and the
generated tokens.

Page selection needs the decode query, which ``Cache.update`` never sees, so this runs as an
attention function registered through transformers' ``AttentionInterface``: it receives the
query and the full K/V of an ordinary ``DynamicCache``, so the kept keys are the model's own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .baselines import single_unpadded_mask

__all__ = ["QUEST_ATTENTION", "QuestAttention", "page_bounds", "quest_page_scores", "quest_generate"]

QUEST_ATTENTION = "shadowkv_quest"


def page_bounds(keys: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise min and max of the keys of each whole page.

    Parameters
    ----------
    keys:
        ``[B, Hkv, T, D]`` post-RoPE keys; ``T`` must be a multiple of ``page_size``.
    page_size:
        Tokens per page.

    Returns
    -------
    tuple of torch.Tensor
        ``(mins, maxs)``, each ``[B, Hkv, T // page_size, D]`` float32.
    """
    b, h, t, d = keys.shape
    if t % page_size:
        raise ValueError(f"{t} keys do not split into whole pages of {page_size}")
    pages = keys.float().view(b, h, t // page_size, page_size, d)
    return pages.amin(dim=3), pages.amax(dim=3)


def quest_page_scores(query: torch.Tensor, mins: torch.Tensor, maxs: torch.Tensor) -> torch.Tensor:
    """Quest's upper bound of ``q . k`` per page, max over the query heads of each KV group.

    Per query head the bound is ``sum_d max(q_d * min_d, q_d * max_d)``, computed as
    ``relu(q) . max + min(q, 0) . min`` (the larger product picks ``max`` where ``q_d >= 0``
    and ``min`` where ``q_d < 0``), which is two matmuls instead of a ``[G, P, D]`` temporary.
    A GQA group shares one page selection, so the group's score is the *max* over its
    query heads: the page then stays an upper bound of every head's ``q . k`` (a sum would
    let several lukewarm heads outvote one head that needs the page), and it is the same
    group reduction ShadowKV's chunk scoring uses, so both methods pick per KV head alike.

    Parameters
    ----------
    query:
        ``[B, Hq, D]`` one decode query per head (post-RoPE); ``Hq`` a multiple of ``Hkv``.
    mins, maxs:
        ``[B, Hkv, P, D]`` from :func:`page_bounds`.

    Returns
    -------
    torch.Tensor
        ``[B, Hkv, P]`` float32 scores (unscaled logits).
    """
    b, hq, d = query.shape
    hkv = mins.shape[1]
    q = query.float().view(b, hkv, hq // hkv, d)  # query head h belongs to KV head h // G, as in repeat_kv
    bound = q.clamp(min=0) @ maxs.transpose(-1, -2) + q.clamp(max=0) @ mins.transpose(-1, -2)  # [B, Hkv, G, P]
    return bound.amax(dim=2)


class QuestAttention:
    """Attention function doing Quest page selection at decode, plain sdpa otherwise.

    One instance serves one ``generate`` call: the first call of each layer is the prefill,
    which attends densely and records that layer's page bounds; later single-token calls
    select pages. Pages cover the prompt only; its last ``local_pages`` pages plus the
    remainder that does not fill a page (ShadowKV's local window) and every generated
    token are always attended.

    Parameters
    ----------
    token_budget:
        Prompt tokens attended per decode step and KV head (pages + local window); a budget
        covering the prompt decodes densely.
    page_size:
        Tokens per page.
    local_pages:
        Whole pages at the end of the prompt that are always attended.
    """

    def __init__(self, token_budget: int, page_size: int, local_pages: int):
        if token_budget < 1 or page_size < 1 or local_pages < 0:
            raise ValueError(
                f"need token_budget >= 1, page_size >= 1, local_pages >= 0; got {token_budget}, {page_size}, {local_pages}"
            )
        self.token_budget = token_budget
        self.page_size = page_size
        self.local_pages = local_pages
        # layer -> (mins, maxs, pages to pick) or None where the budget covers the prompt.
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor, int] | None] = {}

    def layout(self, prompt_tokens: int) -> tuple[int, int]:
        """``(candidate_pages, pages_kept)`` for a prompt; candidates end where the local window starts."""
        local = min(prompt_tokens, self.local_pages * self.page_size + prompt_tokens % self.page_size)
        candidates = (prompt_tokens - local) // self.page_size
        kept = max(0, self.token_budget - local) // self.page_size
        return candidates, min(kept, candidates)

    def attended_tokens(self, prompt_tokens: int) -> int:
        """Prompt keys a decode query sees (the query's own key and generated ones come on top)."""
        candidates, kept = self.layout(prompt_tokens)
        return prompt_tokens - (candidates - kept) * self.page_size

    def __call__(self, module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
        """``query``: ``[B, Hq, q_len, D]``; ``key``/``value``: ``[B, Hkv, T, D]`` (the whole dense cache)."""
        layer = getattr(module, "layer_idx", id(module))
        if layer not in self.layers:
            # Prefill: dense, and the cache holds exactly the prompt.
            candidates, kept = self.layout(key.shape[-2])
            if kept < candidates:
                mins, maxs = page_bounds(key[..., : candidates * self.page_size, :], self.page_size)
                self.layers[layer] = (mins, maxs, kept)
            else:
                self.layers[layer] = None
        elif query.shape[-2] != 1:
            raise NotImplementedError("Quest decodes one token per step (no speculative or chunked decoding)")
        state = self.layers[layer]
        if query.shape[-2] != 1 or state is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        mins, maxs, kept = state
        return self._sparse_decode(query, key, value, mins, maxs, kept, scaling)

    def _sparse_decode(self, query, key, value, mins, maxs, kept, scaling):
        b, hq, _, d = query.shape
        hkv, total = key.shape[1], key.shape[2]
        pages = quest_page_scores(query[:, :, 0], mins, maxs).topk(kept, dim=-1).indices.sort(dim=-1).values
        page_tokens = (pages[..., None] * self.page_size + torch.arange(self.page_size, device=key.device)).flatten(2)
        # Everything past the candidate pages: local window, generated tokens, the current one.
        tail = torch.arange(mins.shape[2] * self.page_size, total, device=key.device).expand(b, hkv, -1)
        index = torch.cat([page_tokens, tail], dim=-1)[..., None].expand(-1, -1, -1, d)  # [B, Hkv, N, D]
        group = hq // hkv
        k_sel = key.gather(2, index).repeat_interleave(group, dim=1)  # [B, Hq, N, D]
        v_sel = value.gather(2, index).repeat_interleave(group, dim=1)
        # Every kept key precedes the query (batch 1, no padding), so no mask is needed.
        out = F.scaled_dot_product_attention(query, k_sel, v_sel, scale=scaling)
        return out.transpose(1, 2).contiguous(), None


@torch.no_grad()
def quest_generate(
    model,
    input_ids: torch.Tensor,
    token_budget: int,
    page_size: int,
    local_pages: int,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    **generate_kwargs,
) -> torch.Tensor:
    """Greedy ``model.generate`` with Quest page selection at every decode step.

    The model's attention implementation is switched to :data:`QUEST_ATTENTION` for the
    call and restored afterwards. No mask function is registered for it, so HF passes
    ``attention_mask=None``: the prefill runs causal sdpa and a decode query sees every
    cached key, which is right only for batch size 1 without padding (enforced here).

    Parameters
    ----------
    model:
        An unmodified Hugging Face causal LM whose attention goes through ``AttentionInterface``.
    input_ids:
        ``(1, prompt_len)`` token ids.
    token_budget, page_size, local_pages:
        See :class:`QuestAttention`.
    max_new_tokens:
        Decode steps.
    attention_mask:
        Optional ``(1, prompt_len)`` mask; it must be all ones.
    **generate_kwargs:
        Forwarded to ``generate``.

    Returns
    -------
    torch.Tensor
        ``generate``'s output (prompt followed by the new tokens).
    """
    attention_mask = single_unpadded_mask(input_ids, attention_mask, "quest_generate")
    attention = QuestAttention(token_budget, page_size, local_pages)
    # Registering under a fixed name replaces the previous call's instance.
    AttentionInterface.register(QUEST_ATTENTION, attention)
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = QUEST_ATTENTION
    generate_kwargs.setdefault("do_sample", False)
    try:
        return model.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, **generate_kwargs
        )
    finally:
        config._attn_implementation = previous
        attention.layers.clear()
