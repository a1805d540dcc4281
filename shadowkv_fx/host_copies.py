"""Prefill values to their host store on a side stream, while the model computes on.

A 122K prompt's values are ~250 MB a layer. Copied on the compute stream, every layer's copy
stalls the next layer's kernels (and a copy into a strided host view goes through a pageable
staging buffer: a host sync). Here each copy goes to a per-device side stream, in contiguous
pieces the DMA engine takes directly, after the compute stream's work so far; the source is
recorded on that stream so the allocator does not hand its memory out before the copy ends.
``copy`` returns an event that the decode step's stream waits on (``wait``): a GPU-side wait, no
host sync. Device-to-device and CPU copies are plain copies.
"""
from __future__ import annotations

import threading

import torch

_streams: dict[tuple[int, str], torch.cuda.Stream] = {}
_lock = threading.Lock()


def side_stream(device: torch.device, purpose: str = "copies", priority: int = 0) -> torch.cuda.Stream:
    """The device's side stream for ``purpose``, made once at ``priority`` (lower runs sooner): the value copies
    here, the key bases' factorisations (``key_basis.py``)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        if (index, purpose) not in _streams:
            _streams[index, purpose] = torch.cuda.Stream(device=index, priority=priority)
        return _streams[index, purpose]


def _contiguous_pieces(dst: torch.Tensor, src: torch.Tensor):
    """``(dst piece, src piece)`` pairs over the leading dims until each ``dst`` piece is contiguous."""
    if dst.is_contiguous() or dst.dim() == 0:
        yield dst, src
        return
    for d, s in zip(dst.unbind(0), src.unbind(0)):
        yield from _contiguous_pieces(d, s)


def copy(dst: torch.Tensor, src: torch.Tensor) -> torch.cuda.Event | None:
    """``dst.copy_(src)``; from a GPU into page-locked host memory asynchronously on the side stream.

    Returns the event that marks the copy's end (None when it ran in order on the current stream).
    The caller must not write ``src`` before that event.
    """
    if not (src.is_cuda and dst.device.type == "cpu" and dst.is_pinned()):
        dst.copy_(src)
        return None
    src = src.contiguous()  # on the compute stream: the side stream then reads plain memory
    stream = side_stream(src.device)
    stream.wait_stream(torch.cuda.current_stream(src.device))
    with torch.cuda.stream(stream):
        for d, s in _contiguous_pieces(dst, src):
            d.copy_(s, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    src.record_stream(stream)
    return done


def wait(event: torch.cuda.Event | None) -> None:
    """The current stream's later work (a decode step, a fold) waits for ``event``'s copy."""
    if event is not None:
        torch.cuda.current_stream().wait_event(event)


def drain() -> None:
    """Block until every side-stream copy has landed (before host memory they wrote is reused)."""
    with _lock:
        streams = [stream for (_, purpose), stream in _streams.items() if purpose == "copies"]
    for stream in streams:
        stream.synchronize()


def small_to_device(values: list, device: torch.device) -> torch.Tensor:
    """A short host list as a device tensor without a host sync (a pageable copy would wait for
    the stream): through page-locked memory, asynchronously."""
    host = torch.tensor(values)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
