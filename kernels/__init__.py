"""Kernels behind ``torch.ops.shadowkv``, importable without Triton.

- ``triton_*.py``: one file per Triton kernel family, in reading order: ``@triton.jit`` kernel ->
  launcher (``launch_*``: tiles, grid, launch) -> public function (argument checks, docstring).
- ``naive.py``: each public function's plain-PyTorch twin, under the same name: the ground truth
  the kernels are tested against, and the CPU path.
- ``dispatch.py``: picks Triton or the twin per call; what the cache calls at decode.
- ``compression.py`` (prefill: low-rank keys, chunk landmarks), ``quantize.py`` (int8 values and
  landmarks with per-chunk scales), ``value_reuse.py`` (slots of
  reused value chunks), ``grouped_attention.py`` (CPU decode attention), ``rope_forms.py``
  (the RoPE forms the fused kernels apply): torch code with no Triton twin.
"""
