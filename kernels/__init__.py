"""Kernels behind ``torch.ops.shadowkv``: plain-PyTorch references (any device) and Triton (CUDA)."""
