"""How one request picks its next token and when it stops, the way ``generate()`` does it alone.

Built from the request's own ``GenerationConfig`` through the model's ``_prepare_special_tokens`` and
``_get_logits_processor`` (the code ``generate()`` runs), so repetition penalty, temperature, top-k,
top-p, min_new_tokens, suppressed tokens ... behave as in ``generate()``. Sampling draws from the
request's own ``torch.Generator`` seeded with its seed: a sampled request gives the same tokens
whatever else is running, in whatever order requests arrive, and the same tokens as
``torch.manual_seed(seed); model.generate(prompt, do_sample=True, ...)`` of it alone (that draws
from the global generator once per token, which we reproduce).
"""
from __future__ import annotations

import torch
from transformers.generation.stopping_criteria import StopStringCriteria

from shadowkv_fx.serving.requests import Request


class TokenChooser:
    def __init__(self, model, request: Request, device: torch.device, tokenizer=None):
        config = request.config
        model._prepare_special_tokens(config, device=device)
        prompt = request.prompt.to(device)
        self.processors = model._get_logits_processor(
            generation_config=config, input_ids_seq_length=prompt.numel(), encoder_input_ids=prompt[None],
            device=device, model_kwargs={})
        self.stop_strings = StopStringCriteria(tokenizer, config.stop_strings) if config.stop_strings else None
        eos = config.eos_token_id
        self.eos_token_ids = {t for t in ([eos] if isinstance(eos, int) else (eos or [])) if t >= 0}
        self.max_new_tokens = request.max_new_tokens
        self.generator = torch.Generator(device=device).manual_seed(request.seed) if config.do_sample else None
        # prompt + generated ids [1, S + max_new_tokens], on the device: only processors and stop strings read them
        self.ids = None
        if len(self.processors) or self.stop_strings is not None:
            self.ids = torch.empty(1, request.needed_length, dtype=torch.long, device=device)
            self.ids[0, :prompt.numel()] = prompt
        self.length = prompt.numel()
        # plain greedy rows need only the argmax of their logits, which the scheduler takes for all rows at once
        self.plain_greedy = self.generator is None and self.ids is None

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [vocab]`` of this request's last position -> the next token, a 0-d int64 tensor on the
        logits' device (no host sync: the scheduler reads all rows' tokens at once)."""
        scores = logits.to(dtype=torch.float32, copy=True)[None]  # [1, vocab], as generate() upcasts
        if len(self.processors):
            scores = self.processors(self.ids[:, :self.length], scores)
        if self.generator is not None:
            probs = torch.nn.functional.softmax(scores, dim=-1)
            token = torch.multinomial(probs, num_samples=1, generator=self.generator)[0, 0]
        else:
            token = torch.argmax(scores, dim=-1)[0]
        if self.ids is not None:
            self.ids[0, self.length] = token
        self.length += 1
        return token

    def stops_after(self, token: int, generated: int) -> bool:
        """Whether the request ends with ``token``, its ``generated``-th token (eos, length or stop string)."""
        if token in self.eos_token_ids or generated >= self.max_new_tokens:
            return True
        return self.stop_strings is not None and bool(self.stop_strings(self.ids[:, :self.length], None).item())
