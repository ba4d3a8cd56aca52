"""Synthetic inputs shared by the CPU and GPU query-aware tests."""

from __future__ import annotations

import torch


def needle_per_tile(
    n: int = 512, d: int = 32, q_start: int = 1024, tile: int = 64, seed: int = 7
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """q [n, 1, d] (positions q_start ..), k/v [q_start + n, 1, d], and per tile of `tile` rows a needle: a key far
    back in the cached prefix (key 100 + 90 t for tile t) along a direction only that tile's queries share, so
    each tile attends to its own needle and to no other tile's."""
    g = torch.Generator().manual_seed(seed)
    length = q_start + n
    q = torch.randn(n, 1, d, generator=g) * 0.3
    k = torch.randn(length, 1, d, generator=g) * 0.3
    v = torch.randn(length, 1, d, generator=g)
    needles = [100 + 90 * t for t in range(n // tile)]
    directions = torch.linalg.qr(torch.randn(d, len(needles), generator=g))[0].T * d**0.5  # orthogonal
    for t, key in enumerate(needles):
        q[t * tile : (t + 1) * tile, 0] += 2 * directions[t]
        k[key, 0] = 3 * directions[t]
    return q, k, v, needles
