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

from ...model.native import estimate_scores, prefill_attention, prefill_keys, sparse_attention, tile_scores
from ...model.native import tile_keys as native_tile_keys
from ..chunk import bottom_right_causal
from ..cpu import bottom_right_causal_attention
from .config import PER_MILLE, HeadPattern
from .estimate import (
    LOCAL,
    SINKS,
    block_sparse_union,
    column_union,
    coverage_budgets,
    covering_keys,
    diagonal_union,
    tile_estimate,
    vertical_scores,
    vertical_slash_scores,
)

BLOCK = 64  # block-sparse granularity
NEEDLE_VERTICALS = 256  # dynamic columns every non-dense head keeps (see select_group)
TILE = 64  # query rows per step of the CPU path: larger tiles widen each kept diagonal's key range
SLASH_GROUP = 16  # the CPU path keeps diagonals in runs of this many offsets (see estimate_vertical_slash)
DENSE_ABOVE = 0.75  # a KV group visiting more of the causal pairs than this runs dense (cheaper than gathering)
DENSE_UP_TO = 2048  # a chunk seeing at most this many keys runs dense: sparsity saves little there (see below)
LAST_QUERIES = 64  # a chunk's last queries whose attention estimates its pattern (MInference's last_q)


@dataclass
class GroupSelection:
    """Keys a group of query heads keeps, independent of the tile."""

    columns: torch.Tensor  # bool [L]: always-visible keys (left of the tile; causality decides the rest)
    offsets: torch.Tensor  # bool [L]: kept diagonal offsets (row - key)
    blocks: torch.Tensor | None  # bool [query blocks of the chunk, key blocks]: block-sparse choices, or None
    tiles: torch.Tensor | None = None  # bool [tiles of the chunk, L]: query-aware choices per tile, or None


def _is_dense(pattern: HeadPattern, length: int) -> bool:
    return pattern.kind == "a_shape" and pattern.a >= length


def last_rows_scores(
    q: torch.Tensor, k: torch.Tensor, slashes: bool = True, native: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Vertical (and, with `slashes`, slash) scores [Hg, L] of q's heads (q [n, Hg, D], its rows the last n
    positions of k [L, D]) from their last 64 queries: `native.estimate_scores` in C where native and it takes
    them, else `estimate.vertical_slash_scores` / `estimate.vertical_scores`."""
    n = q.shape[0]
    m = min(LAST_QUERIES, n)
    q_last = q[n - m :].transpose(0, 1)
    scores = estimate_scores(q_last, k, slashes) if native else None
    if scores is not None:
        return scores
    return vertical_slash_scores(q_last, k) if slashes else (vertical_scores(q_last, k), None)


def query_aware_keys(
    q: torch.Tensor, k: torch.Tensor, tile: int, rows: int, share: float, native: bool
) -> torch.Tensor:
    """bool [tiles, L]: per tile of q's chunk (q [n, Hg, D], its rows the last n positions of k [L, D]), the keys
    holding `share` of its last `rows` rows' attention (summed over the heads): `native.tile_scores` in C where
    native and it takes them (a threshold within 1/16 of the exact one: a few more keys), else
    `estimate.tile_estimate` and the exact fewest."""
    rows = min(rows, tile)  # a tile has no more rows to sample
    got = tile_scores(q, k, tile, rows, share) if native else None
    if got is not None:
        scores, thresholds = got
        assert thresholds is not None
        return (scores >= thresholds[:, None]) & (scores > 0)
    return covering_keys(tile_estimate(q, k, tile, rows), share)


def select_group(
    patterns: Sequence[HeadPattern],
    q: torch.Tensor,
    k: torch.Tensor,
    q_start: int,
    native: bool = False,
    scores: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    tile: int = TILE,
) -> GroupSelection:
    """Union of the keys the group's heads keep. q [n, Hg, D] (the group's query heads, positions q_start ..),
    k [L, D]. Vertical-slash heads are estimated together from the chunk's last 64 queries against every key
    (`last_rows_scores`; native: in C). `scores`: those of all Hg heads, computed once by a caller that selects for
    several pattern lists over the same q and k (the search); their slash half is needed for vertical-slash heads.
    Query-aware heads choose per tile of `tile` rows (`query_aware_keys`), with the sinks and local window kept."""
    length = k.shape[0]
    cols = torch.zeros(length, dtype=torch.bool, device=q.device)
    offs = torch.zeros(length, dtype=torch.bool, device=q.device)
    blocks: torch.Tensor | None = None
    # Every head that is not dense gets dynamic verticals: at least NEEDLE_VERTICALS columns its last queries weigh
    # most (for vertical-slash heads, its own k_v when larger). Averaged recall on calibration text cannot show
    # which keys a later question will need (a passkey, a name), and static patterns would drop them. Coverage heads
    # keep the columns holding their share of that estimate instead, however many that takes on this prompt.
    scored = [h for h, p in enumerate(patterns) if not _is_dense(p, length) and p.kind != "query_aware"]
    if scored:
        slashes = any(patterns[h].kind in ("vertical_slash", "coverage") for h in scored)  # else no diagonals
        if scores is None:
            vertical, slash = last_rows_scores(q[-LAST_QUERIES:, scored], k, slashes, native)
        else:
            if slashes and scores[1] is None:
                raise ValueError("select_group: vertical-slash heads need slash scores")
            vertical = scores[0][scored]
            slash = scores[1][scored] if slashes and scores[1] is not None else None
        # budgets per scored head, then one top-k for all of their columns and one for their diagonals
        kinds = [patterns[h].kind for h in scored]
        k_v = torch.tensor([max(patterns[h].a, NEEDLE_VERTICALS) if patterns[h].kind == "vertical_slash"
                            else NEEDLE_VERTICALS for h in scored])  # fmt: skip
        k_s = torch.tensor([patterns[h].b if patterns[h].kind == "vertical_slash" else 0 for h in scored])
        cover = [i for i, kind in enumerate(kinds) if kind == "coverage"]
        if cover and slash is not None:
            shares = torch.tensor([[patterns[scored[i]].a, patterns[scored[i]].b] for i in cover]) / PER_MILLE
            k_v[cover], k_s[cover] = coverage_budgets(
                vertical[cover], slash[cover], shares[:, 0], shares[:, 1], slash_group=SLASH_GROUP
            )
        cols |= column_union(vertical, k_v)
        diagonal = [i for i, kind in enumerate(kinds) if kind in ("vertical_slash", "coverage")]
        if diagonal and slash is not None:  # the other scored heads keep columns only
            offs |= diagonal_union(slash[diagonal], k_s[diagonal], slash_group=SLASH_GROUP)
    tiles: torch.Tensor | None = None
    for rows, share in sorted({(p.a, p.b) for p in patterns if p.kind == "query_aware"}):
        heads = [h for h, p in enumerate(patterns) if p.kind == "query_aware" and (p.a, p.b) == (rows, share)]
        t = query_aware_keys(q[:, heads], k, tile, rows, share / PER_MILLE, native)
        tiles = t if tiles is None else tiles | t
        cols[: min(SINKS, length)] = True
        offs[: min(LOCAL, length)] = True
    for pattern in patterns:
        if pattern.kind == "a_shape":
            cols[: min(pattern.a, length)] = True
            offs[: min(max(pattern.b, 1), length)] = True
        elif pattern.kind not in ("vertical_slash", "coverage", "query_aware", "block_sparse"):
            raise ValueError(f"unknown sparse pattern {pattern.kind!r}")
    block_heads = [h for h, p in enumerate(patterns) if p.kind == "block_sparse"]
    if block_heads:  # the chunk's query blocks x key blocks, k pooled once for them all
        blocks = block_sparse_union(q[:, block_heads], k, BLOCK, [patterns[h].a for h in block_heads])
    offs[: min(TILE, length)] = True  # each tile's own diagonal block: the fused kernel's causal alignment needs it
    return GroupSelection(cols, offs, blocks, tiles)


def _diagonal_ranges(offsets: torch.Tensor, q_start: int, n: int, tile: int) -> torch.Tensor:
    """bool [tiles, L]: key j lies on a kept diagonal's range for tile t's rows [a, b), i.e. some kept offset o has
    a - o <= j < b - o (o in [a - j, b - 1 - j]: a prefix-sum lookup). For whole tiles that depends on x = a - j
    alone, so one window lookup over every x serves all tiles: tile t's row is a slice of it (a strided view, rows
    `tile` apart); a partial last tile gets its own row."""
    length = offsets.shape[0]
    device = offsets.device
    tiles = -(-n // tile)
    prefix = torch.zeros(length + 1, dtype=torch.int32, device=device)
    prefix[1:] = torch.cumsum(offsets.to(torch.int32), dim=0)
    top = q_start + (tiles - 1) * tile  # the last tile's first row
    # x = top - w for w = 0 .. (tiles - 1) * tile + L - 1; tile t, key j has w = (tiles - 1 - t) * tile + j
    x = torch.arange(top, q_start - length, -1, device=device)
    window = (prefix[(x + tile).clamp(0, length)] - prefix[x.clamp(0, length)]) > 0
    out = window.unfold(0, length, tile).flip(0)  # row s of the view is tile tiles - 1 - s; flip copies
    last = q_start + n - top
    if last < tile:
        j = torch.arange(length, device=device)
        out[-1] = (prefix[(top + last - j).clamp(0, length)] - prefix[(top - j).clamp(0, length)]) > 0
    return out


def key_matrix(sel: GroupSelection, q_start: int, n: int, tile: int = TILE) -> torch.Tensor:
    """bool [tiles, L]: the keys each tile of query rows visits (before causal masking within the tile; none at or
    right of its end): its kept diagonals' ranges, the kept columns, the kept key blocks of its query blocks."""
    length = sel.columns.shape[0]
    device = sel.columns.device
    starts = q_start + torch.arange(0, n, tile, device=device)
    ends = (starts + tile).clamp(max=q_start + n)
    keep = _diagonal_ranges(sel.offsets, q_start, n, tile)
    keep |= sel.columns[None, :]
    if sel.tiles is not None:
        if sel.tiles.shape != keep.shape:
            raise ValueError(f"query-aware choices for {tuple(sel.tiles.shape)} tiles x keys, not {tuple(keep.shape)}")
        keep |= sel.tiles
    if sel.blocks is not None:
        # block-sparse: the tile's query blocks' kept key blocks, expanded to keys
        first = q_start // BLOCK
        last_row = sel.blocks.shape[0] - 1
        r1 = (starts // BLOCK - first).clamp(0, last_row)
        r2 = ((ends - 1) // BLOCK - first).clamp(0, last_row)
        kept = sel.blocks[r1]
        for step in range(1, (tile - 2) // BLOCK + 2):  # a tile's rows span up to this many more query blocks
            kept = kept | sel.blocks[torch.minimum(r1 + step, r2)]
        keep |= kept.repeat_interleave(BLOCK, dim=1)[:, :length]
    keep &= torch.arange(length, device=device)[None, :] < ends[:, None]
    return keep


def tile_keys(sel: GroupSelection, a: int, b: int) -> torch.Tensor:
    """Key indices (sorted) query rows [a, b) visit through the selection's diagonal ranges and columns (before
    causal masking; its block-sparse blocks and query-aware tiles, which are per chunk tile, are not looked at)."""
    plain = GroupSelection(sel.columns, sel.offsets, None)
    return key_matrix(plain, a, b - a, b - a)[0].nonzero().squeeze(1)


def visited_pairs(keep: torch.Tensor, q_start: int, n: int, tile: int) -> int:
    """(row, key) pairs with key <= row that tiles visit, from key_matrix's [T, L] (one head). A key left of tile
    [a, b) is seen by all its b - a rows, key j inside it by the b - j rows at or after it: every kept key counts
    b - a, less j - a for those inside."""
    device = keep.device
    starts = q_start + torch.arange(0, n, tile, device=device)
    ends = (starts + tile).clamp(max=q_start + n)
    step = torch.arange(tile, device=device)
    inner = starts[:, None] + step[None, :]  # [T, tile]: each tile's own rows' keys
    inside = keep.gather(1, inner.clamp(max=keep.shape[1] - 1)) & (inner < ends[:, None])
    return int(((ends - starts) * keep.sum(dim=1)).sum()) - int((inside * step[None, :]).sum())


def group_keys(
    sel: GroupSelection, q_start: int, n: int, tile: int = TILE, native: bool = False
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(keys, counts, pairs): the keys each tile of `tile` rows visits (`key_matrix`'s, tile by tile, ascending),
    their count per tile, and the (row, key) pairs visited (`visited_pairs`). native: in C
    (`native.tile_keys`: one pass, no [tiles, L] matrix) where it takes them."""
    if native:
        got = native_tile_keys(sel.columns, sel.offsets, sel.tiles, sel.blocks, BLOCK, q_start, n, tile)
        if got is not None:
            return got[0], got[1], got[3]
    keep = key_matrix(sel, q_start, n, tile)
    return keep.nonzero()[:, 1], keep.sum(dim=1), visited_pairs(keep, q_start, n, tile)


def _fused_cpu(device: torch.device) -> bool:
    """Whether torch's fused CPU attention serves this device (elsewhere: SDPA with an explicit mask)."""
    return device.type == "cpu"


def _dense_group(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, native: bool = False) -> None:
    """Every visible key for one KV group (bottom-right causal): q [n, G, D], k/v [L, D], into out [n, G, D]."""
    if native and k.shape[0] <= prefill_keys() and prefill_attention(q, k[:, None], v[:, None], out):
        return
    o = bottom_right_causal(q.transpose(0, 1)[None], k[None, None], v[None, None])
    out.copy_(o[0].transpose(0, 1))


def sparse_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_start: int,
    patterns: Sequence[HeadPattern],
    tile: int = TILE,
    max_keys: int = 1 << 15,
    dense_above: float = DENSE_ABOVE,
    dense_up_to: int = DENSE_UP_TO,
    native: bool = False,
) -> tuple[torch.Tensor, int]:
    """q [n, Hq, D] (positions q_start ..), k/v [q_start + n, Hkv, D]. Returns (out [n, Hq, D], (row, key) pairs
    attended summed over heads: the work done, to compare with dense's).

    A chunk seeing at most `dense_up_to` keys runs dense (on CPU, estimation and gathers cost about what sparsity
    saves there: the first 2K chunk of a 7K prompt took 1.7 s sparse, 1.4 s dense with torch's estimation and
    batches; 1.20-1.39 s against 1.27-1.42 in C, within the noise). Per KV group: a group with a dense
    head, or whose selection visits more than `dense_above` of the causal pairs, runs dense (gathering nearly every
    key per tile costs more than computing the rest). Otherwise tiles run in batches of similar width (sorted by
    kept-key count, so little padding), one fused attention call per batch.
    Each tile's kept keys are gathered in ascending order, so they end with the tile's own diagonal block (always
    kept: the local window covers it) and a bottom-right-aligned causal mask is exactly right; tiles are
    front-padded to the batch's width with a zero key that an additive mask over the unmasked part hides, and a
    partial last tile gets zero keys behind its diagonal (only its padding rows see them) to keep that alignment.

    native (float32 on CPU, where the C kernels build; the engine passes it as its dense path uses them): each
    group's tiles run in C instead (`native.sparse_attention`: no gathers into padded batches; a tile's keys are
    read once for all its rows and heads), and dense groups of up to prefill_keys() keys too."""
    n, hq, d = q.shape
    length, hkv, _ = k.shape
    if length != q_start + n:
        raise ValueError(f"keys ({length}) must cover the prefix ({q_start}) and the chunk ({n})")
    if len(patterns) != hq:
        raise ValueError(f"{len(patterns)} head patterns for {hq} query heads")
    group = hq // hkv
    tiles = -(-n // tile)
    dev, dt = q.device, q.dtype
    causal_pairs = n * q_start + n * (n + 1) // 2
    tail = torch.zeros(tiles, dtype=torch.long, device=dev)
    tail[-1] = tiles * tile - n  # zero keys behind the partial last tile's diagonal
    hide = torch.finfo(dt).min / 2  # additive mask on front padding: finite, so an all-padding prefix is no NaN
    out = torch.empty((n, hq, d), dtype=dt, device=dev)
    padded: list[torch.Tensor] = []  # keys and values per KV head plus a zero row (index `length`); torch path only
    work = 0
    for g in range(hkv):
        heads = slice(g * group, (g + 1) * group)
        lists = None
        if length > dense_up_to and not any(_is_dense(p, length) for p in patterns[heads]):
            sel = select_group(patterns[heads], q[:, heads], k[:, g], q_start, native, tile=tile)
            lists = group_keys(sel, q_start, n, tile, native)
        if lists is None or lists[2] > dense_above * causal_pairs:
            _dense_group(q[:, heads], k[:, g], v[:, g], out[:, heads], native)
            work += causal_pairs * group
            continue
        cols, counts, pairs = lists  # kept key indices, tile by tile, ascending within each; their count per tile
        work += pairs * group
        if native and sparse_attention(
            q[:, heads], k[:, g : g + 1], v[:, g : g + 1], out[:, heads], 0, tile, cols, counts
        ):
            continue
        if not padded:
            padded = [torch.cat([t, t.new_zeros((1, hkv, d))]).transpose(0, 1).contiguous() for t in (k, v)]
        kh, vh = padded
        # the group's queries and outputs in whole tiles: [tile, group head, row, D]
        qt = F.pad(q[:, heads], (0, 0, 0, 0, 0, tiles * tile - n)).view(tiles, tile, group, d).transpose(1, 2)
        ot = torch.empty((tiles, group, tile, d), dtype=dt, device=dev)
        total = counts + tail
        first = torch.cumsum(counts, 0) - counts  # where each tile's keys start in `cols`
        order = torch.argsort(total)  # batch tiles of similar width: little front padding
        widths = total[order].tolist()
        b0 = 0
        while b0 < tiles:
            b1 = b0 + 1
            while b1 < tiles and (b1 + 1 - b0) * widths[b1] <= max_keys:
                b1 += 1
            ids, wide = order[b0:b1], widths[b1 - 1]
            # position p of a tile's key list holds its kept key p - shift, where shift = wide - total (front pad)
            shift = wide - total[ids]
            src = torch.arange(wide, device=dev)[None, :] - shift[:, None]
            real = (src >= 0) & (src < counts[ids, None])
            picked = cols[(first[ids, None] + src).clamp(0, cols.shape[0] - 1)]  # every tile keeps its diagonal
            ix = torch.where(real, picked, length).flatten()
            kt = kh[g].index_select(0, ix).view(b1 - b0, 1, wide, d)
            vt = vh[g].index_select(0, ix).view(b1 - b0, 1, wide, d)
            pad = src[:, : wide - tile] < 0  # front padding lies in the part every row sees
            if _fused_cpu(dev):  # the kept keys, then the tile's own diagonal block: no causal mask to build
                mask = torch.zeros(pad.shape, dtype=dt, device=dev).masked_fill_(pad, hide)[:, None, None]
                ot[ids] = bottom_right_causal_attention(qt[ids], kt, vt, prefix_mask=mask)
            else:
                shape = (b1 - b0, group, wide, d)
                causal = torch.ones((tile, wide), dtype=torch.bool, device=dev).tril(wide - tile)
                allowed = causal & ~F.pad(pad, (0, tile))[:, None, None]  # [batch, 1, tile, wide]
                ot[ids] = F.scaled_dot_product_attention(qt[ids], kt.expand(shape), vt.expand(shape), attn_mask=allowed)
            b0 = b1
        out[:, heads] = ot.transpose(1, 2).reshape(tiles * tile, group, d)[:n]
    return out, work
