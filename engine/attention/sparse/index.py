"""Sparse indices the Triton kernels consume, built with tensor operations on the inputs' device (no Python loop
over blocks, so a 1M-token prompt's index takes milliseconds on a GPU).

Queries come in blocks of `block` rows; a chunk's queries sit at positions q_start .. q_start + n - 1 and see keys
0 .. q_start + n - 1, so chunked prefill uses the same indices. Every block is treated as `block` rows wide (a
partial last block included): its rows past the chunk do not exist, and the extra keys that width lends the last
block's ranges only widen the superset.

Vertical-slash (`VerticalSlashIndex`): a kept diagonal o covers, for the block of rows [s, s + block), the key range
[s - o, s + block - o). Sorted diagonals whose gaps are at most `block` give touching or overlapping ranges, so they
group into segments (lo, hi) whose union is the single range [s - hi, s + block - lo), clipped to [0, L): the same
segments serve every block, and neighbouring segments' ranges never touch. Kept columns are visited separately,
only those left of the block's first row (`col_count`; or a list per block, `with_block_columns`) that no range of the
block covers: column c is covered iff
its distance d = s - c lies in (lo - block, hi] for some segment, which `covered[d]` answers. The covered region
is a superset of the exact vertical-or-slash mask; columns lie left of the block, so only ranges need a causal mask.
A-shape is the static case (sinks as columns, the window as diagonals 0 .. n_local - 1).

Block-sparse (`BlockSparseIndex`): per query block, the kept key blocks (aligned to absolute positions, `block`
keys each), sorted, with their count; and optionally per head a few kept columns (the dynamic verticals every
non-dense head keeps, see `prefill.NEEDLE_VERTICALS`), visited for a query block when they lie left of its first
row and in none of its kept key blocks (`col_skip`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BIG = 1 << 30  # padding for column and offset lists: sorts last, lies right of every block


def _column_hits(cols: torch.Tensor, visits: torch.Tensor, length: int) -> torch.Tensor:
    """bool [R, L]: row r hits key cols[c] where visits[r, c] (cols [C] key indices, visits bool [R, C])."""
    hit = torch.zeros((visits.shape[0], length + 1), dtype=torch.bool, device=visits.device)
    hit.scatter_(1, torch.where(visits, cols[None, :].clamp(max=length), length), True)
    return hit[:, :length]


@dataclass
class TileTable:
    """A vertical-slash index's key ranges as one flat list of key tiles per head, the same for every query block
    (the flat-loop kernel's input): tile i of head h covers keys [s + start[h, i], s + min(start[h, i] + tile_n,
    end[h, i])) for the block whose first row is s, clipped to [0, L). Tiles of a range are tile_n keys wide, the
    last one ending at the range's end; ranges come in ascending key order. first[h, b]: tiles lying wholly left
    of key 0 for block b (a prefix of the list), which the kernel skips."""

    tile_n: int
    start: torch.Tensor  # int32 [H, T]: first key of each tile, relative to the block's first row
    end: torch.Tensor  # int32 [H, T]: end of the tile's range, relative likewise
    count: torch.Tensor  # int32 [H]: tiles of each head
    first: torch.Tensor  # int32 [H, blocks]


@dataclass
class VerticalSlashIndex:
    block: int
    q_start: int
    n: int  # query rows in the chunk
    seg_lo: torch.Tensor  # int32 [H, S]: smallest diagonal offset of each segment (padding: BIG)
    seg_hi: torch.Tensor  # int32 [H, S]: largest offset of each segment
    seg_count: torch.Tensor  # int32 [H]
    columns: torch.Tensor  # int32 [H, C]: kept columns, sorted, padded with BIG (per block: see col_first)
    col_count: torch.Tensor  # int32 [H, blocks]: columns left of each block's first row
    covered: torch.Tensor  # uint8 [H, L + 1]: 1 where a column at that distance left of a block is in its ranges
    # int32 [H, blocks]: where block b's columns start in columns[h] (0 for a head's one sorted list; a head with
    # columns per block, `with_block_columns`, has each block's list in turn)
    col_first: torch.Tensor

    @property
    def length(self) -> int:
        return self.q_start + self.n

    @property
    def num_blocks(self) -> int:
        return -(-self.n // self.block)

    def ranges(self, head: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(starts, ends) of block b's key ranges for a head, ascending; empty ones dropped."""
        s = self.q_start + b * self.block
        count = int(self.seg_count[head])
        lo, hi = self.seg_lo[head, :count].long(), self.seg_hi[head, :count].long()
        starts = (s - hi).clamp(min=0)
        ends = (s + self.block - lo).clamp(max=self.length)
        keep = ends > starts
        return starts[keep].flip(0), ends[keep].flip(0)

    def tile_table(self, tile_n: int) -> TileTable:
        """The key tiles of every block's ranges as one flat list per head (see TileTable)."""
        device = self.seg_lo.device
        heads, segs = self.seg_lo.shape
        real = torch.arange(segs, device=device)[None, :] < self.seg_count[:, None].long()
        # segments in descending offset order: their key ranges come in ascending key order
        lo = self.seg_lo.long().flip(1)
        hi = self.seg_hi.long().flip(1)
        real = real.flip(1)
        per_seg = torch.where(real, (hi - lo + self.block + tile_n - 1) // tile_n, 0)  # tiles of each range
        ends = per_seg.cumsum(dim=1)  # [H, S]: tiles up to and including each segment
        count = ends[:, -1]
        width = max(1, int(count.max()))
        i = torch.arange(width, device=device)[None, :].expand(heads, -1).contiguous()
        seg = torch.searchsorted(ends, i, right=True).clamp(max=segs - 1)  # each tile's segment
        t = i - (ends.gather(1, seg) - per_seg.gather(1, seg))  # its place in the segment's range
        valid = i < count[:, None]
        start = torch.where(valid, t * tile_n - hi.gather(1, seg), 0)
        end = torch.where(valid, self.block - lo.gather(1, seg), 0)
        # a tile's keys end (relative to a block's first row) at min(start + tile_n, end), non-decreasing along the
        # list (segments are at least a block apart): the tiles left of key 0 for a block are a prefix
        stop = torch.where(valid, torch.minimum(start + tile_n, end), BIG)
        s0 = self.q_start + self.block * torch.arange(self.num_blocks, device=device)
        first = torch.searchsorted(stop, (-s0)[None, :].expand(heads, -1).contiguous(), right=True)
        i32 = torch.int32
        return TileTable(tile_n, start.to(i32), end.to(i32), count.to(i32), first.to(i32))

    def block_columns(self, head: int, b: int) -> torch.Tensor:
        """The columns the kernel visits for block b: left of it and in none of its ranges."""
        s = self.q_start + b * self.block
        first = int(self.col_first[head, b])
        cols = self.columns[head, first : first + int(self.col_count[head, b])].long()
        return cols[self.covered[head, s - cols] == 0]

    def rows_mask(self, head: int, rows: torch.Tensor) -> torch.Tensor:
        """bool [R, L]: the keys the kernel attends to for chunk rows `rows` of a head, causal (for recall)."""
        device = self.columns.device
        rows = rows.to(device)
        length = self.length
        s = self.q_start + (rows // self.block) * self.block  # each row's block start
        count = int(self.seg_count[head])
        lo, hi = self.seg_lo[head, :count].long(), self.seg_hi[head, :count].long()
        starts = (s[:, None] - hi[None, :]).clamp(min=0)
        ends = (s[:, None] + self.block - lo[None, :]).clamp(max=length)
        real = ends > starts
        diff = torch.zeros((len(rows), length + 1), dtype=torch.int32, device=device)
        diff.scatter_add_(1, torch.where(real, starts, length), real.to(torch.int32))
        diff.scatter_add_(1, torch.where(real, ends, length), -real.to(torch.int32))
        out = diff.cumsum(dim=1)[:, :length] > 0
        cols = self.columns[head].long()
        place = torch.arange(len(cols), device=device)[None, :]
        first = self.col_first[head, rows // self.block][:, None]
        visits = (place >= first) & (place < first + self.col_count[head, rows // self.block][:, None])
        dist = (s[:, None] - cols[None, :]).clamp(min=0, max=length)
        visits &= self.covered[head][dist] == 0
        out |= _column_hits(cols, visits, length)
        return out & (torch.arange(length, device=device)[None, :] <= (self.q_start + rows)[:, None])

    def mask(self, head: int) -> torch.Tensor:
        """bool [n, L]: the (row, key) pairs the kernel attends to for a head, causal."""
        return self.rows_mask(head, torch.arange(self.n, device=self.columns.device))


def _pad_sorted(values: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
    """[H, K] -> sorted int64 with entries at rank >= counts[h] (and negative ones) replaced by BIG."""
    values = values.long()
    if counts is not None:
        rank = torch.arange(values.shape[1], device=values.device)[None, :]
        values = torch.where(rank < counts[:, None].to(values.device), values, BIG)
    return torch.where(values < 0, BIG, values).sort(dim=1).values


def build_vertical_slash_index(
    columns: torch.Tensor,
    offsets: torch.Tensor,
    q_start: int,
    n: int,
    block: int = 64,
    column_counts: torch.Tensor | None = None,
    offset_counts: torch.Tensor | None = None,
    merge: int | None = None,
) -> VerticalSlashIndex:
    """columns [H, C] and offsets [H, S] (any order, distinct per head; a head uses its first `*_counts[h]` entries
    when counts are given). The nearest `block` diagonals must be among each head's offsets (the estimators always
    keep 100): then every key inside a query block is covered by a range.

    Sorted offsets at most `merge` apart (default block + block / 2) form one segment, so one key range per query
    block. Above `block` apart two ranges would not overlap; joining them across a gap of up to block / 2 keys costs
    a few more keys but fewer loop iterations: on the sparse-attention benchmark's 128K inputs (budgets [1000,
    6096]) it cut the segments per query block by 20-23% and the key tiles the kernel runs by 2-5%, for block 64 and
    128 with 64- and 128-key tiles (merging at `block` apart: 104-174 segments a block, 71-81% of them one or two
    tiles long, each a separate short loop)."""
    if columns.dim() == 1:
        columns, offsets = columns[None], offsets[None]
    device = columns.device
    length = q_start + n
    heads = columns.shape[0]
    offs = _pad_sorted(offsets, offset_counts)
    local = min(block, length)
    if offs.shape[1] < local or bool((offs[:, :local] != torch.arange(local, device=device)).any()):
        raise ValueError(f"offsets must include the nearest {block} diagonals (0..{block - 1})")
    cols = _pad_sorted(columns, column_counts)
    # segments: runs of sorted offsets with gaps of at most `merge` (padding, all BIG, forms the last run)
    merge = block + block // 2 if merge is None else merge
    if merge < block:
        raise ValueError(f"merge ({merge}) must be at least the block ({block}): nearer segments' ranges overlap")
    new_seg = torch.ones_like(offs, dtype=torch.bool)
    new_seg[:, 1:] = (offs[:, 1:] - offs[:, :-1]) > merge
    seg_id = new_seg.long().cumsum(dim=1) - 1
    num_seg = int(seg_id[:, -1].max()) + 1
    seg_lo = torch.full((heads, num_seg), BIG, dtype=torch.long, device=device)
    seg_hi = torch.full((heads, num_seg), BIG, dtype=torch.long, device=device)
    seg_lo.scatter_reduce_(1, seg_id, offs, reduce="amin", include_self=False)
    seg_hi.scatter_reduce_(1, seg_id, offs, reduce="amax", include_self=False)
    seg_count = (seg_lo < BIG).sum(dim=1)
    # covered[d] for distances 1 .. L: d in (lo - block, hi] for some real segment (a difference array)
    real = seg_lo < BIG
    first = (seg_lo - block + 1).clamp(min=1, max=length + 1)
    last = (seg_hi + 1).clamp(max=length + 1)
    diff = torch.zeros((heads, length + 2), dtype=torch.int32, device=device)
    ones = real.to(torch.int32)
    diff.scatter_add_(1, torch.where(real, first, length + 1), ones)
    diff.scatter_add_(1, torch.where(real, last, length + 1), -ones)
    covered = (diff.cumsum(dim=1)[:, : length + 1] > 0).to(torch.uint8)
    starts = q_start + block * torch.arange(-(-n // block), device=device)
    col_count = torch.searchsorted(cols, starts[None, :].expand(heads, -1).contiguous())
    i32 = torch.int32
    return VerticalSlashIndex(
        block, q_start, n, seg_lo.clamp(max=BIG).to(i32), seg_hi.clamp(max=BIG).to(i32), seg_count.to(i32),
        cols.clamp(max=BIG).to(i32), col_count.to(i32), covered, torch.zeros_like(col_count, dtype=i32),
    )  # fmt: skip


def with_block_columns(
    index: VerticalSlashIndex, heads: list[int], chosen: list[tuple[torch.Tensor, torch.Tensor]]
) -> VerticalSlashIndex:
    """The index with index heads `heads` visiting, per query block, their own columns instead of one list:
    chosen[i] = (blocks, keys), two equally long int tensors, head heads[i]'s keys per block, sorted by block and
    then key (a key list proportional to what is kept, never a [blocks, L] mask: at 1M tokens that would be 16
    GB a head). Keys not left of their block's first row are dropped: its ranges cover them. The kernel reads block
    b's list at col_first[h, b]."""
    num_blocks = index.num_blocks
    device = index.columns.device
    if len(chosen) != len(heads):
        raise ValueError(f"block columns for {len(chosen)} heads, expected {len(heads)}")
    lists, counts = [], []
    for blocks, keys in chosen:
        if blocks.shape != keys.shape or (len(blocks) and not 0 <= int(blocks.min()) <= int(blocks.max()) < num_blocks):
            raise ValueError(f"block columns: blocks and keys must pair up, blocks within 0..{num_blocks - 1}")
        left = keys < index.q_start + index.block * blocks  # left of the block's first row
        lists.append(keys[left].to(torch.int32))
        counts.append(torch.bincount(blocks[left], minlength=num_blocks))
    width = max([index.columns.shape[1], 1] + [len(x) for x in lists])
    columns = torch.full((index.columns.shape[0], width), BIG, dtype=torch.int32, device=device)
    columns[:, : index.columns.shape[1]] = index.columns
    col_count, col_first = index.col_count.clone(), index.col_first.clone()
    for h, keys, count in zip(heads, lists, counts, strict=True):
        columns[h, : len(keys)] = keys
        columns[h, len(keys) :] = BIG
        col_count[h] = count.to(torch.int32)
        col_first[h] = (count.cumsum(0) - count).to(torch.int32)
    return VerticalSlashIndex(
        index.block, index.q_start, index.n, index.seg_lo, index.seg_hi, index.seg_count, columns, col_count,
        index.covered, col_first,
    )  # fmt: skip


def build_a_shape_index(
    heads: int, q_start: int, n: int, n_init: int, n_local: int, block: int = 64, device: torch.device | None = None
) -> VerticalSlashIndex:
    """A-shape is vertical-slash with static choices: the first `n_init` columns and the nearest `n_local`
    diagonals (at least `block` of them); one kernel serves both."""
    length = q_start + n
    cols = torch.arange(min(n_init, length), device=device)[None].expand(heads, -1)
    offs = torch.arange(min(max(n_local, block), length), device=device)[None].expand(heads, -1)
    return build_vertical_slash_index(cols, offs, q_start, n, block)


@dataclass
class BlockSparseIndex:
    block: int
    q_start: int
    n: int
    blocks: torch.Tensor  # int32 [H, query blocks, K]: kept key blocks, sorted, padding BIG at the end
    count: torch.Tensor  # int32 [H, query blocks]
    columns: torch.Tensor  # int32 [H, C]: kept columns, sorted, padded with BIG (C >= 1)
    col_count: torch.Tensor  # int32 [H, query blocks]: columns left of each block's first row
    col_skip: torch.Tensor  # uint8 [H, query blocks, C]: 1 where the column lies in one of the block's kept blocks

    @property
    def length(self) -> int:
        return self.q_start + self.n

    def rows_mask(self, head: int, rows: torch.Tensor) -> torch.Tensor:
        """bool [R, L]: the keys the kernel attends to for chunk rows `rows` of a head, causal (for recall)."""
        device = self.blocks.device
        rows = rows.to(device)
        length = self.length
        nk = -(-length // self.block)
        b = rows // self.block
        kept = self.blocks[head, b].long()  # [R, K]
        valid = torch.arange(kept.shape[1], device=device)[None, :] < self.count[head, b][:, None]
        hit = torch.zeros((len(rows), nk + 1), dtype=torch.bool, device=device)
        hit.scatter_(1, torch.where(valid, kept.clamp(max=nk), nk), True)
        out = hit[:, torch.arange(length, device=device) // self.block]
        cols = self.columns[head].long()
        visits = torch.arange(len(cols), device=device)[None, :] < self.col_count[head, b][:, None]
        visits &= self.col_skip[head, b] == 0
        out |= _column_hits(cols, visits, length)
        return out & (torch.arange(length, device=device)[None, :] <= (self.q_start + rows)[:, None])

    def mask(self, head: int) -> torch.Tensor:
        """bool [n, L]: the (row, key) pairs the kernel attends to for a head, causal."""
        return self.rows_mask(head, torch.arange(self.n, device=self.blocks.device))


def build_block_sparse_index(
    kept: torch.Tensor,
    counts: torch.Tensor,
    q_start: int,
    n: int,
    block: int = 64,
    columns: torch.Tensor | None = None,
    column_counts: torch.Tensor | None = None,
) -> BlockSparseIndex:
    """kept [H, query blocks, K] key-block ids (the first counts[h, b] valid, distinct): sorted and padded.
    columns [H, C] (any order, distinct per head; the first column_counts[h] when given; negative ones ignored):
    extra keys each head keeps for every query block they lie left of."""
    device = kept.device
    heads, nq = kept.shape[0], kept.shape[1]
    rank = torch.arange(kept.shape[2], device=device)[None, None, :]
    blocks = torch.where(rank < counts[..., None], kept.long(), BIG).sort(dim=2).values
    if columns is None:
        columns = torch.full((heads, 1), -1, dtype=torch.long, device=device)
    cols = _pad_sorted(columns, column_counts)
    starts = q_start + block * torch.arange(nq, device=device)
    col_count = torch.searchsorted(cols, starts[None, :].expand(heads, -1).contiguous())
    # a column inside a kept key block of the query block is attended to there: one lookup per (block, column)
    skip = torch.empty((heads, nq, cols.shape[1]), dtype=torch.uint8, device=device)
    for h in range(heads):  # one head at a time: [nq, C] int64 temporaries (33 MB at 1M tokens)
        col_block = (cols[h] // block)[None, :].expand(nq, -1).contiguous()
        pos = torch.searchsorted(blocks[h], col_block).clamp(max=blocks.shape[2] - 1)
        skip[h] = blocks[h].gather(1, pos) == col_block
    i32 = torch.int32
    return BlockSparseIndex(
        block, q_start, n, blocks.clamp(max=BIG).to(i32), counts.to(i32),
        cols.clamp(max=BIG).to(i32), col_count.to(i32), skip,
    )  # fmt: skip
