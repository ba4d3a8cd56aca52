"""Causal attention for queries at the end of a longer key sequence, on CPU, without a materialized mask.

A prefill chunk after a cached prefix (or a sparse tile after its gathered keys) has n queries that are the last n
positions of L keys: a bottom-right aligned causal mask. torch's CPU flash kernel only skips masked blocks for
its own top-left causal mode; with an explicit mask (or `causal_lower_right`, which materializes one on CPU) it
computes and then masks every (query, key) pair. So the keys are split: the first L - n every query sees in full
(no mask; grouped query heads ride along as extra rows of their KV head), the last n form a square causal block
(top-left = bottom-right there), and the two partial softmaxes merge through their log-sum-exps. Same result, and
only the visible pairs are computed: ~25% less time for a 2K chunk at the end of 7K keys.
"""

from __future__ import annotations

import torch

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def bottom_right_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    prefix_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, Hq, n, D], k/v [B, Hkv, L, D] with L >= n and Hq a multiple of Hkv -> [B, Hq, n, D]. Query i sits at
    key position L - n + i and sees keys 0 .. L - n + i.

    prefix_mask: optional additive mask [B, 1, 1, L - n] over the keys every query sees (e.g. a large negative
    value on padding keys); broadcast over heads and rows, it costs the fused kernel next to nothing. Keep it
    finite: a row whose prefix is all padding then gets a negligible weight from it instead of NaN."""
    b, hq, n, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    group = hq // hkv
    if length < n:
        raise ValueError(f"{length} keys cannot end with {n} queries")
    kd, vd = k[:, :, length - n :], v[:, :, length - n :]
    if group > 1:
        kd = kd.repeat_interleave(group, dim=1)
        vd = vd.repeat_interleave(group, dim=1)
    out, lse = _flash(q, kd, vd, 0.0, is_causal=True, scale=scale)
    if length == n:
        return out
    rows = q.reshape(b, hkv, group * n, d)  # the prefix has no mask: a group's heads are just more rows
    out_p, lse_p = _flash(rows, k[:, :, : length - n], v[:, :, : length - n], 0.0, attn_mask=prefix_mask, scale=scale)
    out_p, lse_p = out_p.reshape(b, hq, n, d), lse_p.reshape(b, hq, n)
    top = torch.maximum(lse, lse_p)
    w, w_p = (lse - top).exp().unsqueeze(-1), (lse_p - top).exp().unsqueeze(-1)
    return ((out * w + out_p * w_p) / (w + w_p)).to(q.dtype)
