"""Sparse-attention prefill: plain-PyTorch references, estimators, device-built indices, Triton kernels (the CUDA
path, gpu.py) and the CPU path (prefill.py)."""
