"""Prefill attention in pieces (``prefill_chunk_size``, ``ShadowKVSlots``' prefill): each piece's
causal attention over the prompt so far equals the one-piece prefill's rows, left padding included.
A later piece attends through SDPA's lower-right causal bias (flash attention on a GPU)."""
import pytest
import torch

from shadowkv_fx.prefill_attention import dense_prefill
from shadowkv_fx.prompt_layout import PromptLayout
from tests.models import assert_close, cuda_only


def pieces_against_whole(device: str, dtype: torch.dtype, piece: int, tol: float) -> None:
    gen = torch.Generator().manual_seed(0)
    pad, total, hq, hkv, d = [0, 37], 300, 8, 2, 64
    q, k, v = (torch.randn(2, h, total, d, generator=gen).to(device, dtype) for h in (hq, hkv, hkv))
    layout = PromptLayout(pad=pad, lengths=[total - p for p in pad], chunks=[0, 0], padded_len=total)
    whole = dense_prefill(q, k, v, layout, scale=d**-0.5)
    parts = [dense_prefill(q[:, :, start : start + piece], k[:, :, : start + piece], v[:, :, : start + piece], layout,
                           scale=d**-0.5, start=start) for start in range(0, total, piece)]
    in_pieces = torch.cat(parts, dim=2)
    for b, p in enumerate(pad):
        assert_close(in_pieces[b, :, p:], whole[b, :, p:], atol=tol, rtol=tol, what=f"row {b}, pieces of {piece}")
        assert not in_pieces[b, :, :p].any(), "pad rows stay zero"


@pytest.mark.parametrize("piece", [16, 100, 64])
def test_pieces_equal_one_prefill(piece):
    pieces_against_whole("cpu", torch.float32, piece, 1e-5)


@cuda_only
@pytest.mark.parametrize("piece", [16, 100, 128])
def test_on_the_gpu_pieces_equal_one_prefill(piece):
    pieces_against_whole("cuda", torch.bfloat16, piece, 2e-2)
