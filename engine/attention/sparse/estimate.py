"""Online pattern estimation (MInference): which columns and diagonals (vertical-slash) or which key blocks
(block-sparse) a head attends to, from a cheap look at the prompt."""

from __future__ import annotations

import torch

SINKS = 30  # first key columns always kept (attention sinks)
LOCAL = 100  # nearest diagonals always kept (local window)


def estimate_vertical_slash(
    q: torch.Tensor, k: torch.Tensor, k_v: int, k_s: int, last_q: int = 64, sinks: int = SINKS, local: int = LOCAL
) -> tuple[torch.Tensor, torch.Tensor]:
    """One head (q [n, d], k [n, d]): the last `last_q` queries' causal softmax over all keys in fp32; column sums
    score verticals, sums along diagonals (offset i - j) score slashes. Returns (columns, offsets), each sorted,
    with the first `sinks` columns and the nearest `local` offsets always included."""
    n, d = q.shape
    m = min(last_q, n)
    rows = torch.arange(n - m, n, device=q.device)
    scores = (q[-m:].float() @ k.float().T) / d**0.5
    cols = torch.arange(n, device=q.device)
    scores = scores.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
    probs = scores.softmax(dim=-1)  # [m, n]
    vertical = probs.sum(dim=0)
    offsets = (rows[:, None] - cols[None, :]).clamp(min=0)
    slash = torch.zeros(n, device=q.device).index_add_(0, offsets.flatten(), probs.flatten())
    vertical[: min(sinks, n)] = float("inf")
    slash[: min(local, n)] = float("inf")
    columns = vertical.topk(min(max(k_v, sinks), n)).indices.sort().values
    diagonals = slash.topk(min(max(k_s, local), n)).indices.sort().values
    return columns, diagonals


def estimate_block_sparse(q: torch.Tensor, k: torch.Tensor, block: int = 64, top: int = 100) -> list[torch.Tensor]:
    """One head: mean-pool q and k over `block`-token blocks, score block pairs (causal at block level), keep the
    `top` key blocks per query block (the diagonal block always). Returns kept key-block indices per query block."""
    n, d = q.shape
    nb = -(-n // block)
    pad = nb * block - n
    qp = torch.nn.functional.pad(q.float(), (0, 0, 0, pad)).view(nb, block, d)
    kp = torch.nn.functional.pad(k.float(), (0, 0, 0, pad)).view(nb, block, d)
    counts = torch.full((nb,), float(block), device=q.device)
    counts[-1] = block - pad
    qm, km = qp.sum(dim=1) / counts[:, None], kp.sum(dim=1) / counts[:, None]
    scores = qm @ km.T
    b = torch.arange(nb, device=q.device)
    scores = scores.masked_fill(b[None, :] > b[:, None], float("-inf"))
    scores[b, b] = float("inf")
    kept = []
    for row in range(nb):
        kept.append(scores[row, : row + 1].topk(min(top, row + 1)).indices.sort().values)
    return kept
