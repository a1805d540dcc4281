"""Triton flash-decoding over the persistent [prefix | tail] K/V buffer against its PyTorch reference.

Runs under TRITON_INTERPRET=1 on CPU (small shapes: ~0.5 ms per program instance); the Llama-3.1-8B
shapes and the CUDA-graph replay run only where CUDA is.
"""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from shadowkv_fx.kernels import naive, triton_decode_attention as tda  # noqa: E402
from tests.models import assert_close, cuda_only  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# (dtype, atol, rtol): bf16 rounds the output and, on the GPU, the probabilities fed to P @ V
TOLERANCES = [(torch.float32, 2e-5, 1e-4), (torch.bfloat16, 2e-2, 2e-2)]


def make_inputs(seed, b, hkv, g, n, d, prefix, cap, fill, dtype, dv=None, invalid_heads=0.3, q_strided=False):
    """Random q/K/V, a random prefix mask with some (b, h) rows fully invalid, and the fill tensor.

    Returns ``(q, k, v, key_valid, fill, k_poisoned, v_poisoned)``: the poisoned buffers hold NaN
    wherever no query may look (invalid prefix keys, unwritten tail), which the kernel must never read.
    """
    gen = torch.Generator().manual_seed(seed)
    dv = dv or d
    keys = prefix + cap
    if q_strided:  # HF projects to [B, n, Hq, D] and transposes: q arrives non-contiguous
        q = torch.randn(b, n, hkv * g, d, generator=gen).transpose(1, 2)
    else:
        q = torch.randn(b, hkv * g, n, d, generator=gen)
    k = torch.randn(b, hkv, keys, d, generator=gen)
    v = torch.randn(b, hkv, keys, dv, generator=gen)
    valid = torch.rand(b, hkv, keys, generator=gen) < torch.rand(b, hkv, 1, generator=gen)
    valid &= torch.rand(b, hkv, 1, generator=gen) >= invalid_heads
    valid[..., prefix:] = False  # past tail_start the mask is unused: make sure it is not read
    unseen = ~valid
    unseen[..., prefix:prefix + fill] = False
    k_bad, v_bad = k.masked_fill(unseen[..., None], float("nan")), v.masked_fill(unseen[..., None], float("nan"))
    fill_t = torch.tensor(fill, dtype=torch.int64, device=DEVICE)
    cast = [t.to(device=DEVICE, dtype=dtype) for t in (q, k, v)]
    bad = [t.to(device=DEVICE, dtype=dtype) for t in (k_bad, v_bad)]
    return (*cast, valid.to(DEVICE), fill_t, *bad)


def run_and_compare(args, tail_start, tol, scale, num_splits=None, what=""):
    dtype, atol, rtol = tol
    q, k, v, valid, fill, k_bad, v_bad = args
    b, hq, n, _ = q.shape
    out = torch.full((b, hq, n, v.shape[-1]), float("nan"), dtype=dtype, device=DEVICE)
    got = tda.decode_attention(q, k_bad, v_bad, valid, tail_start, fill, scale, out=out, num_splits=num_splits)
    assert got is out
    expected = naive.decode_attention(q, k, v, valid, tail_start, fill, scale)
    assert_close(got, expected, atol=atol, rtol=rtol, what=what)


@pytest.mark.parametrize("tol", TOLERANCES, ids=["fp32", "bf16"])
@given(
    b=st.sampled_from([1, 3]), hkv=st.sampled_from([1, 2]), g=st.sampled_from([1, 2, 4]),
    n=st.sampled_from([1, 2, 3, 4, 7]), d=st.sampled_from([16, 64]), prefix=st.integers(0, 300),
    cap=st.integers(5, 40), fill_frac=st.floats(0, 1), num_splits=st.sampled_from([None, 1, 2, 5]),
    q_strided=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_decode_attention_matches_reference(tol, b, hkv, g, n, d, prefix, cap, fill_frac, num_splits, q_strided, seed):
    fill = n + round(fill_frac * (cap - n))
    args = make_inputs(seed, b, hkv, g, n, d, prefix, cap, fill, tol[0], q_strided=q_strided)
    run_and_compare(args, prefix, tol, scale=1.5 * d ** -0.5, num_splits=num_splits,
                    what=f"b={b} hkv={hkv} g={g} n={n} d={d} N={prefix + cap} fill={fill} splits={num_splits}")


@pytest.mark.parametrize("tol", TOLERANCES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("prefix, cap, n, num_splits", [(32, 5, 1, None), (261, 40, 2, None), (261, 40, 4, 5)])
def test_fully_masked_splits(tol, prefix, cap, n, num_splits):
    """Every prefix key invalid and only the newest tail tokens written: most splits see no key."""
    args = make_inputs(7, 1, 2, 4, n, 16, prefix, cap, n, tol[0], invalid_heads=1.0)
    assert not args[3].any()
    run_and_compare(args, prefix, tol, scale=0.25, num_splits=num_splits, what="fully masked splits")


@pytest.mark.parametrize("tol", TOLERANCES, ids=["fp32", "bf16"])
def test_value_dim_differs_from_key_dim(tol):
    args = make_inputs(3, 3, 2, 2, 2, 16, 70, 9, 6, tol[0], dv=32)
    run_and_compare(args, 70, tol, scale=0.25, num_splits=2, what="Dv != D")


@pytest.mark.parametrize("tol", TOLERANCES, ids=["fp32", "bf16"])
@settings(max_examples=4)
@given(b=st.sampled_from([2, 3]), n=st.sampled_from([1, 3]), num_splits=st.sampled_from([None, 3]),
       seed=st.integers(0, 2**31 - 1))
def test_tail_slots_before_each_rows_first_are_never_read(tol, b, n, num_splits, seed):
    """Folded tail tokens (``tail_first``): poisoned with NaN, they must weigh nothing."""
    prefix, cap, fill = 70, 30, 24
    q, k, v, valid, fill_t, k_bad, v_bad = make_inputs(seed, b, 2, 2, n, 16, prefix, cap, fill, tol[0])
    first = torch.randint(0, fill - n + 1, (b,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    for row in range(b):
        k_bad[row, :, prefix:prefix + int(first[row])] = float("nan")
        v_bad[row, :, prefix:prefix + int(first[row])] = float("nan")
    out = tda.decode_attention(q, k_bad, v_bad, valid, prefix, fill_t, 0.25, num_splits=num_splits, tail_first=first)
    expected = naive.decode_attention(q, k, v, valid, prefix, fill_t, 0.25, tail_first=first)
    assert_close(out, expected, atol=tol[1], rtol=tol[2], what=f"tail_first={first.tolist()}")
    mask = naive.decode_mask(valid, prefix + cap, prefix, fill_t, n, first)
    assert not mask[0, :, :, prefix:prefix + int(first[0])].any()


def test_choose_splits_fills_the_gpu():
    assert tda.choose_splits(1, 37) == 1  # one tile cannot be split
    for programs, keys in [(8, 2528), (32, 2528), (128, 2528), (8, 301)]:
        splits = tda.choose_splits(programs, keys)
        tiles = triton.cdiv(keys, tda.BLOCK_N)
        assert 1 <= splits <= tiles
        assert programs * splits >= min(tda.H100_SMS, programs * tiles)


def test_rejects_bad_arguments():
    q, k, v, valid, fill, _, _ = make_inputs(0, 1, 2, 2, 1, 16, 8, 8, 1, torch.float32)
    with pytest.raises(ValueError, match="tail_start"):
        tda.decode_attention(q, k, v, valid, 16, fill, 1.0)
    with pytest.raises(ValueError, match="int64"):
        tda.decode_attention(q, k, v, valid, 8, fill.int(), 1.0)
    with pytest.raises(ValueError, match="multiple"):
        tda.decode_attention(q[:, :3], k, v, valid, 8, fill, 1.0)
    with pytest.raises(ValueError, match="key_valid"):
        tda.decode_attention(q, k, v, valid.float(), 8, fill, 1.0)


# Llama-3.1-8B decode with ShadowKV defaults: 48 outlier chunks of 8, a 2048-token budget, a 32-token
# local window and a 64-token generated tail.
LLAMA_PREFIX = 48 * 8 + 2048 + 32


@cuda_only
@pytest.mark.parametrize("b", [4, 16])
def test_llama_shapes_and_cuda_graph_replay(b):
    hkv, g, n, d, cap = 8, 4, 1, 128, 64
    dtype, atol, rtol = TOLERANCES[1]
    # clean buffers: the replays below reveal tail slots that were unwritten at fill 37
    q, k, v, valid, fill, _, _ = make_inputs(b, b, hkv, g, n, d, LLAMA_PREFIX, cap, 37, dtype, invalid_heads=0.1)
    out = torch.full((b, hkv * g, n, d), float("nan"), dtype=dtype, device=DEVICE)
    run = lambda: tda.decode_attention(q, k, v, valid, LLAMA_PREFIX, fill, d ** -0.5, out=out)  # noqa: E731
    run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for level in (37, 38, cap):  # the replay must read the fill level anew each time
        fill.fill_(level)
        out.fill_(float("nan"))
        graph.replay()
        expected = naive.decode_attention(q, k, v, valid, LLAMA_PREFIX, fill, d ** -0.5)
        assert_close(out, expected, atol=atol, rtol=rtol, what=f"B={b} fill={level}")


@cuda_only
def test_a_new_query_count_compiles_nothing_new():
    """Questions of 33..64 tokens (a prefix-store hit asks its question as one multi-token step) share a
    few compiled kernels: the query count is a run-time argument, so it is not one compile per count
    (seconds each, mid-serving). Triton still specialises on divisibility by 16 and the tile height."""
    hkv, g, d, cap = 8, 4, 128, 96
    dtype, atol, rtol = TOLERANCES[1]

    def compiled() -> int:  # kernels compiled so far, per device (Triton >= 3.2 keeps them in device_caches)
        kernel = tda.decode_split_kernel
        caches = getattr(kernel, "device_caches", None)
        if caches is not None:
            return sum(len(entry[0]) for entry in caches.values())
        return sum(len(per_device) for per_device in kernel.cache.values())

    before = None
    for n in range(33, 65):
        q, k, v, valid, fill, _, _ = make_inputs(n, 2, hkv, g, n, d, LLAMA_PREFIX, cap, cap, dtype, invalid_heads=0.1)
        got = tda.decode_attention(q, k, v, valid, LLAMA_PREFIX, fill, d ** -0.5)
        assert_close(got, naive.decode_attention(q, k, v, valid, LLAMA_PREFIX, fill, d ** -0.5), atol=atol, rtol=rtol,
                     what=f"n={n}")
        before = compiled() if before is None else before
    assert compiled() - before <= 3, f"{compiled() - before} more compiled decode kernels for 31 more query counts"
