"""Sparse-attention prefill: plain-PyTorch references, estimators and index building (Triton kernels to come)."""
