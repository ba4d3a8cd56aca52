"""Triton kernel for vertical-slash sparse attention (prefill), consuming `VerticalSlashIndex` tensors.

One program per (query block of BLOCK_M rows, query head). Loop 1 walks the block's key ranges in BLOCK_N tiles
with a causal mask; loop 2 gathers the block's kept columns (all left of the block, so no causal mask) in
BLOCK_N groups; both feed one FlashAttention-style online softmax in fp32. The plain-PyTorch reference is
`reference.masked_attention` over `VerticalSlashIndex.mask`; tests compare the two under TRITON_INTERPRET=1.
Set TRITON_INTERPRET before this module is imported to run on CPU tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .index import VerticalSlashIndex


@dataclass
class PackedIndex:
    """Per-head indices padded into tensors: [H, blocks] counts and [H, blocks, max] starts/ends/columns."""

    range_count: torch.Tensor
    range_start: torch.Tensor
    range_end: torch.Tensor
    column_count: torch.Tensor
    columns: torch.Tensor


def pack_indices(indices: list[VerticalSlashIndex], device: torch.device) -> PackedIndex:
    heads, blocks = len(indices), len(indices[0].columns)
    max_r = max(1, max(len(s) for ix in indices for s in ix.range_starts))
    max_c = max(1, max(len(c) for ix in indices for c in ix.columns))
    rc = torch.zeros((heads, blocks), dtype=torch.int32)
    rs = torch.zeros((heads, blocks, max_r), dtype=torch.int32)
    re = torch.zeros((heads, blocks, max_r), dtype=torch.int32)
    cc = torch.zeros((heads, blocks), dtype=torch.int32)
    cols = torch.zeros((heads, blocks, max_c), dtype=torch.int32)
    for h, ix in enumerate(indices):
        for b in range(blocks):
            r = len(ix.range_starts[b])
            rc[h, b] = r
            rs[h, b, :r] = ix.range_starts[b]
            re[h, b, :r] = ix.range_ends[b]
            c = len(ix.columns[b])
            cc[h, b] = c
            cols[h, b, :c] = ix.columns[b]
    return PackedIndex(*(t.to(device) for t in (rc, rs, re, cc, cols)))


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc):  # type: ignore[no-untyped-def]  # Triton tensors
    """Folds one tile of scores `s` (masked entries -inf) and values `v` into the running max, sum and output."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays all-zero
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)


@triton.jit
def _vertical_slash_kernel(  # type: ignore[no-untyped-def]  # pointers and constexprs, typed by Triton
    Q, K, V, Out,
    range_count, range_start, range_end, column_count, columns,
    n, group, scale,
    stride_qh, stride_qn, stride_kh, stride_kn, stride_oh, stride_on,
    max_r, max_c, num_blocks,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // group
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < n
    q = tl.load(Q + head * stride_qh + rows[:, None] * stride_qn + dims[None, :], mask=row_ok[:, None], other=0.0)
    q = (q.to(tl.float32) * scale).to(q.dtype)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    meta = head * num_blocks + block
    k_base = K + kv_head * stride_kh
    v_base = V + kv_head * stride_kh

    n_ranges = tl.load(range_count + meta)
    for r in range(0, n_ranges):
        start = tl.load(range_start + meta * max_r + r)
        end = tl.load(range_end + meta * max_r + r)
        for tile in range(start, end, BLOCK_N):
            keys = tile + tl.arange(0, BLOCK_N)
            key_ok = keys < end
            k = tl.load(k_base + keys[:, None] * stride_kn + dims[None, :], mask=key_ok[:, None], other=0.0)
            v = tl.load(v_base + keys[:, None] * stride_kn + dims[None, :], mask=key_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k))
            visible = key_ok[None, :] & (keys[None, :] <= rows[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc)

    n_cols = tl.load(column_count + meta)
    for c in range(0, n_cols, BLOCK_N):
        offs = c + tl.arange(0, BLOCK_N)
        col_ok = offs < n_cols
        keys = tl.load(columns + meta * max_c + offs, mask=col_ok, other=0)
        k = tl.load(k_base + keys[:, None] * stride_kn + dims[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + keys[:, None] * stride_kn + dims[None, :], mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k))
        s = tl.where(col_ok[None, :], s, float("-inf"))  # columns lie left of the block: no causal mask
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        Out + head * stride_oh + rows[:, None] * stride_on + dims[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None],
    )


def vertical_slash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: PackedIndex, block_m: int = 64, block_n: int = 64
) -> torch.Tensor:
    """q [Hq, n, d], k/v [Hkv, n, d] (contiguous); index from `pack_indices` built with block=block_m."""
    hq, n, d = q.shape
    out = torch.empty_like(q)
    num_blocks = -(-n // block_m)
    grid = (num_blocks, hq)
    _vertical_slash_kernel[grid](
        q, k, v, out,
        index.range_count, index.range_start, index.range_end, index.column_count, index.columns,
        n, hq // k.shape[0], 1.0 / d**0.5,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1),
        index.range_start.shape[-1], index.columns.shape[-1], num_blocks,
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n,
    )  # fmt: skip
    return out
