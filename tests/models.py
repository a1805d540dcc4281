"""Tiny random Hugging Face models of every supported architecture, and comparison helpers."""
from __future__ import annotations

import threading

import pytest
import torch
import transformers as T

ARCHS = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, {}),
    "yi": (T.LlamaConfig, T.LlamaForCausalLM, {"rope_parameters": {"rope_type": "default", "rope_theta": 5e6}}),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, {}),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, {}),
    "glm4": (T.Glm4Config, T.Glm4ForCausalLM, {"partial_rotary_factor": 0.5}),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {}),
}


# Randomly initialised attention (weights ~N(0, 0.02)) is almost uniform: keys that are all zero,
# or rotated one position late, move the logits by ~1e-3 and the greedy tokens not at all. Peaked
# models multiply every query by QUERY_GAIN, so each query attends a handful of keys. Measured on
# the 2-layer Llama, Qwen3, Phi-3 and GLM-4 twins (61 + 54 tokens, full budget and rank): the first
# decode step's logits move by 1e-2 to 5e-1 under those two bugs (vs 1e-3 unpeaked) and the greedy
# tokens change, while the unmutated path still equals dense within 2e-5. (Scaling the output
# projection as well did not help: the next norm takes the scale back out.)
QUERY_GAIN = 32.0


def tiny_pair(arch: str, *, kv_heads: int = 2, group: int = 2, head_dim: int = 16, layers: int = 2,
              attn: str = "sdpa", seed: int = 0, vocab: int = 96, max_positions: int = 2048, peaked: bool = False):
    """Two copies of one random model: one to keep dense, one to optimize (``peaked``: see QUERY_GAIN)."""
    config_cls, model_cls, extra = ARCHS[arch]
    heads = kv_heads * group
    cfg = config_cls(
        vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=2 * heads * head_dim,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra,
    )
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    dense = model_cls(cfg).eval()
    if peaked:
        sharpen_attention(dense, QUERY_GAIN)
    other = model_cls(cfg).eval()
    other.load_state_dict(dense.state_dict())
    return dense, other


@torch.no_grad()
def sharpen_attention(model, query_gain: float) -> None:
    """Multiply every attention layer's query (so its attention logits) by ``query_gain``,
    whatever the architecture's projections look like."""
    for layer in model.model.layers:
        attn = layer.self_attn
        q_width = attn.config.num_attention_heads * attn.head_dim
        if hasattr(attn, "q_norm"):  # the norm undoes any scale of q_proj: scale after it
            attn.q_norm.weight.mul_(query_gain)
        elif hasattr(attn, "q_proj"):
            attn.q_proj.weight.mul_(query_gain)
            if attn.q_proj.bias is not None:
                attn.q_proj.bias.mul_(query_gain)
        else:  # fused projection: the query rows come first
            attn.qkv_proj.weight[:q_width].mul_(query_gain)


def full_rank(model) -> int:
    cfg = model.config
    return cfg.num_key_value_heads * cfg.head_dim


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0, what: str = "") -> None:
    """allclose that says how many elements differ, the max abs/rel error and the first mismatches."""
    actual, expected = actual.float(), expected.float()
    assert actual.shape == expected.shape, f"{what} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    bad = (diff > atol + rtol * expected.abs()) | actual.isnan() != expected.isnan()
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        rel = (diff / expected.abs().clamp_min(1e-12)).max().item()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements differ; max abs {diff.max().item():.3e}, "
            f"max rel {rel:.3e}; first at {idx}: "
            + ", ".join(f"{actual[tuple(i)].item():.6g} vs {expected[tuple(i)].item():.6g}" for i in idx)
        )


def left_padded(batch: int, lengths: list[int], vocab: int, seed: int = 0):
    """Random token ids (never pad/bos/eos) left-padded to the longest length, and their mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[b, width - n:] = 1
    return ids, mask


def run_threads_against_serial(jobs, runs: int) -> None:
    """Run each job serially, then all at once on threads, ``runs`` times each: every threaded
    result must equal that job's serial one."""
    serial = [job() for job in jobs]
    results = [None] * len(jobs)
    errors = []

    def work(i):
        try:
            for _ in range(runs):
                out = jobs[i]()
                assert torch.equal(out, serial[i]), f"thread {i} differs from its serial run"
            results[i] = out
        except BaseException as exc:  # reported below, with the thread that saw it
            errors.append((i, exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert all(r is not None for r in results)


# GPU-only tests (GPU-sized kernel cases, CUDA graphs): on the CPU the interpreter runs only the
# small shapes. The one reason a test may skip on the CPU machine: scripts/check_skips.py fails CI
# on any other (a missing SmolLM2 or Triton, kernels imported without the interpreter).
CUDA_ONLY_REASON = "GPU-only test: needs a CUDA device"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_ONLY_REASON)


def skip_unless_kernels_run_here(kernel) -> None:
    """Skip the calling test module when ``kernel`` was compiled for a GPU (its module was imported
    by another test before TRITON_INTERPRET=1 was set) and no GPU is present."""
    if not torch.cuda.is_available() and type(kernel).__name__ != "InterpretedFunction":
        pytest.skip("Triton kernels were imported without TRITON_INTERPRET=1 and no GPU is present",
                    allow_module_level=True)


# A test module that shares compiled models across its tests imports these two fixtures: they
# replace conftest's dynamo reset before every test with one reset around the module.
@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Replaces conftest's reset before every test: the shared model stays compiled across tests."""
    yield


@pytest.fixture(scope="module", autouse=True)
def _dynamo_reset_for_the_module():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
