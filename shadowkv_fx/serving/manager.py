"""A streaming front for the scheduler, shaped like transformers' ``ContinuousBatchingManager``.

```python
with ServingManager(model, max_length=4096, tokenizer=tok) as manager:  # or ServingManager(slots, ...)
    rid = manager.add_request(ids, max_new_tokens=64, streaming=True, seed=7)
    for event in manager.stream([rid]):                          # TokenEvent(request_id, token, status, output)
        print(event.request_id, event.token)
    manager.cancel_request(other_id)
    result = manager.get_result(rid2, timeout=30)                # transformers' GenerationOutput
```

Requests are checked in the caller's thread when added (``add_request`` raises at once for one
that can never fit, an empty prompt, beam search ...); the loop thread alone touches the scheduler
and the backend, fed through a queue, so a cancel arrives between two steps. Results wait in the
manager until ``get_result`` takes them; streamed events (of requests added with
``streaming=True``) wait until iterated: take both, or they stay in memory. One consumer of the
stream at a time. If a step raises, every request still open ends FAILED with the error, the loop
stops, and ``add_request`` raises from then on (``error`` holds the exception).
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Iterable, Iterator

import torch
from transformers import GenerationConfig

from shadowkv_fx.serving.requests import GenerationOutput, RequestStatus, TokenEvent, check_fits, new_request
from shadowkv_fx.serving.scheduler import SlotScheduler
from shadowkv_fx.serving.prefix_store import PrefixStore
from shadowkv_fx.serving.slots import DEFAULT_SLOTS, SlotBackend, check_takes_prefix_len, is_slot_backend, slots_for

log = logging.getLogger(__name__)

_POLL_S = 0.1  # how often a blocked reader looks whether the loop is still alive


class ServingManager:
    def __init__(self, backend, generation_config: GenerationConfig | None = None, tokenizer=None, *,
                 num_slots: int | None = None, max_length: int | None = None, prefill_chunk: int = 512,
                 prefix_store: PrefixStore | None = None):
        """``backend``: a ``SlotBackend``, or a model, served by ``slots_for``'s backend (``ShadowKVSlots``
        for a model optimized by ``shadowkv_fx.optimize``, with ``prefix_store``) of ``num_slots``
        (default 8) slots of ``max_length`` positions, which must then be given: requests arrive later."""
        if not is_slot_backend(backend):
            if max_length is None:
                raise TypeError("a ServingManager of a model needs max_length: the longest prompt + max_new_tokens "
                                "a request may take")
            backend = slots_for(backend, num_slots or DEFAULT_SLOTS, max_length, prefill_chunk, prefix_store)
        elif num_slots is not None or max_length is not None or prefix_store is not None:
            raise TypeError("num_slots, max_length and prefix_store make the slots a ServingManager builds for a "
                            "model; a SlotBackend passed in has its own")
        self.backend: SlotBackend = backend
        self.generation_config = generation_config
        self.tokenizer = tokenizer
        self.scheduler = SlotScheduler(backend, tokenizer)
        self.error: BaseException | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", Request) | ("cancel", request id)
        self._wake = threading.Event()
        self._stream: queue.SimpleQueue[TokenEvent] = queue.SimpleQueue()
        self._lock = threading.Condition()  # guards the four fields below; notified when a request ends
        self._results: dict[str, GenerationOutput] = {}  # ended, not yet taken; in the order they ended
        self._open: set[str] = set()  # added, not yet ended
        self._streaming: set[str] = set()  # streamed, last event not yet taken from the stream
        self._stop_mode: str | None = None  # None, "flush" (finish what is open) or "cancel"
        self._looping = False  # set and cleared under the lock, so get_result never waits on a finished loop
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ServingManager:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop(cancel=exc_type is not None)

    def is_running(self) -> bool:
        return self._looping

    def start(self) -> None:
        if self.is_running():
            raise RuntimeError("the manager is already running")
        if self.error is not None:
            raise RuntimeError("the serving loop stopped after an error; build a new manager") from self.error
        with self._lock:
            self._stop_mode = None
            self._looping = True
        self._thread = threading.Thread(target=self._run, name="shadowkv-serving", daemon=True)
        self._thread.start()

    def stop(self, block: bool = True, timeout: float | None = None, cancel: bool = False) -> None:
        """Stop the loop once every open request has ended (``cancel=True``: cancel them first)."""
        with self._lock:
            self._stop_mode = "cancel" if cancel else "flush"
        self._wake.set()
        if block and self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the serving loop has not stopped after %s s", timeout)

    def add_request(self, input_ids, request_id: str | None = None, generation_config: GenerationConfig | None = None,
                    seed: int | None = None, streaming: bool = False, record_timestamps: bool = False,
                    prefix_len: int | None = None, **generation_kwargs) -> str:
        """Queue one prompt (list of ints or 1-D tensor) and return its id (``req_0``, ``req_1`` ... unless
        given). ``generation_config`` / ``generation_kwargs`` default to the manager's, then the model's.
        ``prefix_len``: where the prompt's document ends, to prefill it once for many questions
        (``prefix_store``). Raises ValueError / TypeError at once for a request that can never run."""
        request_id = f"req_{next(self._ids)}" if request_id is None else request_id
        request = new_request(self.backend.model, request_id, input_ids, generation_config or self.generation_config,
                              seed, streaming, record_timestamps, self.tokenizer, prefix_len, **generation_kwargs)
        check_fits(request, self.backend.max_length)
        check_takes_prefix_len(self.backend, request)
        with self._lock:  # the loop decides to exit under the lock: a request is either refused or served
            if self.error is not None:
                raise RuntimeError("the serving loop stopped after an error; build a new manager") from self.error
            if self._stop_mode is not None:
                raise RuntimeError("the manager is stopping or stopped: start() it again before adding requests")
            if request_id in self._open or request_id in self._results or request_id in self._streaming:
                raise ValueError(f"request id {request_id!r} is in use (open, or its result not yet taken)")
            self._open.add(request_id)
            if streaming:
                self._streaming.add(request_id)
            self._inbox.put(("add", request))
        self._wake.set()
        return request_id

    def cancel_request(self, request_id: str) -> None:
        """End a waiting or running request: it ends FAILED with error ``"cancelled"`` and its slot is freed.
        A request already over is left as it is."""
        self._inbox.put(("cancel", request_id))
        self._wake.set()

    def get_result(self, request_id: str | None = None, timeout: float | None = None) -> GenerationOutput | None:
        """Take the result of ``request_id`` (or of the request that ended first), waiting up to ``timeout``
        seconds; None on timeout, or at once when it can no longer come (unknown id, loop not running)."""
        def ready():
            return request_id in self._results if request_id is not None else bool(self._results)

        def hopeless():
            pending = request_id in self._open if request_id is not None else bool(self._open)
            return not (pending and self.is_running())

        with self._lock:
            self._lock.wait_for(lambda: ready() or hopeless(), timeout)
            if not ready():
                return None
            return self._results.pop(request_id if request_id is not None else next(iter(self._results)))

    def stream(self, request_ids: Iterable[str] | None = None) -> Iterator[TokenEvent]:
        """Every streamed event in the order it happened, until each of ``request_ids`` (default: every
        streamed request open now) has had its last event, or the loop stops."""
        with self._lock:
            waiting_for = set(request_ids) if request_ids is not None else set(self._streaming)
            unknown = waiting_for - self._streaming
        if unknown:
            raise ValueError(f"{sorted(unknown)} are not streamed: add them with streaming=True (or their last event "
                             "was already taken)")
        return self._events_until_ended(waiting_for)

    def _events_until_ended(self, waiting_for: set[str]) -> Iterator[TokenEvent]:
        while waiting_for:
            event = self._next_event()
            if event is None:
                return
            if event.output is not None:
                waiting_for.discard(event.request_id)
            yield event

    def __iter__(self) -> Iterator[TokenEvent]:
        """Streamed events while the loop runs (like transformers' manager: ends only once it stops)."""
        while (event := self._next_event()) is not None:
            yield event

    def _next_event(self) -> TokenEvent | None:
        while True:
            try:
                event = self._stream.get(timeout=_POLL_S)
            except queue.Empty:
                if not self.is_running() and self._stream.empty():
                    return None
                continue
            if event.output is not None:
                with self._lock:
                    self._streaming.discard(event.request_id)
            return event

    def _run(self) -> None:
        try:
            with torch.no_grad():
                self._loop()
        finally:
            with self._lock:
                self._looping = False
                self._lock.notify_all()  # readers waiting on a loop that is gone

    def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                self._take_inbox()
                if self._stop_mode == "cancel":
                    self._deliver(self.scheduler.cancel_all())
                if self.scheduler.has_work:
                    self._deliver(self.scheduler.step())
                    continue
            except BaseException as error:  # noqa: BLE001 - every open request must learn of it
                log.exception("the serving loop failed")
                with self._lock:
                    self.error = error
                self._deliver(self.scheduler.fail_all(error))
                self._fail_inbox(error)
                return
            if self._stop_mode is not None:
                with self._lock:
                    if self._inbox.empty():
                        return
                continue
            self._wake.wait()

    def _drain_inbox(self):
        """The (kind, item) pairs waiting in the inbox, taken one by one."""
        while True:
            try:
                yield self._inbox.get_nowait()
            except queue.Empty:
                return

    def _take_inbox(self) -> None:
        for kind, item in self._drain_inbox():
            if kind == "add":
                self.scheduler.submit(item)
            else:
                event = self.scheduler.cancel(item)
                if event is not None:
                    self._deliver([event])

    def _fail_inbox(self, error: BaseException) -> None:
        for kind, item in self._drain_inbox():
            if kind == "add":
                self._deliver([item.end(RequestStatus.FAILED, f"{type(error).__name__}: {error}")])

    def _deliver(self, events: list[TokenEvent]) -> None:
        ended = [event for event in events if event.output is not None]
        with self._lock:
            streamed = [event for event in events if event.request_id in self._streaming]
            for event in ended:
                self._results[event.request_id] = event.output
                self._open.discard(event.request_id)
            if ended:
                self._lock.notify_all()
        for event in streamed:
            self._stream.put(event)
