"""Triton kernels for sparse prefill attention, consuming the indices of `index.py`.

- `vertical_slash_attention`: one program per (query block of BLOCK_M rows, head). Loop 1 walks the block's key
  ranges (one per segment of kept diagonals, computed from the segment and the block's first row) in BLOCK_N
  tiles with a causal mask; loop 2 gathers the block's kept columns left of it that no range covers, BLOCK_N at a
  time. Both feed one FlashAttention-style online softmax in fp32 (exp2, with log2(e) folded into the query
  scale). A-shape runs here too: sinks are columns, the window is diagonals. `loop="flat"` runs loop 1 as a
  single loop over the head's list of key tiles (`index.TileTable`: the same tiles for every block, offset by its
  first row; the block skips those left of key 0), so loads can run ahead across ranges, where most segments
  are a loop of one or two tiles of their own (MInference's kernel walks a per-block list of tile starts).
  Range tiles are contiguous keys: loaded without masks from one scalar address (`_attend_range`), and only the
  tiles at a range's ends, at the causal diagonal or at key 0 apply the mask; interior ones skip it (a third
  fewer instructions per tile on sm_90, counted by `compile_check`).
- `block_sparse_attention`: one program per (query block, head), looping over its kept key blocks with a causal
  mask, then over the head's kept columns left of the block that no kept block holds (as loop 2 above).

Inputs keep the engine's packed layout (q [n, Hq, D], k/v [L, Hkv, D]; any strides with a unit last one); grouped
query heads read their KV head's keys (no copies). `heads` picks which query heads a launch covers (heads of
other patterns run in another launch), and the index's head h describes query head heads[h].

Launch configurations: fixed under the interpreter (TRITON_INTERPRET=1 on CPU tensors, where autotuning cannot
run), autotuned over BLOCK_N, warps and stages on a GPU (key: head size, query block, precision; the flat loop
over warps and stages, its tile width being the table's; `loop="auto"` over both loops' configurations at once, so
that the GPU it runs on picks the loop too: the engine's default); `tuned_configs()` reports the choices. float32
inputs multiply in full float32 (not Triton's default TF32), so a float32 engine on a GPU keeps float32 attention.
Set TRITON_INTERPRET before this module is imported to run on CPU tensors.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch
import triton
import triton.language as tl

from .index import BlockSparseIndex, VerticalSlashIndex

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634
log = logging.getLogger(__name__)
_auto_failed: list[str] = []  # why loop="auto" could not run here (then it runs the nested loop)


@triton.jit
def wide(x):  # type: ignore[no-untyped-def]  # Triton tensors
    """int64 copy of an index vector, so row and key offsets times strides cannot overflow 32 bits."""
    return x.to(tl.int64)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):  # type: ignore[no-untyped-def]  # Triton tensors
    """a @ b; float32 inputs in full float32 (IEEE) rather than Triton's default TF32 on a GPU."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, IEEE: tl.constexpr, LAZY: tl.constexpr):  # type: ignore[no-untyped-def]
    """Folds one tile of base-2 scores `s` (masked entries -inf) and values `v` into the running max, sum and
    output. LAZY (FlashAttention-4's conditional rescaling): the running max, and with it the output and sum, are
    rescaled only when some row's max grows by more than 8 (a factor of 256: weights stay at most 256 against a
    row's stale max, far inside float16's range); other tiles skip the rescale's multiply per output element, for
    a block-wide vote each tile (a shared-memory reduction across warps). The final division by the row sum
    cancels whichever max the row kept."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if LAZY:
        if tl.max(tl.where(m_new > m_i + 8.0, 1, 0), 0) > 0:  # a row's first keys too (m_i still -inf)
            alpha = tl.math.exp2(m_i - tl.where(m_new == float("-inf"), 0.0, m_new))
            acc = acc * alpha[:, None]
            l_i = l_i * alpha
            m_i = m_new
        p = tl.math.exp2(s - tl.where(m_i == float("-inf"), 0.0, m_i)[:, None])
        return m_i, l_i + tl.sum(p, 1), acc + _dot(p.to(v.dtype), v, IEEE)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays all-zero
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)


@triton.jit
def _load_queries(Q, local, row_ok, head, stride_qn, stride_qh, dims, scale):  # type: ignore[no-untyped-def]
    """The query block [BLOCK_M, D] of one head, pre-scaled (scale includes log2(e) for exp2)."""
    q = tl.load(
        Q + wide(local)[:, None] * stride_qn + head * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0
    )
    return (q.to(tl.float32) * scale).to(q.dtype)


@triton.jit
def _attend(  # type: ignore[no-untyped-def]  # Triton tensors
    q, k_base, v_base, keys, key_ok, visible, stride_kn, stride_vn, dims, m_i, l_i, acc,
    IEEE: tl.constexpr, LAZY: tl.constexpr,
):  # fmt: skip
    """Loads the keys `keys` (where key_ok) and folds the scores `visible` allows into the online softmax."""
    k = tl.load(k_base + wide(keys)[:, None] * stride_kn + dims[None, :], mask=key_ok[:, None], other=0.0)
    v = tl.load(v_base + wide(keys)[:, None] * stride_vn + dims[None, :], mask=key_ok[:, None], other=0.0)
    s = tl.where(visible, _dot(q, tl.trans(k), IEEE), float("-inf"))
    return _online_softmax_step(s, v, m_i, l_i, acc, IEEE, LAZY)


@triton.jit
def _attend_range(  # type: ignore[no-untyped-def]  # Triton tensors
    q, k_base, v_base, lo, end, kv_rows, s0, rows, stride_kn, stride_vn, dims, m_i, l_i, acc,
    BLOCK_N: tl.constexpr, IEEE: tl.constexpr, LAZY: tl.constexpr,
):  # fmt: skip
    """Folds the keys lo..end-1 (0 <= lo, at most BLOCK_N of them) into the online softmax, each for the rows at
    or right of it (the block's rows start at s0).

    The tile loaded is BLOCK_N keys from lo, moved left to end within the kv_rows keys stored (at least BLOCK_N:
    the launcher pads), so loads need no mask (the keys it holds beyond lo..end are real keys, masked out of the
    scores; their values get weight 0), and its address is one scalar product plus in-tile offsets that fit 32
    bits (the launcher checks), where a gather multiplies 64 bits per key. Scores need the mask only where the tile
    is not lo..lo+BLOCK_N-1 wholly left of or on the block's first row; it is one unsigned compare per score."""
    j = tl.arange(0, BLOCK_N)
    start = tl.minimum(lo, kv_rows - BLOCK_N)
    k = tl.load(k_base + tl.cast(start, tl.int64) * stride_kn + (j * stride_kn)[:, None] + dims[None, :])
    v = tl.load(v_base + tl.cast(start, tl.int64) * stride_vn + (j * stride_vn)[:, None] + dims[None, :])
    s = _dot(q, tl.trans(k), IEEE)
    if (end - lo < BLOCK_N) | (lo + BLOCK_N > s0 + 1) | (start != lo):
        seen = tl.maximum(tl.minimum(rows + 1, end) - lo, 0).to(tl.uint32)  # keys lo.. each row attends to
        s = tl.where((j - (lo - start)).to(tl.uint32, bitcast=True)[None, :] < seen[:, None], s, float("-inf"))
    return _online_softmax_step(s, v, m_i, l_i, acc, IEEE, LAZY)


@triton.jit
def _store_rows(Out, acc, l_i, local, row_ok, head, stride_on, stride_oh, dims):  # type: ignore[no-untyped-def]
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a row that saw no key stays zero
    tl.store(
        Out + wide(local)[:, None] * stride_on + head * stride_oh + dims[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None],
    )


# Sizes that change from chunk to chunk are not specialized on (divisible by 16, equal to 1): each new pattern of
# them would compile the kernel again in the middle of serving (5 programs over 8 chunk shapes, measured with
# `compile_check`); one program per configuration also lets `precompile` compile them all at start.
_SIZES_VS = ["n", "q_start", "group", "kv_rows", "max_seg", "max_tile", "max_col", "num_blocks", "cov_len"]
_SIZES_BS = ["n", "q_start", "group", "kv_rows", "max_blocks", "num_blocks", "max_col"]


@triton.jit(do_not_specialize=_SIZES_VS)
def _vertical_slash_kernel(  # type: ignore[no-untyped-def]  # pointers and constexprs, typed by Triton
    Q, K, V, Out, heads,
    seg_lo, seg_hi, seg_count, tile_start, tile_end, tile_count, tile_first, columns, col_count, col_first, covered,
    n, q_start, group, scale, kv_rows,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
    max_seg, max_tile, max_col, num_blocks, cov_len,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, FLAT: tl.constexpr,
    LAZY: tl.constexpr = False,
):  # fmt: skip
    """Ranges: without FLAT, each of the index's segments (seg_lo, seg_hi, seg_count) is its own loop over its key
    range; with FLAT, a TileTable's tiles (tile_start/end/count/first, built for BLOCK_N keys a tile) run in one
    loop (loads run ahead across ranges: most are one or two tiles). The other set is not read."""
    block = tl.program_id(0)
    h = tl.program_id(1)
    head = tl.load(heads + h).to(tl.int64)  # 64-bit offsets: at 1M tokens x 32 heads x 128 they pass 2^31
    kv_head = head // group
    length = q_start + n
    s0 = q_start + block * BLOCK_M  # the block's first row (absolute position)
    local = block * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = q_start + local
    dims = tl.arange(0, HEAD_DIM)
    row_ok = local < n
    q = _load_queries(Q, local, row_ok, head, stride_qn, stride_qh, dims, scale)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_base = K + kv_head * stride_kh
    v_base = V + kv_head * stride_vh

    if FLAT:
        first = tl.load(tile_first + h * num_blocks + block)
        for i in range(first, tl.load(tile_count + h)):
            start = s0 + tl.load(tile_start + h * max_tile + i)
            end = tl.minimum(tl.minimum(s0 + tl.load(tile_end + h * max_tile + i), start + BLOCK_N), length)
            m_i, l_i, acc = _attend_range(
                q, k_base, v_base, tl.maximum(start, 0), end, kv_rows, s0, rows, stride_kn, stride_vn, dims,
                m_i, l_i, acc, BLOCK_N, IEEE, LAZY,
            )  # fmt: skip
    else:
        n_seg = tl.load(seg_count + h)
        for r in range(0, n_seg):
            lo = tl.load(seg_lo + h * max_seg + r)
            hi = tl.load(seg_hi + h * max_seg + r)
            start = tl.maximum(s0 - hi, 0)
            end = tl.minimum(s0 + BLOCK_M - lo, length)
            for tile in range(start, end, BLOCK_N):
                m_i, l_i, acc = _attend_range(
                    q, k_base, v_base, tile, tl.minimum(end, tile + BLOCK_N), kv_rows, s0, rows, stride_kn,
                    stride_vn, dims, m_i, l_i, acc, BLOCK_N, IEEE, LAZY,
                )  # fmt: skip

    n_cols = tl.load(col_count + h * num_blocks + block)
    c_first = tl.load(col_first + h * num_blocks + block)  # where the block's list starts (0: one list per head)
    for c in range(0, n_cols, BLOCK_N):
        offs = c + tl.arange(0, BLOCK_N)
        col_ok = offs < n_cols
        keys = tl.load(columns + h * max_col + c_first + offs, mask=col_ok, other=0)
        # a column some range of this block covers was attended to there already
        dist = tl.where(col_ok, s0 - keys, 0)
        col_ok = col_ok & (tl.load(covered + h * cov_len + dist, mask=col_ok, other=1) == 0)
        visible = col_ok[None, :]  # columns lie left of the block: no causal mask
        m_i, l_i, acc = _attend(
            q, k_base, v_base, keys, col_ok, visible, stride_kn, stride_vn, dims, m_i, l_i, acc, IEEE, LAZY
        )

    _store_rows(Out, acc, l_i, local, row_ok, head, stride_on, stride_oh, dims)


@triton.jit(do_not_specialize=_SIZES_BS)
def _block_sparse_kernel(  # type: ignore[no-untyped-def]  # pointers and constexprs, typed by Triton
    Q, K, V, Out, heads,
    blocks, count, columns, col_count, col_skip,
    n, q_start, group, scale, kv_rows,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
    max_blocks, num_blocks, max_col,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, KEY_BLOCK: tl.constexpr, IEEE: tl.constexpr,
    LAZY: tl.constexpr = False,
):  # fmt: skip
    block = tl.program_id(0)
    h = tl.program_id(1)
    head = tl.load(heads + h).to(tl.int64)  # 64-bit offsets: at 1M tokens x 32 heads x 128 they pass 2^31
    kv_head = head // group
    length = q_start + n
    s0 = q_start + block * BLOCK_M  # the block's first row (absolute position)
    local = block * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = q_start + local
    dims = tl.arange(0, HEAD_DIM)
    row_ok = local < n
    q = _load_queries(Q, local, row_ok, head, stride_qn, stride_qh, dims, scale)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_base = K + kv_head * stride_kh
    v_base = V + kv_head * stride_vh
    meta = h * num_blocks + block
    n_kept = tl.load(count + meta)
    for i in range(0, n_kept):
        start = tl.load(blocks + meta * max_blocks + i) * KEY_BLOCK
        end = tl.minimum(start + KEY_BLOCK, length)
        m_i, l_i, acc = _attend_range(
            q, k_base, v_base, start, end, kv_rows, s0, rows, stride_kn, stride_vn, dims, m_i, l_i, acc,
            KEY_BLOCK, IEEE, LAZY,
        )  # fmt: skip
    n_cols = tl.load(col_count + meta)
    for c in range(0, n_cols, KEY_BLOCK):
        offs = c + tl.arange(0, KEY_BLOCK)
        col_ok = offs < n_cols
        keys = tl.load(columns + h * max_col + offs, mask=col_ok, other=0)
        # a column inside one of the block's kept key blocks was attended to there already
        col_ok = col_ok & (tl.load(col_skip + meta * max_col + offs, mask=col_ok, other=1) == 0)
        visible = col_ok[None, :]  # columns lie left of the block: no causal mask
        m_i, l_i, acc = _attend(
            q, k_base, v_base, keys, col_ok, visible, stride_kn, stride_vn, dims, m_i, l_i, acc, IEEE, LAZY
        )
    _store_rows(Out, acc, l_i, local, row_ok, head, stride_on, stride_oh, dims)


# LAZY (conditional rescaling) for the configurations a GPU picked before (4 warps over 64-key tiles): 61 fewer
# SASS instructions of 438 per unmasked tile that keeps its max, for a block-wide vote (a barrier) every tile; what
# that trade is worth is timed, not predicted
_TUNE_VS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st) for bn in (64, 128) for w in (4, 8) for st in (2, 3)
] + [triton.Config({"BLOCK_N": 64, "LAZY": True}, num_warps=4, num_stages=st) for st in (2, 3)]
_TUNE_BS = [triton.Config({}, num_warps=w, num_stages=st) for w in (4, 8) for st in (2, 3, 4)] + [
    triton.Config({"LAZY": True}, num_warps=4, num_stages=st) for st in (2, 3)
]
AUTO_TILE_N = 64  # the tile table's width for loop="auto" (its flat configurations run tiles of this many keys)
# loop="auto": both loops among the candidates, so the first launch on a GPU times them and keeps the faster
_TUNE_AUTO = [triton.Config({**c.kwargs, "FLAT": False}, num_warps=c.num_warps, num_stages=c.num_stages)
              for c in _TUNE_VS] + [
    triton.Config({**c.kwargs, "BLOCK_N": AUTO_TILE_N, "FLAT": True}, num_warps=c.num_warps, num_stages=c.num_stages)
    for c in _TUNE_BS
]  # fmt: skip
_vertical_slash_tuned = triton.autotune(_TUNE_VS, key=["HEAD_DIM", "BLOCK_M", "IEEE"])(_vertical_slash_kernel)
# the flat loop's tile width is the tile table's (built for one width): warps and stages only
_vertical_slash_flat_tuned = triton.autotune(_TUNE_BS, key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "IEEE"])(
    _vertical_slash_kernel
)
_vertical_slash_auto = triton.autotune(_TUNE_AUTO, key=["HEAD_DIM", "BLOCK_M", "IEEE"])(_vertical_slash_kernel)
_block_sparse_tuned = triton.autotune(_TUNE_BS, key=["HEAD_DIM", "BLOCK_M", "IEEE"])(_block_sparse_kernel)


def tuned_configs() -> dict[str, str]:
    """The launch configurations autotuning chose so far (GPU), by kernel."""
    out = {}
    for name, kernel in (
        ("vertical_slash", _vertical_slash_tuned),
        ("vertical_slash_flat", _vertical_slash_flat_tuned),
        ("vertical_slash_auto", _vertical_slash_auto),
        ("block_sparse", _block_sparse_tuned),
    ):
        for key, config in getattr(kernel, "cache", {}).items():
            out[f"{name}{key}"] = str(config)
    return out


def _autotuned(q: torch.Tensor) -> bool:
    """Whether launches over q autotune (a GPU, not the interpreter)."""
    return not INTERPRET and q.is_cuda


WIDEST_TUNED_TILE = 128  # the widest key tile autotuning tries (BLOCK_N)


def _stored_keys(k: torch.Tensor, v: torch.Tensor, length: int, widest: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(k, v, rows) as the kernels read them: the range loops load whole tiles (up to `widest` keys) without masks,
    moving a tile left at the end of the keys, so at least `widest` rows must hold finite values (a prompt shorter
    than that has its keys copied into zeros of that many rows; rows stored past `length` are never read), and
    in-tile offsets (tile row x row stride) must fit 32 bits."""
    if k.shape[0] < length or v.shape[0] < length:
        raise ValueError(f"{length} keys and values needed, given {k.shape[0]} and {v.shape[0]}")
    if max(k.stride(0), v.stride(0)) * widest >= 2**31:
        raise ValueError(f"key row strides {k.stride(0)}, {v.stride(0)} too large for 32-bit in-tile offsets")
    if length >= widest:
        return k, v, length
    pad = (0, 0, 0, 0, 0, widest - length)
    return torch.nn.functional.pad(k[:length], pad), torch.nn.functional.pad(v[:length], pad), widest


def _common(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: torch.Tensor | None) -> tuple[Any, ...]:
    _, hq, d = q.shape
    if k.shape[1] == 0 or hq % k.shape[1]:
        raise ValueError(f"{hq} query heads do not group over {k.shape[1]} KV heads")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head size {d} must be a power of two of at least 16")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("the head dimension must be contiguous")
    if heads is None:
        heads = torch.arange(hq, device=q.device)
    heads = heads.to(device=q.device, dtype=torch.int32)
    scale = LOG2E / math.sqrt(d)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    return heads, hq // k.shape[1], scale, strides


def vertical_slash_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: VerticalSlashIndex,
    heads: torch.Tensor | None,
    out: torch.Tensor,
    loop: str,
    tile_n: int,
) -> tuple[tuple[int, int], tuple[Any, ...], dict[str, Any]]:
    """The vertical-slash kernel's grid, arguments and constexprs (BLOCK_N and FLAT left to the caller) for a
    launch over `index` with `loop` "nested", "flat" (tiles of tile_n keys) or "auto" (flat tiles of AUTO_TILE_N)."""
    k, v, kv_rows = _stored_keys(k, v, index.q_start + index.n, max(WIDEST_TUNED_TILE, tile_n))
    heads, group, scale, strides = _common(q, k, v, heads)
    if loop not in ("nested", "flat", "auto"):
        raise ValueError(f"unknown loop {loop!r} (nested, flat or auto)")
    if tile_n < 16 or tile_n & (tile_n - 1):
        raise ValueError(f"tile width {tile_n} must be a power of two of at least 16")
    segments = (index.seg_lo, index.seg_hi, index.seg_count)
    if loop == "nested":
        table: tuple[torch.Tensor, ...] = (*segments, index.seg_count)  # not read by the nested loop
    else:
        tiles = index.tile_table(AUTO_TILE_N if loop == "auto" else tile_n)
        table = (tiles.start, tiles.end, tiles.count, tiles.first)
    args = (
        q, k, v, out, heads, *segments, *table, index.columns, index.col_count, index.col_first, index.covered,
        index.n, index.q_start, group, scale, kv_rows,
        *strides, out.stride(0), out.stride(1),
        index.seg_lo.shape[1], table[0].shape[1], index.columns.shape[1], index.num_blocks, index.covered.shape[1],
    )  # fmt: skip
    consts = {"HEAD_DIM": q.shape[2], "BLOCK_M": index.block, "IEEE": q.dtype == torch.float32}
    return (index.num_blocks, len(heads)), args, consts


def vertical_slash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: VerticalSlashIndex,
    heads: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    loop: str = "nested",
    tile_n: int = 64,
) -> torch.Tensor:
    """q [n, Hq, D] (positions index.q_start ..), k/v [q_start + n, Hkv, D]. Writes the rows of `heads` (default:
    all; index head h is query head heads[h]) into `out` ([n, Hq, D], new if None) and returns it.

    loop: "nested" walks each segment's key range in its own loop; "flat" runs every block's ranges as one loop
    over the head's tile list (`index.tile_table(tile_n)`, tile_n keys a tile); "auto" lets autotuning on a GPU
    time both (the flat one over tiles of AUTO_TILE_N keys) among the other launch parameters and keep the faster
    per head size, query block and precision (without a GPU, where nothing is timed, it runs the nested loop; and
    if autotuning fails on a GPU, it logs why and runs the nested loop from then on). Same keys, same result."""
    out = torch.empty_like(q) if out is None else out
    tuned = _autotuned(q)
    if loop == "auto" and (not tuned or _auto_failed):
        loop = "nested"  # nothing to time without a GPU, or auto failed on this one before
    grid, args, consts = vertical_slash_launch(q, k, v, index, heads, out, loop, tile_n)
    if not tuned:
        _vertical_slash_kernel[grid](*args, BLOCK_N=tile_n, FLAT=loop == "flat", **consts)
    elif loop == "auto":
        try:
            _vertical_slash_auto[grid](*args, **consts)
        except Exception as exc:  # a candidate that does not compile on this GPU, say: keep serving, nested
            _auto_failed.append(f"{type(exc).__name__}: {exc}")
            log.warning("sparse attention: loop=auto failed here (%s); the nested loop from now on", _auto_failed[0])
            return vertical_slash_attention(q, k, v, index, heads, out, "nested", tile_n)
    elif loop == "flat":
        _vertical_slash_flat_tuned[grid](*args, BLOCK_N=tile_n, FLAT=True, **consts)
    else:
        _vertical_slash_tuned[grid](*args, FLAT=False, **consts)
    return out


def block_sparse_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockSparseIndex,
    heads: torch.Tensor | None,
    out: torch.Tensor,
) -> tuple[tuple[int, int], tuple[Any, ...], dict[str, Any]]:
    """The block-sparse kernel's grid, arguments and constexprs for a launch over `index`."""
    k, v, kv_rows = _stored_keys(k, v, index.q_start + index.n, index.block)
    heads, group, scale, strides = _common(q, k, v, heads)
    num_blocks = index.blocks.shape[1]
    args = (
        q, k, v, out, heads, index.blocks, index.count, index.columns, index.col_count, index.col_skip,
        index.n, index.q_start, group, scale, kv_rows,
        *strides, out.stride(0), out.stride(1),
        index.blocks.shape[2], num_blocks, index.columns.shape[1],
    )  # fmt: skip
    consts = {
        "HEAD_DIM": q.shape[2],
        "BLOCK_M": index.block,
        "KEY_BLOCK": index.block,
        "IEEE": q.dtype == torch.float32,
    }
    return (num_blocks, len(heads)), args, consts


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockSparseIndex,
    heads: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Like `vertical_slash_attention`, over a block-sparse index (query blocks and key blocks of index.block)."""
    out = torch.empty_like(q) if out is None else out
    grid, args, consts = block_sparse_launch(q, k, v, index, heads, out)
    if not _autotuned(q):
        _block_sparse_kernel[grid](*args, **consts)
    else:
        _block_sparse_tuned[grid](*args, **consts)
    return out
