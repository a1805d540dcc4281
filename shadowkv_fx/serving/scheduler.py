"""Continuous batching over a fixed number of slots, whatever holds the slots' KV state.

Requests wait in arrival order (FIFO). Each ``step()`` does at most two things:

1. if no prompt is being prefilled and a slot is free, the oldest waiting request takes the lowest
   free slot and its prefill starts; then one piece of the prefill in flight runs (one request is
   prefilled at a time). When the last piece returns the prompt's logits, the request's first token
   is chosen and the request starts decoding in the same step;
2. one decode step of every decoding slot at once, each slot at its own length.

So a running request waits at most one prefill piece between two of its tokens: the bound on the
stall a new (say 122K-token) prompt causes is the time of one piece of the backend's prefill (its
``prefill_chunk``), not the whole prompt's. Each request stops on its own eos token(s), its own
``max_new_tokens`` or its own stop strings, and frees its slot in the step it stops; the token that
ends it is never fed back to the backend. Tokens are chosen per request (``sampling.TokenChooser``)
and read back to the host once per step for all rows.

Single-threaded: call ``submit`` / ``cancel`` / ``step`` from one thread (``manager`` runs it on a
background thread and feeds it through a queue).
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator

import torch

from shadowkv_fx.serving.requests import CANCELLED, Request, RequestStatus, TokenEvent, check_fits
from shadowkv_fx.serving.sampling import TokenChooser
from shadowkv_fx.serving.slots import SlotBackend, check_takes_prefix_len

log = logging.getLogger(__name__)


class SlotScheduler:
    def __init__(self, backend: SlotBackend, tokenizer=None):
        if backend.num_slots < 1:
            raise ValueError(f"a slot backend needs at least one slot, got num_slots={backend.num_slots}")
        self.backend = backend
        self.tokenizer = tokenizer
        self._waiting: deque[Request] = deque()
        self._rows: list[Request | None] = [None] * backend.num_slots  # who holds each slot
        self._prefill: tuple[Request, Iterator[torch.Tensor | None]] | None = None
        self._live: dict[str, Request] = {}  # submitted, not yet ended

    @property
    def has_work(self) -> bool:
        return bool(self._live)

    @property
    def live_requests(self) -> int:
        return len(self._live)

    def occupied_slots(self) -> list[int]:
        return [slot for slot, request in enumerate(self._rows) if request is not None]

    def submit(self, request: Request) -> None:
        """Queue a checked request (``requests.new_request``); refuse one that can never fit a slot."""
        check_fits(request, self.backend.max_length)
        check_takes_prefix_len(self.backend, request)
        if request.request_id in self._live:
            raise ValueError(f"request id {request.request_id!r} is already waiting or running; pick another id")
        self._live[request.request_id] = request
        self._waiting.append(request)

    def cancel(self, request_id: str) -> TokenEvent | None:
        """End a waiting or running request now (its slot is freed); None if it is unknown or already over."""
        request = self._live.get(request_id)
        if request is None:
            return None
        if request.status == RequestStatus.PENDING:
            self._waiting.remove(request)
        return self._end(request, RequestStatus.FAILED, CANCELLED)

    def cancel_all(self) -> list[TokenEvent]:
        return [self.cancel(request_id) for request_id in list(self._live)]

    def step(self) -> list[TokenEvent]:
        """Admit, run one prefill piece, run one decode step; the events of this step in order."""
        if self._prefill is None:
            self._admit()
        events = self._prefill_piece() if self._prefill is not None else []
        return events + self._decode_step()

    def fail_all(self, error: BaseException) -> list[TokenEvent]:
        """End every live request as FAILED after ``error`` (the backend's state is unknown now)."""
        message = f"{type(error).__name__}: {error}"
        events = []
        for request in list(self._live.values()):
            try:
                events.append(self._end(request, RequestStatus.FAILED, message))
            except Exception:  # the backend is already broken: the request still ends, the first error wins
                log.exception("releasing slot %s of %s after %s failed", request.slot, request.request_id, message)
                self._live.pop(request.request_id, None)
                events.append(request.end(RequestStatus.FAILED, message))
        self._waiting.clear()
        self._rows = [None] * self.backend.num_slots
        self._prefill = None
        return events

    def _admit(self) -> None:
        if not self._waiting or None not in self._rows:
            return
        request = self._waiting.popleft()
        slot = self._rows.index(None)
        self._rows[slot] = request
        request.start(slot)
        document = {} if request.prefix_len is None else {"prefix_len": request.prefix_len}
        self._prefill = (request, iter(self.backend.prefill(slot, request.prompt, **document)))

    def _prefill_piece(self) -> list[TokenEvent]:
        request, pieces = self._prefill
        try:
            logits = next(pieces)
        except StopIteration:
            raise RuntimeError(f"{type(self.backend).__name__}.prefill ended without yielding the logits of "
                               f"request {request.request_id}'s last prompt position") from None
        if logits is None:
            return []
        pieces.close()
        self._prefill = None
        request.chooser = TokenChooser(self.backend.model, request, logits.device, self.tokenizer)
        request.status = RequestStatus.DECODING
        return [self._take(request, int(request.chooser.choose(logits)))]

    def _decode_step(self) -> list[TokenEvent]:
        rows = [(slot, r) for slot, r in enumerate(self._rows) if r is not None and r.status == RequestStatus.DECODING]
        if not rows:
            return []
        tokens = torch.zeros(self.backend.num_slots, dtype=torch.long)
        active = torch.zeros(self.backend.num_slots, dtype=torch.bool)
        for slot, request in rows:
            tokens[slot], active[slot] = request.pending_token, True
        logits = self.backend.decode(tokens, active)  # [num_slots, vocab]
        greedy = logits.argmax(dim=-1)  # [num_slots]: one kernel for every plain-greedy row
        chosen = torch.stack([greedy[slot] if request.chooser.plain_greedy else request.chooser.choose(logits[slot])
                              for slot, request in rows]).tolist()
        return [self._take(request, token) for (_, request), token in zip(rows, chosen)]

    def _take(self, request: Request, token: int) -> TokenEvent:
        request.add_token(token)
        if request.chooser.stops_after(token, len(request.generated)):
            return self._end(request, RequestStatus.FINISHED)
        return TokenEvent(request.request_id, token, RequestStatus.DECODING)

    def _end(self, request: Request, status: RequestStatus, error: str | None = None) -> TokenEvent:
        del self._live[request.request_id]
        slot = request.slot
        if self._prefill is not None and self._prefill[0] is request:
            self._prefill[1].close()  # before release: the backend may drop the slot's half-built state
            self._prefill = None
        if slot is not None:
            self._rows[slot] = None
            self.backend.release(slot)
        return request.end(status, error)
