"""Sparse index: per 64-query block, key ranges (causally masked) and kept columns left of them. Kernels (and the
reference) attend to exactly these keys. Vertical-slash builds it from kept diagonals (each a 64-wide range for its
block) and columns, a superset of the exact vertical-or-slash mask; A-shape and block-sparse are expressed in the
same form, so one kernel serves all three patterns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VerticalSlashIndex:
    block: int
    range_starts: list[torch.Tensor]  # per query block: sorted starts of merged key ranges, each `block` wide or more
    range_ends: list[torch.Tensor]  # per query block: exclusive ends (merged ranges can be wider than one block)
    columns: list[torch.Tensor]  # per query block: sorted kept columns left of the block, outside every range

    def mask(self, n: int) -> torch.Tensor:
        """The [n, n] boolean mask the index covers (causal)."""
        device = self.columns[0].device if self.columns else None
        out = torch.zeros((n, n), dtype=torch.bool, device=device)
        for b, (starts, ends, cols) in enumerate(zip(self.range_starts, self.range_ends, self.columns, strict=True)):
            rows = slice(b * self.block, min(n, (b + 1) * self.block))
            for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
                out[rows, s:e] = True
            out[rows, cols] = True
        i = torch.arange(n, device=device)
        return out & (i[None, :] <= i[:, None])


def build_vertical_slash_index(
    n: int, columns: torch.Tensor, offsets: torch.Tensor, block: int = 64
) -> VerticalSlashIndex:
    """Requires the nearest `block` diagonals among `offsets` (the estimators always keep 100): then every key
    inside a query block is covered by a range, and columns only ever lie left of their block."""
    local = offsets[(offsets >= 0) & (offsets < block)].unique()
    if len(local) < min(block, n):
        raise ValueError(f"offsets must include the nearest {block} diagonals (0..{block - 1})")
    starts_out, ends_out, cols_out = [], [], []
    cols = columns.sort().values
    for b in range(-(-n // block)):
        s = b * block
        e = min(n, s + block)
        # Diagonal o covers keys i - o for i in [s, e): the range [s - o, e - o), clipped to [0, e).
        lo = (s - offsets).clamp(min=0)
        hi = (e - offsets).clamp(max=e)
        keep = hi > lo
        lo, hi = lo[keep], hi[keep]
        order = lo.argsort()
        merged_s: list[int] = []
        merged_e: list[int] = []
        for a, z in zip(lo[order].tolist(), hi[order].tolist(), strict=True):
            if merged_e and a <= merged_e[-1]:
                merged_e[-1] = max(merged_e[-1], z)
            else:
                merged_s.append(a)
                merged_e.append(z)
        starts = torch.tensor(merged_s, dtype=torch.long, device=columns.device)
        ends = torch.tensor(merged_e, dtype=torch.long, device=columns.device)
        left = cols[cols < s]
        if len(starts):
            inside = ((left[:, None] >= starts[None, :]) & (left[:, None] < ends[None, :])).any(dim=1)
            left = left[~inside]
        starts_out.append(starts)
        ends_out.append(ends)
        cols_out.append(left.unique())
    return VerticalSlashIndex(block, starts_out, ends_out, cols_out)


def build_a_shape_index(n: int, n_init: int, n_local: int, block: int = 64) -> VerticalSlashIndex:
    """A-shape is vertical-slash with static choices: the first `n_init` columns and the nearest `n_local`
    diagonals; one kernel serves both."""
    return build_vertical_slash_index(n, torch.arange(min(n_init, n)), torch.arange(min(max(n_local, block), n)), block)


def build_block_sparse_index(n: int, kept: list[torch.Tensor], block: int = 64) -> VerticalSlashIndex:
    """Block-sparse as ranges: each kept key block of a query block is a `block`-wide key range (causally masked by
    the kernel's range loop), merged where adjacent; no columns."""
    starts_out, ends_out, cols_out = [], [], []
    for blocks in kept:
        merged_s: list[int] = []
        merged_e: list[int] = []
        for b in sorted(set(blocks.tolist())):
            s, e = b * block, min(n, (b + 1) * block)
            if merged_e and s <= merged_e[-1]:
                merged_e[-1] = max(merged_e[-1], e)
            else:
                merged_s.append(s)
                merged_e.append(e)
        starts_out.append(torch.tensor(merged_s, dtype=torch.long))
        ends_out.append(torch.tensor(merged_e, dtype=torch.long))
        cols_out.append(torch.zeros(0, dtype=torch.long))
    return VerticalSlashIndex(block, starts_out, ends_out, cols_out)
