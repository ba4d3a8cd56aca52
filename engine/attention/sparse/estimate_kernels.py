"""Vertical and slash scores (MInference's estimate, `estimate.vertical_slash_scores`) in two Triton passes, without
the [H, m, L] float32 softmax the torch version materializes.

The estimate looks at the chunk's last m queries (positions L - m .. L - 1) against all L keys: its causal softmax
(float32) summed per key column (vertical scores) and per diagonal offset o = position - key (slash scores). In
torch that is a [H, m, L] float32 tensor written and read several times per chunk (1 GB at 128K keys on 32 heads;
on an H200 a 4K chunk's plan spent ~5.5 ms of GPU time, most of it there, each chunk again). Here:

- pass 1: per (head, split of the keys) each row's running max and sum of exp2 over the split's key tiles;
  the splits' partials combine into each row's log-sum-exp (a few hundred floats, in torch);
- pass 2: per (head, split) each key tile's probabilities again, summed over the rows into the tile's vertical
  scores (stored: one program owns each key), and along the tile's diagonals into its slash scores: the tile is
  written skewed into the program's own scratch rows (row i shifted by i, so a diagonal is a column), read back
  and summed per column, and the tile's m + N - 1 diagonal sums added atomically (neighbouring tiles share
  diagonals).

Each pass reads every key once per head and writes O(L) floats per head; one launch each covers every head (a
query head reads its KV head's keys, no copies). Under TRITON_INTERPRET=1 (CPU tensors) the kernels run in the
interpreter (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_kernels import LOG2E, _dot

BLOCK_N = 64  # keys per tile
ROWS = 64  # the estimate's queries (estimate.LAST_Q rows at most), padded to this


@triton.jit
def _tile_scores(  # type: ignore[no-untyped-def]  # Triton tensors
    q, k_ptr, stride_k, j0, length, p0, m, scale,
    BLOCK_N: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """Scores (log2 domain) of the rows against keys j0 .. j0 + BLOCK_N - 1, -inf where not visible."""
    offs_n = j0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k = tl.load(k_ptr + offs_n[:, None].to(tl.int64) * stride_k + offs_d[None, :], mask=offs_n[:, None] < length,
                other=0.0)  # fmt: skip
    s = _dot(q, tl.trans(k), IEEE) * scale
    rows = tl.arange(0, ROWS)
    visible = (offs_n[None, :] <= p0 + rows[:, None]) & (rows[:, None] < m) & (offs_n[None, :] < length)
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _program(q_ptr, k_ptr, kv_ptr, stride_qh, stride_qm, m, D: tl.constexpr, ROWS: tl.constexpr):  # type: ignore[no-untyped-def]  # fmt: skip
    """This program's (head, key split), the row indices, the head's estimate queries [ROWS, D] (zeros past m) and
    its KV head's keys (k rows hold every KV head side by side)."""
    h = tl.program_id(0)
    rows = tl.arange(0, ROWS)
    q = tl.load(q_ptr + h * stride_qh + rows[:, None] * stride_qm + tl.arange(0, D)[None, :], mask=rows[:, None] < m,
                other=0.0)  # fmt: skip
    return h, tl.program_id(1), rows, q, k_ptr + tl.load(kv_ptr + h) * D


@triton.jit
def _row_stats_kernel(  # type: ignore[no-untyped-def]  # Triton tensors
    q_ptr, k_ptr, kv_ptr, stats_ptr, stride_qh, stride_qm, stride_k, length, m, scale, tiles_per_split, splits,
    BLOCK_N: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    h, split, rows, q, kh = _program(q_ptr, k_ptr, kv_ptr, stride_qh, stride_qm, m, D, ROWS)
    p0 = length - m
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    t0 = split * tiles_per_split
    for t in range(t0, t0 + tiles_per_split):
        s = _tile_scores(q, kh, stride_k, t * BLOCK_N, length, p0, m, scale, BLOCK_N, D, ROWS, IEEE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - safe) + tl.sum(tl.exp2(s - safe[:, None]), 1)
        m_i = m_new
    out = stats_ptr + (h * splits + split) * 2 * ROWS
    tl.store(out + rows, m_i)
    tl.store(out + ROWS + rows, l_i)


@triton.jit
def _scores_kernel(  # type: ignore[no-untyped-def]  # Triton tensors
    q_ptr, k_ptr, kv_ptr, lse_ptr, vertical_ptr, slash_ptr, scratch_ptr, stride_qh, stride_qm, stride_k, length, m,
    scale, tiles_per_split, splits,
    BLOCK_N: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    h, split, rows, q, kh = _program(q_ptr, k_ptr, kv_ptr, stride_qh, stride_qm, m, D, ROWS)
    p0 = length - m
    lse = tl.load(lse_ptr + h * ROWS + rows)
    scratch = scratch_ptr + (h * splits + split).to(tl.int64) * ROWS * WIDTH
    cols = tl.arange(0, WIDTH)
    jj = tl.arange(0, BLOCK_N)
    # row i of a tile goes to scratch columns i - jj + BLOCK_N - 1: diagonal (i - jj constant) -> one column
    skew = scratch + rows[:, None] * WIDTH + (rows[:, None] - jj[None, :] + BLOCK_N - 1)
    t0 = split * tiles_per_split
    for t in range(t0, t0 + tiles_per_split):
        j0 = t * BLOCK_N
        s = _tile_scores(q, kh, stride_k, j0, length, p0, m, scale, BLOCK_N, D, ROWS, IEEE)
        p = tl.exp2(s - lse[:, None])  # 0 where not visible (and on padding rows, whose lse is +inf)
        tl.store(vertical_ptr + h * length + j0 + jj, tl.sum(p, 0), mask=j0 + jj < length)
        tl.store(scratch + rows[:, None] * WIDTH + cols[None, :], tl.zeros([ROWS, WIDTH], tl.float32))
        tl.debug_barrier()
        tl.store(skew, p)
        tl.debug_barrier()
        diag = tl.sum(tl.load(scratch + rows[:, None] * WIDTH + cols[None, :]), 0)  # [WIDTH]
        tl.debug_barrier()  # the next tile's zeros wait for every thread's reads
        # column c holds offset o = p0 + i - (j0 + jj) = p0 - j0 + c - (BLOCK_N - 1)
        o = p0 - j0 + cols - (BLOCK_N - 1)
        hit = (o >= 0) & (o < length) & (cols < ROWS + BLOCK_N - 1) & (diag != 0.0)
        tl.atomic_add(slash_ptr + h * length + o, diag, mask=hit)


def _splits(heads: int, tiles: int) -> int:
    """Key splits per head: enough programs to fill a large GPU (~2 per SM of 132), at least 4 tiles each."""
    return max(1, min(-(-264 // max(heads, 1)), -(-tiles // 4)))


def vertical_slash_scores_triton(
    q_last: torch.Tensor, k: torch.Tensor, kv_heads: torch.Tensor | list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """As `estimate.vertical_slash_scores`: q_last [H, m, d] (m <= 64) are the queries at the last m positions of
    k's L keys; k is [L, d] (one KV head for all H heads) or [L, Hkv, d] with kv_heads[h] the KV head of q_last's
    head h. Returns (vertical, slash), float32 [H, L]."""
    if k.dim() == 2:
        k, kv_heads = k[:, None], [0] * q_last.shape[0]
    if kv_heads is None or len(kv_heads) != q_last.shape[0]:
        raise ValueError(f"{q_last.shape[0]} query heads need as many KV heads named, given {kv_heads!r}")
    h, m, d = q_last.shape
    length = k.shape[0]
    if m > ROWS or m > length or m == 0:
        raise ValueError(f"the estimate takes 1 to {ROWS} queries within the keys, given {m} of {length}")
    if d & (d - 1) or d < 16:
        raise ValueError(f"head size {d} is not a power of two of at least 16")
    if k.stride(-1) != 1 or k.stride(1) != d:
        k = k.contiguous()
    q_last = q_last.contiguous()
    tiles = -(-length // BLOCK_N)
    splits = _splits(h, tiles)
    per = -(-tiles // splits)
    splits = -(-tiles // per)
    dev = q_last.device
    ieee = q_last.dtype == torch.float32
    scale = d**-0.5 * LOG2E
    stats = torch.empty((h, splits, 2, ROWS), dtype=torch.float32, device=dev)
    kv = torch.as_tensor(kv_heads, dtype=torch.int32).to(dev)
    common = (length, m, scale, per, splits)
    _row_stats_kernel[(h, splits)](q_last, k, kv, stats, q_last.stride(0), q_last.stride(1), k.stride(0), *common,
                                   BLOCK_N=BLOCK_N, D=d, ROWS=ROWS, IEEE=ieee)  # fmt: skip
    mx, sm = stats[:, :, 0], stats[:, :, 1]
    top = mx.max(dim=1).values
    safe = torch.where(torch.isinf(top), 0.0, top)
    total = (sm * torch.exp2(mx - safe[:, None])).sum(dim=1)
    lse = (safe + torch.log2(total)).contiguous()  # [H, ROWS]; padding rows: -inf + ... -> nan; fixed below
    lse = torch.where(torch.arange(ROWS, device=dev)[None, :] < m, lse, float("inf"))
    vertical = torch.empty((h, length), dtype=torch.float32, device=dev)
    slash = torch.zeros((h, length), dtype=torch.float32, device=dev)
    width = triton.next_power_of_2(ROWS + BLOCK_N - 1)
    scratch = torch.empty((h * splits, ROWS, width), dtype=torch.float32, device=dev)
    _scores_kernel[(h, splits)](q_last, k, kv, lse, vertical, slash, scratch, q_last.stride(0), q_last.stride(1),
                                k.stride(0), *common, BLOCK_N=BLOCK_N, D=d, ROWS=ROWS, WIDTH=width,
                                IEEE=ieee, num_warps=4)  # fmt: skip
    return vertical, slash
