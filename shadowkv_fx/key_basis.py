"""Prefill's low-rank key bases, factored off the compute stream and off the thread that launches it.

``torch.linalg.eigh`` (and ``svd``) read a status word back from the GPU: a host sync in every
layer's prefill, for every row. On the H100 each fp64 eigh of the 1024 x 1024 Gram matrix (8B
shape) also takes ~12 ms of GPU time (the subspace solver, ``compression.EIGEN_SOLVER``, 4.7), which
the prefill's GEMMs leave little room to overlap. Here the compute thread only copies the
row's pre-RoPE keys (its own copy: a compiled graph may reuse the tapped buffer once the op
returns) and records an event; one worker thread waits for that event on a side stream, factors
the keys there (blocking itself, not the prefill, on the status read) and writes U, SV and the fit
error into the layer's slots. ``finish`` joins a layer's jobs and makes the compute stream wait for
them on the GPU, before anything reads or moves those slots (``ShadowKVCache.end_step``).

On a CPU the same jobs run inline, in order, unless ``ON_WORKER["cpu"]`` (tests run the worker there).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from shadowkv_fx import host_copies
from shadowkv_fx.kernels import compression

# by device type, whether a row's keys go to the worker; else they are factored in line, on the prefill's thread and
# stream (the CPU's default; tests run the worker there, benchmarks time a GPU in line)
ON_WORKER = {"cuda": True, "cpu": False}
# jobs submitted and not ended, all caches together: each holds its keys' copy (250 MB a 122K row on the 8B shape),
# so a worker that falls behind makes the prefill wait here rather than grow past preflight's working-set reserve
IN_FLIGHT = 2
_in_flight = threading.BoundedSemaphore(IN_FLIGHT)

# the side stream's purpose and priority (host_copies.side_stream): high, so the solver's many small kernels take
# the next free SM slot instead of queueing behind every pending block of the compute stream's GEMMs and attention
STREAM = ("key_basis", -1)

_worker: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def _forget_worker() -> None:  # a forked child has none of its parent's threads, nor their jobs
    global _worker, _in_flight
    _worker, _in_flight = None, threading.BoundedSemaphore(IN_FLIGHT)


os.register_at_fork(after_in_child=_forget_worker)


def _pool() -> ThreadPoolExecutor:
    global _worker
    with _lock:
        if _worker is None:
            _worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shadowkv-key-basis")
        return _worker


class PendingBases:
    """One layer's factorisations still running; a copy (``deepcopy``) starts with none."""

    def __init__(self) -> None:
        self._jobs: list[Future] = []

    def __deepcopy__(self, memo) -> PendingBases:
        return PendingBases()

    def __eq__(self, other) -> bool:  # as state: the same jobs in flight (none, between steps)
        return isinstance(other, PendingBases) and self._jobs == other._jobs

    def submit(self, k_pre: torch.Tensor, rank: int, u_out: torch.Tensor, sv_out: torch.Tensor,
               fit_err_out: torch.Tensor) -> None:
        """Factor one row's keys ``k_pre [Hkv, T, D]`` into ``u_out [T, rank]``, ``sv_out [Hkv, rank, D]`` and
        ``fit_err_out`` (0-d): views of the layer's slots, which must neither move nor be read before ``finish``."""
        flat, hkv = compression.flatten_keys(k_pre), k_pre.shape[0]
        outs = (u_out, sv_out, fit_err_out)
        if not ON_WORKER.get(flat.device.type, False):
            _write(outs, compression.factor_keys(flat, hkv, rank))
            return
        ready = stream = None
        if flat.device.type == "cuda":
            ready, stream = torch.cuda.Event(), host_copies.side_stream(flat.device, *STREAM)
            ready.record(torch.cuda.current_stream(flat.device))
            for t in (flat, *outs):  # memory this thread may free while the side stream still uses it
                t.record_stream(stream)
        mode = torch.is_inference_mode_enabled()  # grad modes are per thread: the worker takes the caller's
        _in_flight.acquire()
        try:
            self._jobs.append(_pool().submit(_factor, flat, hkv, rank, outs, ready, stream, mode))
        except BaseException:
            _in_flight.release()
            raise

    def store(self, c: compression.CompressedPrompt, k_pre: torch.Tensor, rank: int, u_out: torch.Tensor,
              sv_out: torch.Tensor, fit_err_out: torch.Tensor) -> None:
        """``c``'s basis into the slots; where ``c`` left it out, a job that factors ``k_pre`` for them."""
        if c.u is None:
            self.submit(k_pre, rank, u_out, sv_out, fit_err_out)
        else:
            _write((u_out, sv_out, fit_err_out), (c.u, c.sv, c.fit_err))

    def finish(self) -> None:
        """Every submitted job done: the current stream's later work sees its slots. Raises the first job's error
        once every job has ended (none still writes into the slots)."""
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            if job.exception() is None and (done := job.result()) is not None:
                event, device = done
                torch.cuda.current_stream(device).wait_event(event)
        for job in jobs:
            job.result()


def _write(outs, factors) -> None:
    for out, value in zip(outs, factors):
        out.copy_(value)


def _factor(flat, hkv: int, rank: int, outs, ready, stream, inference: bool) -> tuple | None:
    """The job: ``(event, device)`` marking its end on the side stream, or None where it ran on the CPU."""
    try:
        return _factor_on(flat, hkv, rank, outs, ready, stream, inference)
    finally:
        _in_flight.release()


def _factor_on(flat, hkv: int, rank: int, outs, ready, stream, inference: bool) -> tuple | None:
    with torch.inference_mode(inference), torch.no_grad():
        if stream is None:
            _write(outs, compression.factor_keys(flat, hkv, rank))
            return None
        with torch.cuda.device(flat.device), torch.cuda.stream(stream):
            stream.wait_event(ready)
            _write(outs, compression.factor_keys(flat, hkv, rank))
            done = torch.cuda.Event()
            done.record(stream)
            return done, flat.device
