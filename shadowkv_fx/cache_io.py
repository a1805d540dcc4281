"""A prefilled ``ShadowKVCache`` saved to a folder and loaded back (issue #31), in safetensors and
JSON only: loading runs no pickle, so a cache from elsewhere cannot run code.

``folder/``:

- ``shadowkv_cache.json``: the format, the ``ShadowKVConfig``, the identity of the model that
  prefilled it (``model_identity``), the versions that wrote it, the cache's host fields and each
  layer's (counts, prompt lengths, flags);
- ``state.safetensors``: every tensor kept on the model's device (values kept in spare HBM too)
  and the RoPE tables;
- ``values.safetensors``: the values offloaded to host memory. On CUDA they are read from the file
  straight into page-locked memory (``pinned.pinned_zeros``), never through a pageable copy.

A cache is only meaningful to the model that computed its keys: loading it for another model (other
shape, dtype or weights) is refused before any tensor is read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import weakref
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

from shadowkv_fx.config import ShadowKVConfig
from shadowkv_fx.pinned import pinned_zeros
from shadowkv_fx.prompt_layout import PromptLayout

FORMAT, FORMAT_VERSION = "shadowkv-cache", 1
META, STATE, VALUES = "shadowkv_cache.json", "state.safetensors", "values.safetensors"
# the fields of a model's config that shape its keys and values (those it has)
SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "rope_parameters",
                "rope_scaling", "partial_rotary_factor", "sliding_window", "attention_bias")
# a ShadowKVCache's host fields that a loaded cache takes back (prefill-only ones are left as new)
CACHE_FIELDS = ("seq_length", "phase", "realigned", "tail_capacity", "prefill_chunk_size", "prefill_rows",
                "device_value_bytes", "value_room", "warn_short_prompts")
SAMPLE = 4096  # elements of each weight the fingerprint reads, spread over all of it
_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
           "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
           "F64": torch.float64}


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter's (and the rotary ``inv_freq``'s) name, dtype, shape and ``SAMPLE``
    elements strided over it: any checkpoint or fine-tune (a merged LoRA moves every element of its
    matrices) that would give other keys gives another fingerprint, at the cost of a few KiB read
    per weight. Other buffers are left out: transformers versions add and drop some."""
    digest = hashlib.sha256()
    rotary = [(name, b) for name, b in model.named_buffers() if name.split(".")[-1] == "inv_freq"]
    named = sorted([*model.named_parameters(), *rotary], key=lambda item: item[0])
    for name, t in named:
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // SAMPLE)][:SAMPLE].contiguous().cpu()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_identity(model: torch.nn.Module) -> dict:
    """What a saved cache records of the model that prefilled it: the config fields that shape
    its keys (``SHAPE_FIELDS``), its dtype and its weights' fingerprint."""
    config = model.config.to_dict()
    shape = json.loads(json.dumps({k: config[k] for k in SHAPE_FIELDS if k in config}))
    dtype = str(next(model.parameters()).dtype)
    return {"config": shape, "dtype": dtype, "fingerprint": weights_fingerprint(model)}


def check_model(saved: dict, model: torch.nn.Module) -> None:
    """Refuse ``model`` unless it is the one a cache was saved from (``saved``: its
    ``model_identity``), naming what differs. Config fields only one side has are another
    transformers version's spelling, not another model: the fingerprint still tells."""
    mine = model_identity(model)
    fields = sorted(set(saved["config"]) & set(mine["config"]))
    differ = [f"{k} is {saved['config'].get(k)!r} in the cache's model, {mine['config'].get(k)!r} in this one"
              for k in fields if saved["config"].get(k) != mine["config"].get(k)]
    if saved["dtype"] != mine["dtype"]:
        differ.append(f"dtype is {saved['dtype']} in the cache's model, {mine['dtype']} in this one")
    if not differ and saved["fingerprint"] != mine["fingerprint"]:
        differ.append(f"the weights differ (fingerprint {saved['fingerprint'][:12]} in the cache's model, "
                      f"{mine['fingerprint'][:12]} in this one): another checkpoint or fine-tune")
    if differ:
        raise ValueError("this ShadowKV cache was prefilled by another model: " + "; ".join(differ)
                         + ". Load it for the model that saved it, or prefill the document again with this one.")


class SavedCache:
    """``save_pretrained`` / ``from_pretrained`` of a ``ShadowKVCache`` (mixed into it)."""

    def save_pretrained(self, folder: str | os.PathLike, model: torch.nn.Module | None = None) -> None:
        """Write this prefilled cache to ``folder`` (made if missing): see the module doc.
        ``model``: the model that prefilled it (default: the optimized model whose forward did)."""
        save(self, folder, model)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, model: torch.nn.Module | None = None,
                        device: torch.device | str | None = None):
        """The cache ``save_pretrained`` wrote to ``folder``, on ``device`` (default: ``model``'s,
        else the device it was saved from where there is one, else the CPU). With ``model``, a
        model the cache does not fit is refused (ValueError) before anything is read; without, the
        first forward that uses the cache checks its model so."""
        return load(cls, folder, model, device)


def _host_value(name: str, value):
    """A layer's host field as JSON; anything else is a field this format does not know yet."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float)) for v in value):
        return list(value)
    raise TypeError(f"LayerState.{name} holds a {type(value).__name__}, which cache_io cannot save: teach "
                    "cache_io.save and cache_io.load that field")


def save(cache, folder: str | os.PathLike, model: torch.nn.Module | None = None) -> None:
    """``cache.save_pretrained(folder, model)``: see the module doc."""
    if cache.layout is None or any(layer.state.k_buf is None for layer in cache.layers):
        raise ValueError("save_pretrained needs a prefilled cache: run the model on the document with "
                         "past_key_values=cache first")
    if cache.crop_floor is not None:
        raise ValueError("save_pretrained cannot run inside a decode step; call it between steps")
    model = model if model is not None else (cache.source_model() if cache.source_model else None)
    if model is None:
        raise ValueError("save_pretrained does not know which model prefilled this cache (it is gone, or the cache "
                         "was not filled by an optimized model's forward): pass model=")
    sets = cache.rope_tables.sets
    state_tensors: dict[str, torch.Tensor] = {f"rope_tables.{s}.{j}": t for s, tables in enumerate(sets)
                                              for j, t in enumerate(tables)}
    value_tensors: dict[str, torch.Tensor] = {}
    layers = []
    for i, layer in enumerate(cache.layers):
        state = layer.state
        state.values_ready()
        host = {}
        for name, value in vars(state).items():
            if name in ("config", "bases"):  # bases: jobs in flight, none once values_ready returned
                continue
            if name == "rope_tables":
                host[name] = next((s for s, tables in enumerate(sets) if tables is value), None)
            elif isinstance(value, torch.Tensor):
                offloaded = name == "v_chunks" and value.device.type == "cpu"
                (value_tensors if offloaded else state_tensors)[f"layers.{i}.{name}"] = value
            else:
                host[name] = _host_value(name, value)
        layers.append(host)
    device = cache.layers[0].state.k_buf.device
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "config": cache.config.to_dict(),
        "model": model_identity(model), "device": device.type,
        "versions": {"shadowkv_fx": _version("shadowkv-fx"), "transformers": transformers.__version__,
                     "torch": torch.__version__},
        "cache": {"layout": dataclasses.asdict(cache.layout), **{k: getattr(cache, k) for k in CACHE_FIELDS},
                  "num_layers": len(cache.layers)},
        "layers": layers,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, tensors in ((STATE, state_tensors), (VALUES, value_tensors)):
        save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, str(folder / name),
                  metadata={"format": "pt"})
    (folder / META).write_text(json.dumps(meta, indent=1))


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def read_meta(folder: str | os.PathLike) -> dict:
    """The JSON of a saved cache, its format checked."""
    path = Path(folder) / META
    if not path.is_file():
        raise ValueError(f"{folder} holds no saved ShadowKV cache ({META} is missing): save one with "
                         "cache.save_pretrained(folder)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or not isinstance(meta.get("format_version"), int):
        raise ValueError(f"{path} is not a ShadowKV cache's metadata")
    if meta["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{folder} was saved in cache format {meta['format_version']} by shadowkv-fx "
                         f"{meta['versions'].get('shadowkv_fx')}; this one reads up to {FORMAT_VERSION}: "
                         "upgrade shadowkv-fx")
    return meta


def _read_values(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, read from the file straight into the memory it will
    live in: page-locked host memory for a CUDA cache, plain memory otherwise."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            shape, dtype = tuple(info["shape"]), _DTYPES[info["dtype"]]
            t = pinned_zeros(shape, dtype) if device.type == "cuda" else torch.empty(shape, dtype=dtype)
            start, end = info["data_offsets"]
            f.seek(8 + size + start)
            view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            done = 0
            while done < end - start:
                n = f.readinto(view[done:])
                if not n:
                    raise ValueError(f"{path} is truncated: {name} ends past the file")
                done += n
            out[name] = t
    return out


def load(cls, folder: str | os.PathLike, model: torch.nn.Module | None = None,
         device: torch.device | str | None = None):
    """``ShadowKVCache.from_pretrained``: see ``SavedCache.from_pretrained``."""
    meta = read_meta(folder)
    if model is not None:
        check_model(meta["model"], model)
    if device is None:
        saved = meta["device"]
        device = (next(model.parameters()).device if model is not None
                  else saved if saved == "cpu" or getattr(torch, saved).is_available() else "cpu")
    device = torch.device(device)
    folder = Path(folder)
    config = ShadowKVConfig.from_options(meta["config"])
    fields = meta["cache"]
    cache = cls(fields["num_layers"], config, tail_capacity=fields["tail_capacity"],
                prefill_chunk_size=fields["prefill_chunk_size"])
    tensors = load_file(str(folder / STATE), device=str(device))
    tensors.update(_read_values(folder / VALUES, device))
    sets = []
    tables = sorted(tuple(map(int, k.split(".")[1:])) for k in tensors if k.startswith("rope_tables."))
    for s, j in tables:
        sets.extend([] for _ in range(s + 1 - len(sets)))
        sets[s].append(tensors[f"rope_tables.{s}.{j}"])
    of_layer: dict[int, int] = {}
    for i, (layer, host) in enumerate(zip(cache.layers, meta["layers"])):
        prefix = f"layers.{i}."
        saved = {**host, **{key[len(prefix):]: t for key, t in tensors.items() if key.startswith(prefix)}}
        unknown = sorted(set(saved) - set(vars(layer.state)))
        if unknown:
            raise ValueError(f"{folder}: layer {i} has fields {unknown} that LayerState does not declare: "
                             "saved by another version of shadowkv-fx")
        rope = saved.pop("rope_tables")
        layer.state.adopt({**saved, "rope_tables": [] if rope is None else sets[rope]})
        if rope is not None:
            of_layer[i] = rope
    cache.rope_tables.restore(sets, of_layer)
    cache.layout = PromptLayout(**fields["layout"])
    for k in CACHE_FIELDS:
        setattr(cache, k, fields[k])
    cache.saved_model = None if model is not None else meta["model"]
    cache.source_model = None if model is None else weakref.ref(model)
    return cache

