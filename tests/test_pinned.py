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
    from shadowkv_fx.kernels import dispatch, reference

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
    assert torch.equal(gathered, reference.gather_value_chunks(on_device, chunk_idx, torch.device("cuda")))

    view = values[1, :, 4:9]  # a view keeps the registration alive
    del values, on_device
    gc.collect()
    assert pinned.live_bytes() - before == 75 * pinned.PAGE and view.is_pinned()
    del view
    gc.collect()
    assert pinned.live_bytes() == before, "freeing the storage unregisters it"
