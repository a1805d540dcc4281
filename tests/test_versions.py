"""The transformers range we declare is the range CI runs, and the installed version speaks to us."""
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers

import shadowkv_fx
from shadowkv_fx import compat
from tests.models import left_padded, tiny_pair

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_bounds_are_the_tested_versions():
    text = (ROOT / "pyproject.toml").read_text()
    low, high = re.search(r'"transformers>=([\d.]+),<=([\d.]+)"', text).groups()
    assert (low, high) == compat.TESTED_TRANSFORMERS
    assert compat.TESTED_TRANSFORMERS[0] in (ROOT / "scripts" / "test.sh").read_text() or "TESTED_TRANSFORMERS" in (
        ROOT / "scripts" / "test.sh").read_text()


def test_installed_version_is_in_the_tested_range():
    assert not compat.warn_if_untested(), f"transformers {transformers.__version__} is outside {compat.TESTED_TRANSFORMERS}"


def test_outside_the_range_optimize_warns_once(monkeypatch):
    # models first, then the module as sys.modules holds it now: an import on the way (transformers
    # 5.24's lazy modules) can put a new ``transformers`` object there, which compat then reads
    first, second = tiny_pair("llama")[1], tiny_pair("llama")[1]
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "9.0.0")
    compat.warn_if_untested.cache_clear()
    config = shadowkv_fx.ShadowKVConfig(rank=8)
    try:
        with pytest.warns(UserWarning, match=r"tested with transformers 5\.17\.0 to 5\.24\.0"):
            shadowkv_fx.optimize(first, config, validate=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            shadowkv_fx.optimize(second, config, validate=False)
    finally:
        compat.warn_if_untested.cache_clear()


def test_generate_accepts_either_cache_name_and_warns_about_nothing():
    """Our own calls use the installed version's spelling: no deprecation warning caused by us."""
    dense, model = tiny_pair("llama")
    config = shadowkv_fx.ShadowKVConfig(sparse_budget=8, rank=8, chunk_size=4, local_chunks=1, outlier_chunks=1)
    shadowkv_fx.optimize(model, config)
    ids, mask = left_padded(2, [30, 22], 96)
    args = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        plain = model.generate(ids, **args)
    deprecations = [str(w.message) for w in caught if "deprecat" in str(w.message).lower()]
    assert not deprecations, deprecations
    for name in compat.CACHE_ARGS:
        cache = shadowkv_fx.ShadowKVCache(model.config.num_hidden_layers, config)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' own note on the old name, not ours
            out = model.generate(ids, **args, **{name: cache})
        assert compat.output_cache(out) is cache
        assert torch.equal(out.sequences, plain.sequences)
