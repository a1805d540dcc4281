"""One generation request: its checked settings, its progress, and what it reports.

Everything that can make a request impossible is checked here, when it is added, before any model
work: an empty prompt, a generation mode other than greedy or sampling, and a prompt plus
``max_new_tokens`` longer than a slot holds. Results are transformers' own ``GenerationOutput``
(present with the same fields from 5.17 to 5.24), so code written against ``generate_batch`` reads
ours unchanged. transformers has no "cancelled" status: a cancelled request ends ``FAILED`` with
``error == CANCELLED``.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.continuous_batching.requests import GenerationOutput, RequestStatus

from shadowkv_fx.serving.prefix_store import check_prefix_len

__all__ = ["CANCELLED", "GenerationOutput", "Request", "RequestStatus", "TokenEvent", "check_fits", "new_request"]

CANCELLED = "cancelled"
_SUPPORTED_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)


class TokenEvent(NamedTuple):
    """One step of one request, in the order they happen.

    ``token`` is the new token, or None on the last event of a request cancelled or failed between
    tokens. ``status`` is DECODING, or FINISHED / FAILED on the request's last event, which also
    carries the request's final ``output``."""

    request_id: str
    token: int | None
    status: RequestStatus
    output: GenerationOutput | None = None


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: torch.Tensor  # [S] int64, CPU
    config: GenerationConfig  # this request's own copy, resolved against the model's defaults
    max_new_tokens: int
    seed: int
    streaming: bool = False
    record_timestamps: bool = False
    prefix_len: int | None = None  # the prompt's first prefix_len tokens are a document (serving.prefix_store)
    status: RequestStatus = RequestStatus.PENDING
    generated: list[int] = field(default_factory=list)
    slot: int | None = None
    pending_token: int | None = None  # sampled, not yet fed to the backend
    chooser: object | None = None  # sampling.TokenChooser, built when the prompt's logits arrive
    error: str | None = None
    created_time: float = field(default_factory=time.perf_counter)
    started_time: float = -1.0
    finished_time: float = -1.0
    timestamps: list[float] = field(default_factory=list)

    @property
    def needed_length(self) -> int:
        return self.prompt.numel() + self.max_new_tokens

    def start(self, slot: int) -> None:
        self.slot, self.status, self.started_time = slot, RequestStatus.PREFILLING, time.perf_counter()

    def add_token(self, token: int) -> None:
        self.generated.append(token)
        self.pending_token = token
        if self.record_timestamps:
            self.timestamps.append(time.perf_counter())

    def end(self, status: RequestStatus, error: str | None = None) -> TokenEvent:
        """Enter a terminal state; drop everything that holds memory beyond the output itself."""
        self.status, self.error, self.finished_time = status, error, time.perf_counter()
        self.slot = self.pending_token = self.chooser = None
        token = self.generated[-1] if status == RequestStatus.FINISHED else None
        return TokenEvent(self.request_id, token, status, self.output())

    def output(self) -> GenerationOutput:
        return GenerationOutput(
            request_id=self.request_id, prompt_ids=self.prompt.tolist(), generated_tokens=list(self.generated),
            error=self.error, status=self.status, created_time=self.created_time,
            lifespan=(self.started_time, self.finished_time),
            timestamps=list(self.timestamps) if self.record_timestamps else None,
        )


def _prompt_tensor(request_id: str, input_ids) -> torch.Tensor:
    prompt = torch.as_tensor(input_ids, dtype=torch.long).detach().cpu()
    if prompt.dim() == 2 and prompt.shape[0] == 1:
        prompt = prompt[0]
    if prompt.dim() != 1:
        raise ValueError(f"request {request_id}: input_ids must be one sequence of token ids (a list of ints or a "
                         f"1-D tensor), got shape {tuple(prompt.shape)}; add each sequence as its own request")
    if prompt.numel() == 0:
        raise ValueError(f"request {request_id} has an empty prompt: a request needs at least one token id "
                         "to generate from (add the BOS token if the text is empty)")
    return prompt.clone()


def _resolve_config(model, request_id: str, generation_config: GenerationConfig | None, kwargs: dict):
    """The config ``generate()`` would use: the request's (or the model's) config, then ``kwargs``,
    then the model's defaults for anything unset."""
    if generation_config is not None and kwargs:
        generation_config = copy.deepcopy(generation_config)  # update() writes in place
        unknown = generation_config.update(**kwargs)
        kwargs = {}
    else:
        unknown = {}
    config, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    unknown = {**unknown, **{k: v for k, v in model_kwargs.items() if k not in ("output_attentions",
                                                                                 "output_hidden_states")}}
    if unknown:
        raise TypeError(f"request {request_id}: {sorted(unknown)} are not generation settings; continuous batching "
                        "takes token ids and GenerationConfig fields only")
    mode = config.get_generation_mode()
    if config.num_beams is not None and config.num_beams > 1:
        raise ValueError(f"request {request_id}: num_beams={config.num_beams}, but continuous batching decodes one "
                         "sequence per request; use model.generate() for beam search")
    if (config.num_return_sequences or 1) > 1:
        raise ValueError(f"request {request_id}: num_return_sequences={config.num_return_sequences}; add the prompt "
                         "that many times instead, each with its own seed")
    if config.guidance_scale not in (None, 1, 1.0):
        raise ValueError(f"request {request_id}: guidance_scale={config.guidance_scale} needs a second, "
                         "unconditional sequence per request, which a slot does not hold; use model.generate()")
    if mode not in _SUPPORTED_MODES:
        raise ValueError(f"request {request_id}: generation mode {mode.value!r} is not supported by continuous "
                         "batching, only greedy search and sampling (num_beams=1, no assistant or penalty_alpha)")
    return config


def new_request(model, request_id: str, input_ids, generation_config: GenerationConfig | None = None,
                seed: int | None = None, streaming: bool = False, record_timestamps: bool = False,
                tokenizer=None, prefix_len: int | None = None, **kwargs) -> Request:
    """A checked request; raises ValueError / TypeError naming what to change. ``seed`` None draws
    one from torch's global generator, so ``torch.manual_seed`` before adding makes runs repeat.
    ``prefix_len``: where the prompt's document ends (``serving.prefix_store``)."""
    prompt = _prompt_tensor(request_id, input_ids)
    check_prefix_len(prefix_len, prompt.numel(), f"request {request_id}: ")
    config = _resolve_config(model, request_id, generation_config, kwargs)
    if config.max_new_tokens is not None:
        max_new_tokens = config.max_new_tokens
    else:  # generate()'s rule: max_length counts the prompt
        max_new_tokens = config.max_length - prompt.numel()
    if max_new_tokens < 1:
        raise ValueError(f"request {request_id}: nothing to generate (max_new_tokens={config.max_new_tokens}, "
                         f"max_length={config.max_length}, prompt {prompt.numel()} tokens); set max_new_tokens >= 1")
    config.max_length = prompt.numel() + max_new_tokens  # what generate() hands its logits processors
    if config.stop_strings and tokenizer is None:
        raise ValueError(f"request {request_id}: stop_strings={config.stop_strings!r} needs the tokenizer; "
                         "pass tokenizer= to the manager or generate_batch")
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    return Request(request_id, prompt, config, max_new_tokens, int(seed), streaming, record_timestamps, prefix_len)


def check_fits(request: Request, max_length: int) -> None:
    """Refuse a request no slot can ever hold (it would wait forever otherwise)."""
    if request.needed_length > max_length:
        raise ValueError(
            f"request {request.request_id} can never fit: it needs {request.needed_length} positions (prompt "
            f"{request.prompt.numel()} + max_new_tokens {request.max_new_tokens}) but a slot holds "
            f"max_length={max_length}; shorten the prompt or max_new_tokens, or build the slots with "
            f"max_length >= {request.needed_length}")
