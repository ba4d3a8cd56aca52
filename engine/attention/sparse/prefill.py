"""Sparse prefill attention for one prefill chunk in plain PyTorch (the CPU path; the Triton kernel serves GPUs).

A chunk's queries sit at positions q_start .. q_start + n - 1 and see keys 0 .. q_start + n - 1 (its cached prefix
plus itself), so chunked prefill works: each chunk estimates its own pattern from its last 64 queries against all
keys it sees, as MInference does for a whole prompt.

Per KV head, the heads of its query group share one key selection (the union of their patterns: a superset of each
head's own, so never less accurate), so K/V are gathered once per tile and all the group's heads run in one matmul.
Per query tile the kept keys are: the pattern's columns (verticals, or A-shape's sinks), every key on a kept
diagonal's range for the tile (slashes, or A-shape's local window; the same superset the GPU index builds), and the
kept key blocks (block-sparse); causal masking is applied inside the tile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from ..cpu import bottom_right_causal_attention
from .config import HeadPattern
from .estimate import estimate_block_sparse_mask, pick_vertical_slash, vertical_slash_scores

BLOCK = 64  # block-sparse granularity
NEEDLE_VERTICALS = 256  # dynamic columns every non-dense head keeps (see select_group)
TILE = 64  # query rows per step of the CPU path: larger tiles widen each kept diagonal's key range
SLASH_GROUP = 16  # the CPU path keeps diagonals in runs of this many offsets (see estimate_vertical_slash)


@dataclass
class GroupSelection:
    """Keys a group of query heads keeps, independent of the tile."""

    columns: torch.Tensor  # bool [L]: always-visible keys (left of the tile; causality decides the rest)
    offsets: torch.Tensor  # bool [L]: kept diagonal offsets (row - key)
    blocks: torch.Tensor | None  # bool [query blocks of the chunk, key blocks]: block-sparse choices, or None


def _estimate_chunk_blocks(q: torch.Tensor, k: torch.Tensor, q_start: int, top: int) -> torch.Tensor:
    """Block-sparse for a chunk: query blocks of the chunk (aligned to absolute positions) against all key blocks."""
    length = k.shape[0]
    qq = torch.zeros((length, q.shape[1]), dtype=q.dtype, device=q.device)
    qq[q_start:] = q
    return estimate_block_sparse_mask(qq, k, BLOCK, top)[q_start // BLOCK :]


def _is_dense(pattern: HeadPattern, length: int) -> bool:
    return pattern.kind == "a_shape" and pattern.a >= length


def select_group(patterns: Sequence[HeadPattern], q: torch.Tensor, k: torch.Tensor, q_start: int) -> GroupSelection:
    """Union of the keys the group's heads keep. q [n, Hg, D] (the group's query heads, positions q_start ..),
    k [L, D]. Vertical-slash heads are estimated together from the chunk's last 64 queries against every key."""
    length, n = k.shape[0], q.shape[0]
    cols = torch.zeros(length, dtype=torch.bool, device=q.device)
    offs = torch.zeros(length, dtype=torch.bool, device=q.device)
    blocks: torch.Tensor | None = None
    # Every head that is not dense gets dynamic verticals: at least NEEDLE_VERTICALS columns its last queries weigh
    # most (for vertical-slash heads, its own k_v when larger). Averaged recall on calibration text cannot show
    # which keys a later question will need (a passkey, a name), and static patterns would drop them.
    scored = [h for h, p in enumerate(patterns) if not _is_dense(p, length)]
    if scored:
        m = min(64, n)
        vertical, slash = vertical_slash_scores(q[n - m :, scored].transpose(0, 1), k)
        for i, h in enumerate(scored):
            p = patterns[h]
            k_v = max(p.a, NEEDLE_VERTICALS) if p.kind == "vertical_slash" else NEEDLE_VERTICALS
            k_s = p.b if p.kind == "vertical_slash" else 0
            c, o = pick_vertical_slash(vertical[i], slash[i], k_v, k_s, slash_group=SLASH_GROUP)
            cols[c] = True
            if p.kind == "vertical_slash":
                offs[o] = True
    for h, pattern in enumerate(patterns):
        if pattern.kind == "a_shape":
            cols[: min(pattern.a, length)] = True
            offs[: min(max(pattern.b, 1), length)] = True
        elif pattern.kind == "block_sparse":
            b = _estimate_chunk_blocks(q[:, h], k, q_start, pattern.a)
            blocks = b if blocks is None else blocks | b
        elif pattern.kind != "vertical_slash":
            raise ValueError(f"unknown sparse pattern {pattern.kind!r}")
    offs[: min(TILE, length)] = True  # each tile's own diagonal block: the fused kernel's causal alignment needs it
    return GroupSelection(cols, offs, blocks)


def key_matrix(sel: GroupSelection, q_start: int, n: int, tile: int = TILE) -> torch.Tensor:
    """bool [tiles, L]: the keys each tile of query rows visits (before causal masking). Key j is on a kept
    diagonal's range for tile rows [a, b) if some kept offset o has a - o <= j < b - o, i.e. o in
    [a - j, b - 1 - j]: a prefix-sum lookup."""
    length = sel.columns.shape[0]
    device = sel.columns.device
    starts = q_start + torch.arange(0, n, tile, device=device)
    ends = (starts + tile).clamp(max=q_start + n)
    j = torch.arange(length, device=device)
    prefix = torch.zeros(length + 1, dtype=torch.int32, device=device)
    prefix[1:] = torch.cumsum(sel.offsets.to(torch.int32), dim=0)
    hi = (ends[:, None] - j[None, :]).clamp(min=0, max=length)
    lo = (starts[:, None] - j[None, :]).clamp(min=0, max=length)
    keep = ((prefix[hi] - prefix[lo]) > 0) | sel.columns[None, :]
    if sel.blocks is not None:
        # block-sparse: the tile's query blocks' kept key blocks, expanded to keys
        first = q_start // BLOCK
        last_row = sel.blocks.shape[0] - 1
        r1 = (starts // BLOCK - first).clamp(0, last_row)
        r2 = ((ends - 1) // BLOCK - first).clamp(0, last_row)
        kept = (sel.blocks[r1] | sel.blocks[r2]).repeat_interleave(BLOCK, dim=1)[:, :length]
        keep |= kept
    return keep & (j[None, :] < ends[:, None])


def tile_keys(sel: GroupSelection, a: int, b: int) -> torch.Tensor:
    """Key indices (sorted) query rows [a, b) visit (diagonal ranges and columns; before causal masking)."""
    plain = GroupSelection(sel.columns, sel.offsets, None)
    return key_matrix(plain, a, b - a, b - a)[0].nonzero().squeeze(1)


def keys_for_tile(sel: GroupSelection, a: int, b: int, q_start: int) -> torch.Tensor:
    """Every key (sorted) query rows [a, b) of a chunk starting at q_start visit, before causal masking."""
    if sel.blocks is None:
        return tile_keys(sel, a, b)
    # align the selection's block rows with a one-tile chunk starting at a
    rows = sel.blocks[a // BLOCK - q_start // BLOCK :]
    return key_matrix(GroupSelection(sel.columns, sel.offsets, rows), a, b - a, b - a)[0].nonzero().squeeze(1)


def visited_pairs(keep: torch.Tensor, q_start: int, n: int, tile: int) -> int:
    """(row, key) pairs with key <= row that tiles visit, from the [T, L] key matrix (one head)."""
    device = keep.device
    starts = q_start + torch.arange(0, n, tile, device=device)
    ends = (starts + tile).clamp(max=q_start + n)
    j = torch.arange(keep.shape[1], device=device)
    rows_seeing = (ends[:, None] - torch.maximum(j[None, :], starts[:, None])).clamp(min=0)
    return int((rows_seeing * keep).sum())


def sparse_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_start: int,
    patterns: Sequence[HeadPattern],
    tile: int = TILE,
    max_keys: int = 1 << 15,
) -> tuple[torch.Tensor, int]:
    """q [n, Hq, D] (positions q_start ..), k/v [q_start + n, Hkv, D]. Returns (out [n, Hq, D], (row, key) pairs
    attended summed over heads: the work done, to compare with dense's).

    Tiles of a group run together in one fused CPU attention call per batch of tiles. Each tile's kept keys are
    gathered in ascending order, so they end with the tile's own diagonal block (always kept: the local window
    covers it) and a bottom-right-aligned causal mask is exactly right; tiles are front-padded to a common width
    with a dummy key that no query can weigh (an extra head dimension scores it at -1e4), so no explicit mask is
    ever built. A partial last tile gets dummies behind its diagonal to keep that alignment."""
    n, hq, d = q.shape
    length, hkv, _ = k.shape
    if length != q_start + n:
        raise ValueError(f"keys ({length}) must cover the prefix ({q_start}) and the chunk ({n})")
    if len(patterns) != hq:
        raise ValueError(f"{len(patterns)} head patterns for {hq} query heads")
    group = hq // hkv
    tiles = -(-n // tile)
    dev, dt = q.device, q.dtype
    # queries scaled once, with the extra coordinate 1, padded to whole tiles: [KV head, tile, group head, row, D+1]
    # the extra coordinate(s): one on CPU; on CUDA the head size stays a multiple of 8 for the fused kernels
    extra = 1 if dev.type == "cpu" else 8
    da = d + extra
    ones = torch.zeros((n, hq, extra), dtype=dt, device=dev)
    ones[..., 0] = 1.0
    qa = torch.cat([q * (1.0 / d**0.5), ones], dim=2)
    qa = torch.nn.functional.pad(qa, (0, 0, 0, 0, 0, tiles * tile - n))
    qa = qa.view(tiles, tile, hkv, group, da).permute(2, 0, 3, 1, 4)
    # keys with the extra coordinate 0, plus the dummy key (index `length`) whose extra coordinate is -1e4
    ka = torch.cat([k, torch.zeros((length, hkv, extra), dtype=dt, device=dev)], dim=2)
    dummy_k = torch.zeros((1, hkv, da), dtype=dt, device=dev)
    dummy_k[..., d] = -1e4
    ka = torch.cat([ka, dummy_k])
    # values get the extra (zero) coordinate too: the fused CPU kernel needs one head size for q, k and v
    va = torch.nn.functional.pad(torch.cat([v, torch.zeros((1, hkv, d), dtype=dt, device=dev)]), (0, extra))
    tail = torch.zeros(tiles, dtype=torch.long, device=dev)
    tail[-1] = tiles * tile - n  # dummies behind the partial last tile's diagonal
    out = torch.empty((hkv, tiles, group, tile, d), dtype=dt, device=dev)
    work = 0
    for g in range(hkv):
        heads = slice(g * group, (g + 1) * group)
        sel = select_group(patterns[heads], q[:, heads], k[:, g], q_start)
        keep = key_matrix(sel, q_start, n, tile)  # [T, L]
        counts = keep.sum(dim=1)
        total = counts + tail
        # kept key indices first, ascending (a stable sort of "not kept")
        idx = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, : int(counts.max())]
        t0 = 0
        while t0 < tiles:
            # consecutive tiles (causal chunks widen from first to last) in batches of bounded padded size
            t1 = t0 + 1
            while t1 < tiles and (t1 + 1 - t0) * int(total[t0 : t1 + 1].max()) <= max_keys:
                t1 += 1
            wide = int(total[t0:t1].max())
            # position p of a tile's key list holds kept key p - shift, where shift = wide - total (front pad)
            src = torch.arange(wide, device=dev)[None, :] - (wide - total[t0:t1])[:, None]
            real = (src >= 0) & (src < counts[t0:t1, None])
            gathered = idx[t0:t1].gather(1, src.clamp(min=0, max=idx.shape[1] - 1))
            ix = torch.where(real, gathered, torch.full_like(gathered, length)).flatten()
            kt = ka[:, g].index_select(0, ix).view(t1 - t0, 1, wide, da)
            vt = va[:, g].index_select(0, ix).view(t1 - t0, 1, wide, da)
            if dev.type == "cpu":  # the kept keys, then the tile's own diagonal block: no mask to compute under
                out[g, t0:t1] = bottom_right_causal_attention(qa[g, t0:t1], kt, vt, scale=1.0)[..., :d]
                t0 = t1
                continue
            shape = (t1 - t0, group, wide)
            out[g, t0:t1] = F.scaled_dot_product_attention(
                qa[g, t0:t1],
                kt.expand(*shape, da),
                vt.expand(*shape, da),
                attn_mask=causal_lower_right(tile, wide),
                scale=1.0,
            )[..., :d]
            t0 = t1
        work += visited_pairs(keep, q_start, n, tile) * group
    # [KV head, tile, group head, row, D] -> [rows, query heads, D]
    out = out.permute(1, 3, 0, 2, 4).reshape(tiles * tile, hq, d)
    return out[:n].contiguous(), work
