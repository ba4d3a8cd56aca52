"""Attention of a prefill chunk after earlier keys (bottom-right causal: query i of n sits at key position L - n + i),
on any device, without a materialized mask where the backend can do without one.

CPU: `cpu.bottom_right_causal_attention` (the prefix unmasked, the last n keys causal, merged by log-sum-exp).
CUDA: SDPA with `causal_lower_right`, which PyTorch runs in the flash kernel (its causal mode is bottom-right
aligned) with grouped-query heads native; an explicit boolean mask instead sends SDPA to the memory-efficient
kernel, which reads the mask and skips nothing above the diagonal. Where flash cannot take the heads as they are
(an older PyTorch), K/V are repeated per query head once and that choice is kept.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .cpu import bottom_right_causal_attention

log = logging.getLogger(__name__)
_GQA = {"native": True}  # flips to False once a grouped call is refused
_sdpa = F.scaled_dot_product_attention


def bottom_right_causal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, fused_cpu: bool | None = None
) -> torch.Tensor:
    """q [B, Hq, n, D], k/v [B, Hkv, L, D] (L >= n, Hq a multiple of Hkv) -> [B, Hq, n, D]. fused_cpu: the CPU
    split (default: on CPU tensors); False runs SDPA's lower-right path wherever the tensors are."""
    n, length = q.shape[2], k.shape[2]
    if length < n:
        raise ValueError(f"{length} keys cannot end with {n} queries")
    if n == length:  # top-left and bottom-right agree
        return _sdpa(q, k, v, is_causal=True, enable_gqa=True)
    if q.device.type == "cpu" if fused_cpu is None else fused_cpu:
        return bottom_right_causal_attention(q, k, v)
    # imported here: torch.nn.attention.bias imports torch._dynamo, ~1 s of every engine start otherwise
    from torch.nn.attention.bias import causal_lower_right

    mask = causal_lower_right(n, length)
    group = q.shape[1] // k.shape[1]
    if group > 1 and _GQA["native"]:
        try:
            return _sdpa(q, k, v, attn_mask=mask, enable_gqa=True)
        except RuntimeError as exc:  # this PyTorch's lower-right dispatch does not take grouped heads
            _GQA["native"] = False
            log.info("chunk attention: K/V repeated per query head (grouped heads refused: %s)", exc)
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return _sdpa(q, k, v, attn_mask=mask)
