"""Issue #23: the prefill's key bases (the eigh or SVD a layer and row, which reads a status back from the
device) are factored by a worker thread on a side stream (``key_basis.py``); the forward's end joins them."""
import pytest
import torch

import shadowkv_fx
from shadowkv_fx import key_basis
from shadowkv_fx.cache import ShadowKVCache
from shadowkv_fx.kernels import compression
from tests.models import left_padded, tiny_pair
from tests.test_prefill_syncs import SMALL, prefill_logging_ops

FACTOR_OPS = {"_linalg_eigh", "linalg_eigh", "_linalg_svd", "linalg_svd"}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def optimized(device: str):
    _, m = tiny_pair("llama", seed=3, layers=3)
    return shadowkv_fx.optimize(m.to(device), SMALL)


def prefill(model, device: str, lengths=(90, 61)) -> ShadowKVCache:
    ids, mask = left_padded(len(lengths), list(lengths), 96, seed=3)
    cache = model._shadowkv.new_cache(8)
    with torch.no_grad():
        model(ids.to(device), attention_mask=mask.to(device), cache=cache)
    return cache


def bases(cache: ShadowKVCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's rebuilt pre-RoPE keys ``U @ SV`` (an eigenvector's sign is free: U and SV alone may differ)
    and fit errors, on the CPU."""
    return [(torch.einsum("btr,bhrd->bhtd", s.u.float(), s.sv.float()).cpu(), s.fit_err.cpu())
            for s in (layer.state for layer in cache.layers)]


@pytest.fixture
def threaded(monkeypatch):
    monkeypatch.setitem(key_basis.ON_WORKER, "cpu", True)


@pytest.mark.parametrize("prefill_rows", [None, 1], ids=["one_group", "a_group_a_row"])
def test_no_layer_of_a_prefill_factors_its_keys_on_the_prefills_thread(threaded, monkeypatch, prefill_rows):
    model = optimized("cpu")
    cache, seen = prefill_logging_ops(model, [90, 61], monkeypatch, prefill_rows)
    assert seen, "the attention op ran"
    assert not FACTOR_OPS & set(seen), sorted(FACTOR_OPS & set(seen))
    assert all(layer.state.bases == key_basis.PendingBases() for layer in cache.layers), "end_step joined every job"
    assert all(float(layer.state.u.abs().sum()) > 0 for layer in cache.layers), "the jobs wrote U"


@pytest.mark.parametrize("device", DEVICES)
def test_bases_from_the_worker_equal_those_factored_in_line(monkeypatch, device):
    """The same rebuilt keys, fit errors and generated tokens whichever thread (and stream) factors them; on a
    GPU (always the worker) against the CPU's in-line factoring."""
    def run(device):
        model = optimized(device)
        ids, mask = (t.to(device) for t in left_padded(2, [90, 61], 96, seed=3))
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        return bases(prefill(model, device)), out.cpu()

    monkeypatch.setitem(key_basis.ON_WORKER, "cpu", device == "cpu")
    threaded_run = run(device)
    monkeypatch.setitem(key_basis.ON_WORKER, "cpu", False)
    inline_run = run("cpu")
    tol = 1e-5 if device == "cpu" else 1e-4
    for (keys, err), (keys0, err0) in zip(threaded_run[0], inline_run[0], strict=True):
        torch.testing.assert_close(keys, keys0, atol=tol, rtol=tol)
        torch.testing.assert_close(err, err0, atol=tol, rtol=tol)
    assert torch.equal(threaded_run[1], inline_run[1])


def test_a_failed_factorisation_fails_the_forward_that_queued_it(threaded, monkeypatch):
    model = optimized("cpu")

    def broken(flat, hkv, rank):
        raise torch.linalg.LinAlgError("eigh did not converge (planted)")

    monkeypatch.setattr(compression, "factor_keys", broken)
    with pytest.raises(torch.linalg.LinAlgError, match="planted"):
        prefill(model, "cpu")


def test_the_worker_takes_the_callers_inference_mode(threaded):
    """Slots made under ``torch.inference_mode`` are inference tensors: writing them outside that mode would fail."""
    model = optimized("cpu")
    ids, mask = left_padded(2, [90, 61], 96, seed=3)
    with torch.inference_mode():
        cache = model._shadowkv.new_cache(8)
        model(ids, attention_mask=mask, cache=cache)
    assert all(float(layer.state.u.abs().sum()) > 0 for layer in cache.layers)


def test_no_more_than_in_flight_jobs_hold_their_keys_at_once(threaded, monkeypatch):
    """A worker that falls behind makes the prefill wait, so the keys' copies never pile up past IN_FLIGHT."""
    import threading
    import time

    counts = {"submitted": 0, "ended": 0, "most": 0}
    lock = threading.Lock()
    plain_factor, plain_pool = compression.factor_keys, key_basis._pool

    def slow_factor(flat, hkv, rank):
        time.sleep(0.05)
        with lock:
            counts["ended"] += 1
        return plain_factor(flat, hkv, rank)

    class Counting:
        def submit(self, *args):
            with lock:
                counts["submitted"] += 1
                counts["most"] = max(counts["most"], counts["submitted"] - counts["ended"])
            return plain_pool().submit(*args)

    monkeypatch.setattr(compression, "factor_keys", slow_factor)
    monkeypatch.setattr(key_basis, "_pool", lambda: Counting())
    cache = prefill(optimized("cpu"), "cpu")
    assert counts["submitted"] == 6, counts  # 3 layers x 2 rows
    assert counts["most"] <= key_basis.IN_FLIGHT, counts
    assert all(float(layer.state.u.abs().sum()) > 0 for layer in cache.layers)
