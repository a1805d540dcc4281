"""Prefill attention in pieces (``prefill_chunk_size``, ``ShadowKVSlots``' prefill): each piece's
causal attention over the prompt so far equals the one-piece prefill's rows, left padding included.
A later piece attends through SDPA's lower-right causal bias, or on a GPU in 16 bits through two
cuDNN calls (earlier keys, the piece's own keys) merged by their log-sum-exps; a math stand-in for
cuDNN runs that split on the CPU."""
import pytest
import torch

from shadowkv_fx import prefill_attention
from shadowkv_fx.prefill_attention import dense_prefill, merge_partial
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
    if torch.backends.cudnn.is_available() and torch.backends.cuda.cudnn_sdp_enabled():
        ran = {key[1:]: agrees for key, agrees in prefill_attention._SPLIT_AGREES.items() if key[0].type == "cuda"}
        assert ran.get((torch.bfloat16, 64)) is True, f"the cuDNN split did not run: {ran}"


def math_with_lse(q, k, v, causal, scale):
    """What ``_cudnn_with_lse`` returns, in float32 math: the output and its log-sum-exp ``[.., n, 1]``."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        n, s = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(n, s, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype), scores.logsumexp(-1, keepdim=True)


def test_merge_of_two_key_sets_is_attention_over_both():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 9, 16, generator=gen)
    # the second key set scores ~20 higher: a plain exp-sum would lean on one side's overflow
    k_a, k_b = torch.randn(1, 4, 30, 16, generator=gen), 6 * torch.randn(1, 4, 5, 16, generator=gen)
    v_a, v_b = torch.randn(1, 4, 30, 16, generator=gen), torch.randn(1, 4, 5, 16, generator=gen)
    whole, _ = math_with_lse(q, torch.cat([k_a, k_b], 2), torch.cat([v_a, v_b], 2), False, 1.0)
    merged = merge_partial(*math_with_lse(q, k_a, v_a, False, 1.0), *math_with_lse(q, k_b, v_b, False, 1.0))
    assert_close(merged, whole, atol=1e-5, rtol=1e-5, what="merged against one softmax")
    swapped = merge_partial(*math_with_lse(q, k_b, v_b, False, 1.0), *math_with_lse(q, k_a, v_a, False, 1.0))
    assert_close(swapped, whole, atol=1e-5, rtol=1e-5, what="the merge is symmetric")


@pytest.fixture
def split_on_cpu(monkeypatch):
    """The GPU's split with math in cuDNN's place: ``calls`` records each (queries, keys, causal)."""
    calls = []

    def stand_in(q, k, v, causal, scale):
        calls.append((q.shape[2], k.shape[2], causal))
        return math_with_lse(q, k, v, causal, scale)

    monkeypatch.setattr(prefill_attention, "_SPLIT_AGREES", {})
    monkeypatch.setattr(prefill_attention, "_cudnn_with_lse", stand_in)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: True)
    return calls


@pytest.mark.parametrize("piece", [16, 100])
def test_split_later_pieces_equal_one_prefill(split_on_cpu, piece):
    pieces_against_whole("cpu", torch.bfloat16, piece, 2e-2)
    calls = split_on_cpu
    assert calls and all(n == s for n, s, causal in calls if causal), "the piece's own keys: a causal square"
    assert {causal for _, _, causal in calls} == {True, False}
    assert list(prefill_attention._SPLIT_AGREES.values()) == [True], "checked once, then used"


def test_a_refused_cudnn_call_falls_back_to_the_lower_right_bias(split_on_cpu, monkeypatch):
    def refuse(*args):
        raise RuntimeError("cuDNN Frontend error: no valid execution plans")

    monkeypatch.setattr(prefill_attention, "_cudnn_with_lse", refuse)
    with pytest.warns(UserWarning, match="cuDNN attention refused"):
        pieces_against_whole("cpu", torch.bfloat16, 64, 2e-2)
    assert list(prefill_attention._SPLIT_AGREES.values()) == [False], "refused once, not tried again"


def test_a_split_that_disagrees_with_the_bias_is_never_used(split_on_cpu, monkeypatch):
    def wrong_lse(q, k, v, causal, scale):  # a log-sum-exp in base 2, say
        out, lse = math_with_lse(q, k, v, causal, scale)
        return out, lse / 0.6931

    monkeypatch.setattr(prefill_attention, "_cudnn_with_lse", wrong_lse)
    with pytest.warns(UserWarning, match="differs from the lower-right bias"):
        pieces_against_whole("cpu", torch.bfloat16, 64, 2e-2)
    assert list(prefill_attention._SPLIT_AGREES.values()) == [False]
