"""StreamingLLM-style "attention sink + local window" baseline for unmodified HF models.

The baseline answers the question "is ShadowKV better than simply keeping the first
few and the last few tokens?" at the same number of attended tokens. It plugs into
``model.generate(past_key_values=...)`` through a custom cache, so the model itself
is left untouched and the comparison runs on the exact same weights.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from shadowkv_fx import compat

__all__ = [
    "single_unpadded_mask",
    "SinkLocalLayer",
    "SinkLocalCache",
    "sink_local_generate",
    "sink_local_window_for_budget",
]


def single_unpadded_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, who: str) -> torch.Tensor:
    """The all-ones mask of one unpadded prompt; the baselines' caches assume exactly that."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"{who} supports batch size 1 only")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if not bool(attention_mask.all()):
        raise ValueError(f"{who} does not support padding")
    return attention_mask


class SinkLocalLayer(DynamicLayer):
    """One layer's cache that keeps ``n_sink`` leading tokens and a rolling tail.

    The prefill attends densely (the whole prompt is returned by the first
    ``update``); only what is *stored* for later steps is trimmed. At every decode
    step the query therefore sees ``n_sink`` sink tokens plus the last ``window``
    tokens of the sequence, the current one included.

    Parameters
    ----------
    n_sink:
        Leading tokens that are never evicted (attention sinks).
    window:
        Most recent tokens attended at each decode step, the query token included.
    """

    is_sliding = False
    # Rolling back after eviction would need the evicted states; refuse rather than lie.
    is_croppable = False

    def __init__(self, n_sink: int, window: int, **kwargs):
        super().__init__(**kwargs)
        if n_sink < 0 or window < 1:
            raise ValueError(f"need n_sink >= 0 and window >= 1, got n_sink={n_sink}, window={window}")
        self.n_sink = n_sink
        self.window = window
        # Tokens seen so far: RoPE positions and the query offset come from it,
        # so positions stay the original ones after eviction.
        self.cumulative_length = 0

    @property
    def capacity(self) -> int:
        """Tokens kept between steps: the sinks plus ``window - 1`` (room for the next query)."""
        return self.n_sink + self.window - 1

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        full_keys = torch.cat([self.keys, key_states], dim=-2)
        full_values = torch.cat([self.values, value_states], dim=-2)
        if full_keys.shape[-2] > self.capacity:
            # Keys are cached post-RoPE, so dropping the middle keeps every kept key
            # at its original position.
            tail_start = full_keys.shape[-2] - (self.window - 1)
            self.keys = torch.cat([full_keys[..., : self.n_sink, :], full_keys[..., tail_start:, :]], dim=-2)
            self.values = torch.cat([full_values[..., : self.n_sink, :], full_values[..., tail_start:, :]], dim=-2)
        else:
            self.keys, self.values = full_keys, full_values
        return full_keys, full_values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Size the mask to the keys ``update`` will return, ending at the last query.

        HF builds the causal mask over absolute key indices ``kv_offset .. kv_offset +
        kv_length``. The kept keys are not contiguous, but with batch size 1 and no
        padding every kept key precedes the queries, so shifting the offset so that the
        range ends at the last query yields exactly "all kept keys visible, causal among
        the new ones".
        """
        kv_length = min(self.cumulative_length, self.capacity) + query_length
        kv_offset = self.cumulative_length + query_length - kv_length
        return kv_length, kv_offset

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SinkLocalLayer evicts tokens and cannot be cropped")


class SinkLocalCache(Cache):
    """A cache of :class:`SinkLocalLayer` for ``model.generate(past_key_values=...)``.

    Only batch size 1 without padding is supported (see
    :meth:`SinkLocalLayer.get_mask_sizes`); :func:`sink_local_generate` enforces it.

    Parameters
    ----------
    num_layers:
        Decoder layers of the model (``config.num_hidden_layers``).
    n_sink, window:
        See :class:`SinkLocalLayer`.
    """

    def __init__(self, num_layers: int, n_sink: int, window: int):
        super().__init__(layers=[SinkLocalLayer(n_sink, window) for _ in range(num_layers)])
        self.n_sink = n_sink
        self.window = window

    def attended_tokens(self, context_tokens: int) -> int:
        """Prompt keys a decode query sees right after a ``context_tokens``-token prefill.

        The query's own key comes on top, as for ShadowKV's count.
        """
        return min(context_tokens, self.n_sink + self.window - 1)


def sink_local_window_for_budget(attended_tokens: int, n_sink: int) -> int:
    """Window that makes the first decode step attend ``attended_tokens`` prompt keys.

    Parameters
    ----------
    attended_tokens:
        Prompt keys to attend (sinks + tail); the query's own key comes on top.
    n_sink:
        Sink tokens.

    Returns
    -------
    int
        ``attended_tokens - n_sink + 1`` (the window counts the query), at least 1.
    """
    return max(1, attended_tokens - n_sink + 1)


@torch.no_grad()
def sink_local_generate(
    model,
    input_ids: torch.Tensor,
    n_sink: int,
    window: int,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    **generate_kwargs,
) -> torch.Tensor:
    """Greedy ``model.generate`` with the sink + local window cache.

    Parameters
    ----------
    model:
        An unmodified Hugging Face causal LM with a standard attention cache.
    input_ids:
        ``(1, prompt_len)`` token ids.
    n_sink, window:
        See :class:`SinkLocalLayer`.
    max_new_tokens:
        Decode steps.
    attention_mask:
        Optional ``(1, prompt_len)`` mask; it must be all ones.
    **generate_kwargs:
        Forwarded to ``generate`` (``eos_token_id``, ``pad_token_id``...).

    Returns
    -------
    torch.Tensor
        ``generate``'s output (prompt followed by the new tokens).
    """
    attention_mask = single_unpadded_mask(input_ids, attention_mask, "sink_local_generate")
    cache = SinkLocalCache(model.config.get_text_config().num_hidden_layers, n_sink, window)
    generate_kwargs.setdefault("do_sample", False)
    return model.generate(
        input_ids,
        attention_mask=attention_mask,
        **{compat.CACHE_ARG: cache},
        max_new_tokens=max_new_tokens,
        **generate_kwargs,
    )
