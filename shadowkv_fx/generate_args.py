"""Which ``generate()`` arguments ShadowKV serves, decided before any prefill work.

Every argument either works as in plain transformers or is refused here, naming it: a refusal
after the prefill wastes the user's time, and a silently different answer is worse.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

# Arguments whose answer needs what ShadowKV does not keep (every head's full attention matrix),
# or a cache that beam search reorders.
_REFUSED = {
    "output_attentions": "ShadowKV never forms full attention weights; generate without output_attentions",
    "output_hidden_states": "the compiled ShadowKV graph returns logits only; generate without output_hidden_states "
                            "(or run the model dense for hidden states)",
}


@dataclass
class GeneratePlan:
    """What the optimized ``generate`` does with one call's arguments."""

    use_cache: bool
    new_tokens: int
    prefill_chunk_size: int | None
    prompt_length: int | None  # columns of input_ids: a longer first forward carries draft tokens


def _setting(kwargs: dict, config, name: str, default=None):
    if name in kwargs:
        return kwargs[name]
    return getattr(config, name, default) if config is not None else default


def _prompt(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    return (ids if isinstance(ids, torch.Tensor) else None), kwargs.get("attention_mask")


def plan_generate(model, args: tuple, kwargs: dict, max_positions: int | None) -> GeneratePlan:
    """Check ``generate(*args, **kwargs)`` for an optimized model and rewrite ``kwargs`` in place.

    Raises
    ------
    NotImplementedError
        beam search, from any source (argument, ``generation_config``, the model's defaults).
    ValueError
        an argument ShadowKV cannot honour, or a prompt + ``max_new_tokens`` past the context.
    """
    config = kwargs.get("generation_config") or model.generation_config
    for name in ("num_beams", "num_beam_groups"):
        if (_setting(kwargs, config, name, 1) or 1) > 1:
            raise NotImplementedError(f"ShadowKV does not support beam search ({name} > 1); use greedy or sampling")
    for name, why in _REFUSED.items():
        if _setting(kwargs, config, name, False):
            raise ValueError(f"{name}=True is not supported by ShadowKV: {why}")
    if kwargs.get("inputs_embeds") is not None:
        raise ValueError("ShadowKV generates from input_ids, not inputs_embeds")
    implementation = _setting(kwargs, config, "cache_implementation")
    if implementation is not None:
        warnings.warn(
            f"cache_implementation={implementation!r} is ignored: a ShadowKV-optimized model always uses its "
            "compressed ShadowKVCache", stacklevel=4,
        )
        kwargs["cache_implementation"] = None
    chunk = _setting(kwargs, config, "prefill_chunk_size")
    if chunk is not None:
        # ShadowKV runs the pieces itself so the whole prompt is compressed at the end
        kwargs["prefill_chunk_size"] = None
    use_cache = _setting(kwargs, config, "use_cache", True)
    new_tokens = _new_tokens(kwargs, config, max_positions)
    ids, mask = _prompt(args, kwargs)
    if max_positions is not None and ids is not None and ids.dim() == 2 and ids.shape[1]:
        longest = int(mask.sum(dim=1).max()) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else ids.shape[1]
        max_new = _setting(kwargs, config, "max_new_tokens")
        needed = longest + max_new if max_new is not None else max(longest, _setting(kwargs, config, "max_length") or 0)
        if needed > max_positions:
            raise ValueError(
                f"a prompt of {longest} tokens plus max_new_tokens reaches {needed} positions, past the model's "
                f"context (max_position_embeddings={max_positions}): shorten the prompt or lower max_new_tokens"
            )
    prompt_length = ids.shape[1] if ids is not None and ids.dim() == 2 else None
    return GeneratePlan(bool(use_cache), new_tokens, chunk, prompt_length)


def _new_tokens(kwargs: dict, config, max_positions: int | None) -> int:
    """Room for every token ``generate`` may add, so the tail never moves mid-generation."""
    tokens = _setting(kwargs, config, "max_new_tokens")
    if tokens is None:
        tokens = _setting(kwargs, config, "max_length") or 64
    return max(1, min(int(tokens), max_positions or int(tokens)))


def end_streamer(kwargs: dict) -> None:
    """A refused call still ends its streamer, so a reader without a timeout is not left waiting."""
    streamer = kwargs.get("streamer")
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
