"""``pinned.pinned_zeros``: exact-size page-locked values the GPU reads like allocator-pinned ones."""
import gc

import pytest
import torch

from shadowkv_fx import pinned, preflight
from tests.models import cuda_only


def test_preflight_counts_whole_pages_not_powers_of_two():
    layer = 2_800_000_000 + 123
    assert preflight.pinned_bytes(layer) == pinned.registered_bytes(layer)
    assert layer <= preflight.pinned_bytes(layer) < layer + pinned.PAGE
    assert preflight.pinned_bytes(0) == 0


@cuda_only
def test_pinned_values_are_exact_page_locked_and_read_by_the_gather():
    from shadowkv_fx.kernels import dispatch, naive

    before = pinned.live_bytes()
    shape = (2, 3, 50, 8, 64)  # [B, Hkv, C, L, D]: 153,600 bf16 values, 307,200 bytes, 75 pages
    values = pinned.pinned_zeros(shape, torch.bfloat16)
    assert values.is_pinned() and values.is_contiguous() and values.shape == shape
    assert not values.any()
    assert pinned.live_bytes() - before == pinned.registered_bytes(values.numel() * 2) == 75 * pinned.PAGE
    values.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16))

    on_device = values.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_device.cpu(), values)
    chunk_idx = torch.stack([torch.randperm(50, device="cuda")[:7] for _ in range(6)]).view(2, 3, 7)
    gathered = dispatch.gather_value_chunks(values, chunk_idx, torch.device("cuda"))  # Triton, through UVA
    assert torch.equal(gathered, naive.gather_value_chunks(on_device, chunk_idx, torch.device("cuda")))

    view = values[1, :, 4:9]  # a view keeps the registration alive
    del values, on_device
    gc.collect()
    assert pinned.live_bytes() - before == 75 * pinned.PAGE and view.is_pinned()
    pooled = pinned.POOL.pooled_bytes()
    del view
    gc.collect()
    assert pinned.POOL.pooled_bytes() - pooled == 75 * pinned.PAGE, "the freed block waits in the pool, registered"
    again = pinned.pinned_zeros(shape, torch.bfloat16)
    assert again.is_pinned() and not again.any() and pinned.live_bytes() - before == 75 * pinned.PAGE
    del again
    gc.collect()
    pinned.POOL.trim()
    assert pinned.live_bytes() == before, "trimming the pool unregisters its blocks"


@pytest.fixture
def fake_registration(monkeypatch):
    """cudaHostRegister / Unregister recorded instead of called: the pool's bookkeeping on a CPU."""
    calls = {"register": [], "unregister": []}
    monkeypatch.setattr(pinned, "_register", lambda ptr, size: calls["register"].append((ptr, size)))
    monkeypatch.setattr(pinned, "_unregister", lambda ptr: calls["unregister"].append(ptr))
    monkeypatch.setattr(pinned, "POOL", pinned.PinnedPool())
    monkeypatch.setattr(preflight, "POOL", pinned.POOL)
    monkeypatch.setattr(preflight, "meminfo_available", lambda: 10 * 2**30)  # not the machine's, which moves
    return calls


def test_a_cache_of_the_same_shape_reuses_the_pinned_blocks(fake_registration):
    shape = (2, 3, 50, 8, 64)
    first = [pinned.pinned_zeros(shape, torch.bfloat16) for _ in range(3)]  # three layers
    ptrs = sorted(t.data_ptr() for t in first)
    for t in first:
        t.fill_(1.5)
    assert len(fake_registration["register"]) == 3 and pinned.POOL.pooled_bytes() == 0
    del first, t
    gc.collect()
    size = pinned.registered_bytes(2 * 3 * 50 * 8 * 64 * 2)
    assert pinned.POOL.pooled_bytes() == 3 * size
    assert preflight.mem_available() == 10 * 2**30 + 3 * size, "pooled blocks count as available"
    second = [pinned.pinned_zeros(shape, torch.bfloat16) for _ in range(3)]
    assert sorted(t.data_ptr() for t in second) == ptrs, "the same blocks, not new page-locks"
    assert len(fake_registration["register"]) == 3 and not fake_registration["unregister"]
    assert all(not t.any() for t in second), "a reused block is zeroed"
    assert pinned.POOL.pooled_bytes() == 0 and preflight.mem_available() == 10 * 2**30


def test_a_view_keeps_its_block_out_of_the_pool(fake_registration):
    values = pinned.pinned_zeros((4, 1000), torch.float32)
    view = values[2:]
    view.fill_(7.0)
    del values
    gc.collect()
    assert pinned.POOL.pooled_bytes() == 0
    other = pinned.pinned_zeros((4, 1000), torch.float32)  # must not reuse the viewed block
    assert other.data_ptr() != view.data_ptr() - 2 * 1000 * 4 and bool((view == 7.0).all())
    del view
    gc.collect()
    assert pinned.POOL.pooled_bytes() == pinned.registered_bytes(16000)


def test_trim_unregisters_free_blocks_oldest_first(fake_registration):
    blocks = [pinned.pinned_zeros((n, 1024), torch.float32) for n in (1, 2, 3)]
    while blocks:  # freed in order: 1, 2, then 3 pages
        del blocks[0]
        gc.collect()
    pinned.POOL.trim(keep_bytes=5 * 4096)
    assert len(fake_registration["unregister"]) == 1 and pinned.POOL.pooled_bytes() == 5 * 4096
    pinned.POOL.trim()
    assert len(fake_registration["unregister"]) == 3 and pinned.POOL.pooled_bytes() == 0


def test_a_prefill_s_blocks_are_faulted_in_ahead_on_another_thread_and_registered_on_the_caller(
        fake_registration, monkeypatch):
    import threading

    registering, touching = [], []
    monkeypatch.setattr(pinned, "_register", lambda ptr, size: registering.append(threading.get_ident()))
    real_fault_in = pinned._fault_in
    monkeypatch.setattr(pinned, "_fault_in", lambda buffer: (touching.append(threading.get_ident()),
                                                             real_fault_in(buffer)))
    monkeypatch.setattr(pinned, "meminfo_available", lambda: 10 * 2**30)
    shape = (2, 3, 50, 8, 64)
    size = pinned.registered_bytes(2 * 3 * 50 * 8 * 64 * 2)
    pinned.POOL.expect(4)  # a 4-layer prefill
    layers = [pinned.pinned_zeros(shape, torch.bfloat16) for _ in range(4)]
    me = threading.get_ident()
    assert registering == [me] * 4, "only the caller talks to CUDA"
    assert len(touching) == 3 and me not in touching, "layers 1-3 were faulted in by the prefetch thread"
    assert all(not t.any() for t in layers) and len({t.data_ptr() for t in layers}) == 4
    assert pinned.POOL.pooled_bytes() == 0

    pinned.POOL.expect(4)
    other = pinned.pinned_zeros((3, 1000), torch.float32)  # another size: a fresh block, 3 prepared behind it
    assert pinned.POOL.pooled_bytes() == 3 * pinned.registered_bytes(12000)
    pinned.POOL.settle()  # the prefill ended (its other layers kept their values on the GPU)
    assert pinned.POOL.pooled_bytes() == 0 and len(registering) == 5
    del layers, other


def test_no_block_is_prepared_when_the_host_is_short_of_memory(fake_registration, monkeypatch):
    monkeypatch.setattr(pinned, "meminfo_available", lambda: 100_000)  # less than twice a block
    pinned.POOL.expect(3)
    blocks = [pinned.pinned_zeros((20, 1024), torch.float32) for _ in range(3)]  # 80 KiB each
    assert len(fake_registration["register"]) == 3 and all(not b.any() for b in blocks)
    assert pinned.POOL.pooled_bytes() == 0


def test_a_block_given_back_is_zeroed_on_the_cleaner_thread_before_anyone_takes_it(fake_registration, monkeypatch):
    import threading

    zeroing, done = [], []
    real_zero = pinned._zero

    def slow_zero(buffer):
        zeroing.append(threading.get_ident())
        threading.Event().wait(0.2)  # a take arriving meanwhile must wait for it
        real_zero(buffer)
        done.append(True)

    monkeypatch.setattr(pinned, "_zero", slow_zero)
    values = pinned.pinned_zeros((4, 1000), torch.float32)
    ptr = values.data_ptr()
    values.fill_(3.0)
    del values
    gc.collect()
    again = pinned.pinned_zeros((4, 1000), torch.float32)
    assert done, "the take waited for the cleaner"
    assert again.data_ptr() == ptr and not again.any(), "the same block, zeroed"
    assert zeroing and threading.get_ident() not in zeroing, "zeroed by the cleaner, not the caller"


def test_value_slots_ask_the_device_budget_off_the_cpu_and_go_to_the_device_when_granted():
    """The decision a GPU prefill takes (a CPU model never asks): run on the meta device."""
    from shadowkv_fx.value_store import value_slots

    asked = []
    like = torch.empty(0, dtype=torch.bfloat16, device="meta")
    slots = value_slots((2, 3, 4, 8, 16), like, lambda nbytes: asked.append(nbytes) or True)
    assert asked == [2 * 3 * 4 * 8 * 16 * 2] and slots.device.type == "meta" and slots.shape == (2, 3, 4, 8, 16)


def test_closing_the_pool_at_exit_stops_its_threads_and_leaves_nothing_waiting(fake_registration, monkeypatch):
    """At interpreter exit a daemon thread inside a torch call is killed mid-C++ and the process
    aborts (seen on the H100 after a 122K bench); ``close`` (registered with atexit) joins both."""
    monkeypatch.setattr(pinned, "meminfo_available", lambda: 10 * 2**30)
    shape = (2, 3, 50, 8, 64)
    pinned.POOL.expect(3)
    layers = [pinned.pinned_zeros(shape, torch.bfloat16) for _ in range(3)]
    del layers
    gc.collect()  # three blocks handed to the cleaner
    pool = pinned.POOL
    threads = [pool._worker, pool._cleaner]
    assert all(t is not None and t.is_alive() for t in threads)
    pool.close()
    assert not any(t.is_alive() for t in threads), "both threads ended"
    late = pinned.pinned_zeros(shape, torch.bfloat16)  # a free block, taken without waiting on a cleaner
    del late
    gc.collect()
    pool.expect(3)
    more = [pinned.pinned_zeros((5, 1000), torch.float32) for _ in range(2)]  # no prefetch after close
    assert [pool._worker, pool._cleaner] == threads and not any(t.is_alive() for t in threads), "no thread restarted"
    assert all(not t.any() for t in more)
    pool.trim()


def test_the_process_exits_cleanly_with_blocks_being_zeroed():
    import subprocess
    import sys

    script = (
        "import gc, torch\n"
        "from shadowkv_fx import pinned\n"
        "pinned._register = lambda ptr, size: None\n"
        "pinned._unregister = lambda ptr: None\n"
        "pinned.POOL.expect(4)\n"
        "blocks = [pinned.pinned_zeros((64, 2**20), torch.uint8) for _ in range(4)]\n"
        "del blocks; gc.collect()\n"  # 256 MiB to zero when the interpreter starts to exit
        "print('done')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr[-2000:]
