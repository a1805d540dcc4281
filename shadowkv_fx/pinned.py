"""Page-locked host memory of exactly the size asked for, for the offloaded values.

``torch.zeros(..., pin_memory=True)`` goes through torch's caching host allocator, which rounds
every allocation up to a power of two so that freed blocks can be reused: a layer of values of
2.8 GiB pins 4 GiB. At 122K on the H100 host (125 GiB) that waste bound the batch to 11 sequences.
``pinned_zeros`` instead registers plain host memory with CUDA (``cudaHostRegister``, as torch's
own checkpoint stager does), and keeps a block whose tensors are gone registered in a pool
(``PinnedPool``) for the next cache of the same shape. The GPU reads it through UVA exactly as it
reads allocator-pinned memory.
"""
from __future__ import annotations

import atexit
import math
import mmap
import queue
import threading
import weakref

import torch

from shadowkv_fx import host_copies
from shadowkv_fx.host_memory import meminfo_available

PAGE = 4096
_PORTABLE_AND_MAPPED = 1 | 2  # cudaHostRegisterPortable | cudaHostRegisterMapped: every context, device pointer
_lock = threading.Lock()
_live_bytes = 0


def registered_bytes(nbytes: int) -> int:
    """Host memory a ``pinned_zeros`` of ``nbytes`` locks: whole pages."""
    return -(-nbytes // PAGE) * PAGE


def live_bytes() -> int:
    """Bytes currently registered by ``pinned_zeros``, in use or kept in the pool."""
    return _live_bytes


def _count(nbytes: int) -> None:
    global _live_bytes
    with _lock:
        _live_bytes += nbytes


def _register(ptr: int, size: int) -> None:
    code = int(torch.cuda.cudart().cudaHostRegister(ptr, size, _PORTABLE_AND_MAPPED))
    if code != 0:
        raise MemoryError(f"page-locking {size / 2**30:.2f} GiB of host memory for offloaded values failed "
                          f"(cudaError {code}): use a smaller batch, a shorter prompt, or raise the "
                          "locked-memory limit (ulimit -l)")


def _unregister(ptr: int) -> None:
    if torch.cuda.is_initialized():
        torch.cuda.cudart().cudaHostUnregister(ptr)


def _mapping(size: int) -> mmap.mmap:
    buffer = mmap.mmap(-1, size)  # page-aligned and zero-filled by the kernel
    if hasattr(mmap, "MADV_HUGEPAGE"):
        # before the first touch: faulting in and locking 2 MiB transparent huge pages (where the
        # kernel allows them) is twice as fast as 4 KiB pages (H100 host: 6.4 against 3.1 GiB/s)
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return buffer


def _zero(buffer: mmap.mmap) -> None:
    torch.frombuffer(buffer, dtype=torch.uint8).zero_()


def _fault_in(buffer: mmap.mmap) -> None:
    """Touch one byte a page, so the kernel maps (and zeroes) every page now, not at registration."""
    torch.frombuffer(buffer, dtype=torch.uint8)[::PAGE].fill_(0)


class _Block:
    """A page-locked anonymous mapping. Tensors view it through ``torch.frombuffer``, so the mapping
    outlives them: when the last one goes, the block returns to the pool still registered."""

    def __init__(self, size: int, buffer: mmap.mmap | None = None) -> None:
        self.size = size
        self.buffer = buffer if buffer is not None else _mapping(size)
        self.ptr = torch.frombuffer(self.buffer, dtype=torch.uint8).data_ptr()
        _register(self.ptr, size)
        _count(size)
        self.fresh = True  # all zeros: as the kernel mapped it, or zeroed again since its last use
        self.cleaned = threading.Event()  # set while no thread is zeroing it
        self.cleaned.set()

    def release(self) -> None:
        self.cleaned.wait()
        _unregister(self.ptr)
        _count(-self.size)
        self.buffer.close()


class _Prepared:
    """A mapping the background thread faults in for a block the prefill will ask for soon."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.buffer: mmap.mmap | None = None
        self.ready = threading.Event()
        self.dropped = False  # settled before the thread reached it: skip it


class PinnedPool:
    """Registered blocks whose tensors are gone, kept by size for the next cache of the same shape;
    and blocks a prefill is about to ask for, faulted in ahead on a background thread.

    Page-locking is the slow part of offloading values: on the H100 host a fresh block registers at
    ~2-3 GiB/s, and while it does, no other thread can launch a kernel (the driver's lock; 200 GEMMs
    took 1.98 s instead of 0.38 beside one registration). Almost all of that time is the kernel
    mapping and zeroing pages; pages already present register at ~22 GiB/s. So ``expect(n)`` at the
    start of a prefill says the next new block size will be asked for ``n`` times (one per layer):
    after the first, the other ``n - 1`` are mapped and faulted in on a thread (no CUDA call, so the
    GPU keeps computing), and ``take`` only registers them. ``settle()`` at the end of the prefill
    drops any the prefill did not take (layers whose values stayed on the GPU).
    A second ``generate()`` with the same batch shape takes its blocks back from the free list
    instead. Free blocks are released, oldest first, when a block of another size is needed and the
    host's available memory (pool included) would not cover it otherwise, or when ``trim()`` is called.
    """

    def __init__(self) -> None:
        self._free: list[_Block] = []  # oldest first
        self._prepared: list[_Prepared] = []  # in the order the prefill will ask for them
        self._expected = 0
        self._lock = threading.Lock()
        self._work: "queue.SimpleQueue[_Prepared]" = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._dirty: "queue.SimpleQueue[_Block]" = queue.SimpleQueue()  # given back, to be zeroed
        self._cleaner: threading.Thread | None = None
        self._closing = False

    def close(self) -> None:
        """Stop the two threads before the interpreter shuts down (atexit). A daemon thread caught
        inside a torch call when Python finalizes is ended by ``pthread_exit``, whose unwinding through
        C++ frames aborts the process ("terminate called without an active exception"); at exit the
        work left (zeroing blocks nobody will take) is skipped."""
        with self._lock:
            self._closing = True
            threads = [t for t in (self._worker, self._cleaner) if t is not None]
        self._work.put(None)
        self._dirty.put(None)
        for thread in threads:
            thread.join(timeout=60)

    def pooled_bytes(self) -> int:
        """Bytes this process holds for later caches: free blocks and blocks being prepared."""
        with self._lock:
            return sum(b.size for b in self._free) + sum(p.size for p in self._prepared)

    def expect(self, blocks: int) -> None:
        with self._lock:
            self._expected = blocks

    def take(self, size: int) -> _Block:
        with self._lock:
            for i, block in enumerate(self._free):
                if block.size == size:
                    block = self._free.pop(i)
                    break
            else:
                block = None
        if block is not None:
            block.cleaned.wait()
            return block
        with self._lock:
            prepared = next((p for p in self._prepared if p.size == size), None)
            if prepared is not None:
                self._prepared.remove(prepared)
            ahead, self._expected = self._expected - 1, 0
        if prepared is not None:
            prepared.ready.wait()
            if prepared.buffer is not None:
                return _Block(size, prepared.buffer)
        self._make_room(size)
        block = _Block(size)
        if ahead > 0:
            self._prepare(size, ahead)
        return block

    def settle(self) -> None:
        """Drop prepared blocks nobody took; the thread skips those it has not reached."""
        with self._lock:
            dropped, self._prepared, self._expected = self._prepared, [], 0
            for p in dropped:
                p.dropped = True
        for p in dropped:
            p.ready.wait()
            if p.buffer is not None:
                p.buffer.close()

    def _prepare(self, size: int, count: int) -> None:
        with self._lock:
            if self._closing:
                return
            for _ in range(count):
                p = _Prepared(size)
                self._prepared.append(p)
                self._work.put(p)
            if self._worker is None:
                self._worker = threading.Thread(target=self._fault_in_loop, name="shadowkv-pinned-prefetch", daemon=True)
                self._worker.start()

    def _fault_in_loop(self) -> None:
        while True:
            p = self._work.get()
            if p is None:
                return
            with self._lock:
                wanted = not p.dropped and not self._closing
            # leave the host a margin: a prepared block must never be what runs it out of memory
            available = meminfo_available()
            if wanted and (available is None or available > 2 * p.size):
                buffer = _mapping(p.size)
                _fault_in(buffer)
                p.buffer = buffer
            p.ready.set()

    def give_back(self, block: _Block) -> None:
        """A block whose tensors are gone: zeroed on a thread (the next cache's prefill would
        otherwise zero it, ~0.2 s a 32K sequence on the H100 host), then free for the next take."""
        with self._lock:
            self._free.append(block)
            if self._closing:  # nobody will take it again: no zeroing, no thread
                block.fresh = False
                return
            block.cleaned.clear()
            if self._cleaner is None:
                self._cleaner = threading.Thread(target=self._clean_loop, name="shadowkv-pinned-clean", daemon=True)
                self._cleaner.start()
        self._dirty.put(block)

    def _clean_loop(self) -> None:
        while True:
            block = self._dirty.get()
            if block is None:
                return
            if self._closing:
                block.fresh = False
                block.cleaned.set()
                continue
            try:
                host_copies.drain()  # the last cache's copies into it may still be landing
                _zero(block.buffer)
                block.fresh = True
            finally:
                block.cleaned.set()

    def trim(self, keep_bytes: int = 0) -> None:
        """Release free blocks, oldest first, until at most ``keep_bytes`` stay pooled."""
        while True:
            with self._lock:
                if not self._free or sum(b.size for b in self._free) <= keep_bytes:
                    return
                block = self._free.pop(0)
            block.release()

    def _make_room(self, size: int) -> None:
        while True:
            with self._lock:
                if not self._free:
                    return
            available = meminfo_available()
            if available is None or available >= size:
                return
            with self._lock:
                block = self._free.pop(0) if self._free else None
            if block is not None:
                block.release()


POOL = PinnedPool()
atexit.register(POOL.close)


def pinned_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed contiguous CPU tensor in page-locked memory, no larger than it needs (whole pages),
    from the pool when a block of that size is free."""
    nbytes = math.prod(shape) * dtype.itemsize
    block = POOL.take(registered_bytes(max(nbytes, 1)))
    raw = torch.frombuffer(block.buffer, dtype=torch.uint8)
    tensor = raw[:nbytes].view(dtype).view(shape)
    if not block.fresh:  # not zeroed since its last use (the cleaner failed)
        host_copies.drain()
        tensor.zero_()
    block.fresh = False
    # every view of the block shares this storage: it dies with the last of them
    weakref.finalize(raw.untyped_storage(), POOL.give_back, block).atexit = False
    return tensor


def grown(t: torch.Tensor | None, dim: int, size: int) -> torch.Tensor | None:
    """A copy of ``t`` with dim ``dim`` zero-extended to ``size``, in page-locked memory where ``t`` is
    (None stays None: a store without scales)."""
    if t is None:
        return None
    shape = list(t.shape)
    shape[dim] = size
    new = pinned_zeros(shape, t.dtype) if t.is_pinned() else t.new_zeros(shape)
    new.narrow(dim, 0, t.shape[dim]).copy_(t)
    return new


def moved(t: torch.Tensor, width: int, kept: int, start: int, to: int, count: int) -> torch.Tensor:
    """A copy of ``t [B, H, N, ...]`` with ``width`` slots along N: its first ``kept`` slots in place,
    its ``count`` slots from ``start`` moved to ``to``, zeros elsewhere (a decode buffer re-laid out)."""
    new = t.new_zeros(*t.shape[:2], width, *t.shape[3:])
    new[:, :, :kept] = t[:, :, :kept]
    new[:, :, to : to + count] = t[:, :, start : start + count]
    return new
