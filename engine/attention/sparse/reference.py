"""Plain-PyTorch references for sparse attention: masks for the three head patterns and a float64 masked softmax.

Shapes: one sequence, q [Hq, n, d], k and v [Hkv, n, d] (after RoPE); grouped-query attention maps query head h
to KV head h // (Hq // Hkv) instead of copying K/V. Masks are [n, n] booleans (query row, key column), True where
the key is visible; every mask here is causal.
"""

from __future__ import annotations

import torch


def causal_mask(n: int, device: torch.device | None = None) -> torch.Tensor:
    i = torch.arange(n, device=device)
    return i[None, :] <= i[:, None]


def a_shape_mask(n: int, n_init: int, n_local: int, device: torch.device | None = None) -> torch.Tensor:
    """Sinks and a local window: key j visible to query i if j <= i and (j < n_init or i - j < n_local)."""
    i = torch.arange(n, device=device)
    j = i[None, :]
    return causal_mask(n, device) & ((j < n_init) | (i[:, None] - j < n_local))


def vertical_slash_mask(n: int, columns: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Key j visible to query i if j <= i and (j is a kept column or i - j is a kept diagonal offset)."""
    device = columns.device
    i = torch.arange(n, device=device)
    col = torch.zeros(n, dtype=torch.bool, device=device)
    col[columns[(columns >= 0) & (columns < n)]] = True
    diag = torch.zeros(n, dtype=torch.bool, device=device)
    diag[offsets[(offsets >= 0) & (offsets < n)]] = True
    delta = (i[:, None] - i[None, :]).clamp(min=0)
    return causal_mask(n, device) & (col[None, :] | diag[delta])


def block_sparse_mask(n: int, kept: list[torch.Tensor], block: int) -> torch.Tensor:
    """kept[b]: key-block indices visible to query block b (causal within the diagonal block)."""
    device = kept[0].device if kept else None
    mask = torch.zeros((n, n), dtype=torch.bool, device=device)
    for b, blocks in enumerate(kept):
        rows = slice(b * block, min(n, (b + 1) * block))
        for kb in blocks.tolist():
            mask[rows, kb * block : min(n, (kb + 1) * block)] = True
    return mask & causal_mask(n, device)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention in float64 over `mask` ([n, n] shared by all heads, or [Hq, n, n]); returns q's dtype."""
    hq, _, d = q.shape
    group = hq // k.shape[0]
    kk = k.double().repeat_interleave(group, dim=0)
    vv = v.double().repeat_interleave(group, dim=0)
    scores = q.double() @ kk.transpose(1, 2) / d**0.5
    scores = scores.masked_fill(~(mask if mask.dim() == 3 else mask[None]), float("-inf"))
    return (scores.softmax(dim=-1) @ vv).to(q.dtype)


def attention_recall(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over heads and rows of the dense (causal) attention mass that `mask` keeps."""
    hq, n, d = q.shape
    kk = k.double().repeat_interleave(hq // k.shape[0], dim=0)
    scores = (q.double() @ kk.transpose(1, 2) / d**0.5).masked_fill(~causal_mask(n, q.device)[None], float("-inf"))
    probs = scores.softmax(dim=-1)
    kept = (probs * (mask if mask.dim() == 3 else mask[None])).sum(dim=-1)
    return float(kept.mean())
