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

from .config import HeadPattern
from .estimate import estimate_block_sparse, pick_vertical_slash, vertical_slash_scores

BLOCK = 64  # block-sparse granularity
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
    first_block = q_start // BLOCK
    qq = torch.zeros((length, q.shape[1]), dtype=q.dtype, device=q.device)
    qq[q_start:] = q
    kept = estimate_block_sparse(qq, k, BLOCK, top)
    nb = -(-length // BLOCK)
    out = torch.zeros((nb - first_block, nb), dtype=torch.bool, device=q.device)
    for row, blocks in enumerate(kept[first_block:]):
        out[row, blocks] = True
    return out


def select_group(patterns: Sequence[HeadPattern], q: torch.Tensor, k: torch.Tensor, q_start: int) -> GroupSelection:
    """Union of the keys the group's heads keep. q [n, Hg, D] (the group's query heads, positions q_start ..),
    k [L, D]. Vertical-slash heads are estimated together from the chunk's last 64 queries against every key."""
    length, n = k.shape[0], q.shape[0]
    cols = torch.zeros(length, dtype=torch.bool, device=q.device)
    offs = torch.zeros(length, dtype=torch.bool, device=q.device)
    blocks: torch.Tensor | None = None
    vs = [h for h, p in enumerate(patterns) if p.kind == "vertical_slash"]
    if vs:
        m = min(64, n)
        vertical, slash = vertical_slash_scores(q[n - m :, vs].transpose(0, 1), k)
        for i, h in enumerate(vs):
            c, o = pick_vertical_slash(vertical[i], slash[i], patterns[h].a, patterns[h].b, slash_group=SLASH_GROUP)
            cols[c] = True
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


def _pairs(keep: torch.Tensor, q_start: int, n: int, tile: int) -> int:
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
    max_scores: int = 1 << 23,
) -> tuple[torch.Tensor, int]:
    """q [n, Hq, D] (positions q_start ..), k/v [q_start + n, Hkv, D]. Returns (out [n, Hq, D], (row, key) pairs
    attended summed over heads: the work done, to compare with dense's).

    All tiles of a group run together: each tile's keys are gathered into a padded [tiles, M, D] block, so a chunk
    costs a handful of batched matmuls instead of a Python loop over tiles (in slices of at most `max_scores`
    scores per head)."""
    n, hq, d = q.shape
    length, hkv, _ = k.shape
    if length != q_start + n:
        raise ValueError(f"keys ({length}) must cover the prefix ({q_start}) and the chunk ({n})")
    if len(patterns) != hq:
        raise ValueError(f"{len(patterns)} head patterns for {hq} query heads")
    group = hq // hkv
    tiles = -(-n // tile)
    # queries scaled once, padded to whole tiles, laid out [KV head, tile, group heads x tile rows, D] so each
    # tile's gathered keys serve all heads of its group in one batched matmul (no per-head copies of K/V)
    qpad = torch.nn.functional.pad(q * (1.0 / d**0.5), (0, 0, 0, 0, 0, tiles * tile - n))
    qpad = qpad.view(tiles, tile, hkv, group, d).permute(2, 0, 3, 1, 4).reshape(hkv, tiles, group * tile, d)
    rowpos = (q_start + torch.arange(tiles * tile, device=q.device).view(tiles, 1, tile)).expand(tiles, group, tile)
    rowpos = rowpos.reshape(tiles, group * tile)
    out = torch.empty((hkv, tiles, group * tile, d), dtype=q.dtype, device=q.device)
    work = 0
    for g in range(hkv):
        heads = slice(g * group, (g + 1) * group)
        sel = select_group(patterns[heads], q[:, heads], k[:, g], q_start)
        keep = key_matrix(sel, q_start, n, tile)  # [T, L]
        counts = keep.sum(dim=1)
        width = int(counts.max())
        # kept key indices first, ascending (a stable sort of "not kept"), padded to the widest tile
        idx = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
        valid = torch.arange(width, device=q.device)[None, :] < counts[:, None]
        step = max(1, max_scores // max(1, group * tile * width))
        for t0 in range(0, tiles, step):
            t1 = min(tiles, t0 + step)
            ix = idx[t0:t1]
            kt = k[:, g].index_select(0, ix.flatten()).view(t1 - t0, width, d)
            vt = v[:, g].index_select(0, ix.flatten()).view(t1 - t0, width, d)
            allowed = valid[t0:t1, None, :] & (ix[:, None, :] <= rowpos[t0:t1, :, None])  # [t, Hg*tile, M]
            # fused on CPU (flash attention with a mask): the scores are never materialised
            out[g, t0:t1] = F.scaled_dot_product_attention(
                qpad[g, t0:t1, None], kt[:, None], vt[:, None], attn_mask=allowed[:, None], scale=1.0
            )[:, 0]
        work += _pairs(keep, q_start, n, tile) * group
    # [KV head, tile, group head, row, D] -> [rows, query heads, D]
    out = out.view(hkv, tiles, group, tile, d).permute(1, 3, 0, 2, 4).reshape(tiles * tile, hq, d)
    return out[:n].contiguous(), work
