"""Warm-up decode steps take the Python branches a CUDA-graph capture will take (CPU-checkable part)."""
import threading
from types import SimpleNamespace

import torch
from transformers.masking_utils import is_tracing

from shadowkv_fx.cuda_graph import WARM_STEPS, run_decode_step


def test_warm_up_steps_see_transformers_capture_check_true_on_their_thread_only():
    cache = SimpleNamespace(decode_graphs={})
    seen, other_thread = [], []

    def step(input_ids, position_ids):
        seen.append(is_tracing())
        probe = threading.Thread(target=lambda: other_thread.append(is_tracing()))
        probe.start()
        probe.join()
        return input_ids

    ids = torch.zeros(2, 1, dtype=torch.long)
    for _ in range(WARM_STEPS):
        run_decode_step(cache, step, ids, ids, key=("k",))
    # the capture sees is_tracing() True (the stream captures): its warm-up must have seen the same
    assert seen == [True] * WARM_STEPS
    assert other_thread == [False] * WARM_STEPS
    assert not is_tracing()  # outside a warm-up step, transformers' own answer
