"""Vertical-slash index: per 64-query block, the key ranges its kept diagonals cover and the kept columns left of
them. Kernels (and the reference) attend to exactly these keys; the covered set is a superset of the exact
vertical-or-slash mask (a diagonal contributes a whole 64-wide range to its block)."""

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
