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

from .config import HeadPattern
from .estimate import LOCAL, SINKS, estimate_block_sparse, estimate_vertical_slash

BLOCK = 64  # block-sparse granularity
TILE = 128  # query rows per step of the CPU path: larger tiles widen each kept diagonal's key range


@dataclass
class GroupSelection:
    """Keys a group of query heads keeps, independent of the tile."""

    columns: torch.Tensor  # bool [L]: always-visible keys (left of the tile; causality decides the rest)
    offsets: torch.Tensor  # bool [L]: kept diagonal offsets (row - key)
    blocks: torch.Tensor | None  # bool [query blocks of the chunk, key blocks]: block-sparse choices, or None


def _select_head(
    pattern: HeadPattern, q: torch.Tensor, k: torch.Tensor, q_start: int, length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One head's (columns, offsets, blocks). q [n, D] (the chunk), k [L, D]."""
    device = q.device
    cols = torch.zeros(length, dtype=torch.bool, device=device)
    offs = torch.zeros(length, dtype=torch.bool, device=device)
    if pattern.kind == "a_shape":
        cols[: min(pattern.a, length)] = True
        offs[: min(max(pattern.b, 1), length)] = True
        return cols, offs, None
    if pattern.kind == "vertical_slash":
        columns, diagonals = _estimate_chunk_vs(q, k, q_start, pattern.a, pattern.b)
        cols[columns] = True
        offs[diagonals] = True
        return cols, offs, None
    if pattern.kind == "block_sparse":
        return cols, offs, _estimate_chunk_blocks(q, k, q_start, pattern.a)
    raise ValueError(f"unknown sparse pattern {pattern.kind!r}")


def _estimate_chunk_vs(
    q: torch.Tensor, k: torch.Tensor, q_start: int, k_v: int, k_s: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertical-slash estimation for a chunk: its last 64 queries against every key they can see."""
    n = q.shape[0]
    if q_start == 0:
        return estimate_vertical_slash(q, k[:n], k_v, k_s)
    # Pad the queries in front so the estimator's "last rows" sit at their true positions.
    m = min(64, n)
    last = q[n - m :]
    length = k.shape[0]
    padded = torch.zeros((length, q.shape[1]), dtype=q.dtype, device=q.device)
    padded[length - m :] = last
    return estimate_vertical_slash(padded, k, k_v, k_s, last_q=m, sinks=SINKS, local=LOCAL)


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
    """Union of the keys the group's heads keep. q [n, Hg, D] (the group's query heads), k [L, D]."""
    length = k.shape[0]
    cols = torch.zeros(length, dtype=torch.bool, device=q.device)
    offs = torch.zeros(length, dtype=torch.bool, device=q.device)
    blocks: torch.Tensor | None = None
    for h, pattern in enumerate(patterns):
        c, o, b = _select_head(pattern, q[:, h], k, q_start, length)
        cols |= c
        offs |= o
        if b is not None:
            blocks = b if blocks is None else blocks | b
    return GroupSelection(cols, offs, blocks)


def tile_keys(sel: GroupSelection, a: int, b: int) -> torch.Tensor:
    """Key indices (sorted) a tile of query rows [a, b) attends to, before causal masking."""
    device = sel.columns.device
    j = torch.arange(b, device=device)
    # Key j is on a kept diagonal's range for this tile if some kept offset o has a - o <= j < b - o,
    # i.e. o in [max(a - j, 0), b - 1 - j]: a prefix-sum lookup.
    prefix = torch.zeros(sel.offsets.shape[0] + 1, dtype=torch.int32, device=device)
    prefix[1:] = torch.cumsum(sel.offsets.to(torch.int32), dim=0)
    hi = (b - j).clamp(max=sel.offsets.shape[0])
    lo = (a - j).clamp(min=0)
    covered = (prefix[hi] - prefix[lo]) > 0
    return (covered | sel.columns[:b]).nonzero().squeeze(1)


def sparse_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_start: int,
    patterns: Sequence[HeadPattern],
    tile: int = TILE,
) -> tuple[torch.Tensor, int]:
    """q [n, Hq, D] (positions q_start ..), k/v [q_start + n, Hkv, D]. Returns (out [n, Hq, D], keys attended
    summed over heads and rows: the work done, for comparing with dense's)."""
    n, hq, d = q.shape
    length, hkv, _ = k.shape
    if length != q_start + n:
        raise ValueError(f"keys ({length}) must cover the prefix ({q_start}) and the chunk ({n})")
    if len(patterns) != hq:
        raise ValueError(f"{len(patterns)} head patterns for {hq} query heads")
    group = hq // hkv
    scale = 1.0 / d**0.5
    out = torch.empty_like(q)
    work = 0
    for g in range(hkv):
        heads = slice(g * group, (g + 1) * group)
        qg = q[:, heads]  # [n, Hg, D]
        sel = select_group(patterns[heads], qg, k[:, g], q_start)
        kg, vg = k[:, g], v[:, g]
        for t0 in range(0, n, tile):
            t1 = min(n, t0 + tile)
            a, b = q_start + t0, q_start + t1
            keys = keys_for_tile(sel, a, b, q_start)
            kt = kg.index_select(0, keys)  # [m, D]
            vt = vg.index_select(0, keys)
            qt = qg[t0:t1].transpose(0, 1)  # [Hg, rows, D]
            scores = (qt @ kt.T).float() * scale  # [Hg, rows, m]
            rows = torch.arange(a, b, device=q.device)
            scores.masked_fill_(keys[None, None, :] > rows[None, :, None], float("-inf"))
            probs = scores.softmax(dim=-1).to(vt.dtype)
            out[t0:t1, heads] = (probs @ vt).transpose(0, 1)
            work += group * int((keys[None, :] <= rows[:, None]).sum())
    return out, work


def keys_for_tile(sel: GroupSelection, a: int, b: int, q_start: int) -> torch.Tensor:
    """Every key (sorted) query rows [a, b) of a chunk starting at q_start attend to, before causal masking."""
    keys = tile_keys(sel, a, b)
    if sel.blocks is None:
        return keys
    # block-sparse: the tile's query blocks' kept key blocks, expanded to keys
    first = q_start // BLOCK
    qb = torch.arange(a // BLOCK, (b - 1) // BLOCK + 1, device=keys.device) - first
    kept_blocks = sel.blocks[qb.clamp(min=0, max=sel.blocks.shape[0] - 1)].any(dim=0)
    mask = torch.zeros(b, dtype=torch.bool, device=keys.device)
    mask[keys] = True
    mask |= kept_blocks.repeat_interleave(BLOCK)[:b]
    return mask.nonzero().squeeze(1)
