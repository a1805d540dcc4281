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

import math
import mmap
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


class _Block:
    """A page-locked anonymous mapping. Tensors view it through ``torch.frombuffer``, so the mapping
    outlives them: when the last one goes, the block returns to the pool still registered."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.buffer = mmap.mmap(-1, size)  # page-aligned and zero-filled by the kernel
        if hasattr(mmap, "MADV_HUGEPAGE"):
            # before the first touch: registering faults the pages in, and locks 512x fewer of them
            # when they are 2 MiB transparent huge pages (where the kernel allows them)
            self.buffer.madvise(mmap.MADV_HUGEPAGE)
        self.ptr = torch.frombuffer(self.buffer, dtype=torch.uint8).data_ptr()
        _register(self.ptr, size)
        _count(size)
        self.fresh = True  # still as the kernel zeroed it

    def release(self) -> None:
        _unregister(self.ptr)
        _count(-self.size)
        self.buffer.close()


class PinnedPool:
    """Registered blocks whose tensors are gone, kept by size for the next cache of the same shape.

    Page-locking is the slow part of offloading values (~2 GiB/s on the H100 host: 40 s for the
    82 GiB of a 122K x 12 batch); a second ``generate()`` with the same batch shape takes its
    blocks back here instead. Free blocks are released, oldest first, when a block of another size
    is needed and the host's available memory (pool included) would not cover it otherwise, or
    when ``trim()`` is called.
    """

    def __init__(self) -> None:
        self._free: list[_Block] = []  # oldest first
        self._lock = threading.Lock()

    def pooled_bytes(self) -> int:
        with self._lock:
            return sum(b.size for b in self._free)

    def take(self, size: int) -> _Block:
        with self._lock:
            for i, block in enumerate(self._free):
                if block.size == size:
                    return self._free.pop(i)
        self._make_room(size)
        return _Block(size)

    def give_back(self, block: _Block) -> None:
        with self._lock:
            self._free.append(block)

    def trim(self, keep_bytes: int = 0) -> None:
        """Release free blocks, oldest first, until at most ``keep_bytes`` stay pooled."""
        while True:
            with self._lock:
                if not self._free or sum(b.size for b in self._free) <= keep_bytes:
                    return
                block = self._free.pop(0)
            block.release()

    def _make_room(self, size: int) -> None:
        while self.pooled_bytes():
            available = meminfo_available()
            if available is None or available >= size:
                return
            with self._lock:
                block = self._free.pop(0) if self._free else None
            if block is not None:
                block.release()


POOL = PinnedPool()


def pinned_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed contiguous CPU tensor in page-locked memory, no larger than it needs (whole pages),
    from the pool when a block of that size is free."""
    nbytes = math.prod(shape) * dtype.itemsize
    block = POOL.take(registered_bytes(max(nbytes, 1)))
    raw = torch.frombuffer(block.buffer, dtype=torch.uint8)
    tensor = raw[:nbytes].view(dtype).view(shape)
    if not block.fresh:  # a pooled block holds the last cache's values, perhaps still landing
        host_copies.drain()
        tensor.zero_()
    block.fresh = False
    # every view of the block shares this storage: it dies with the last of them
    weakref.finalize(raw.untyped_storage(), POOL.give_back, block).atexit = False
    return tensor


def grown(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """A copy of ``t`` with dim ``dim`` zero-extended to ``size``, in page-locked memory where ``t`` is."""
    shape = list(t.shape)
    shape[dim] = size
    new = pinned_zeros(shape, t.dtype) if t.is_pinned() else t.new_zeros(shape)
    new.narrow(dim, 0, t.shape[dim]).copy_(t)
    return new
