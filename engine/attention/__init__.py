"""Attention beyond the model's dense path: MInference-style sparse prefill (see specs/sparse-prefill.md)."""
