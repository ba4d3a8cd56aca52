"""Online pattern estimation (MInference): which columns and diagonals (vertical-slash) or which key blocks
(block-sparse) a head attends to, from a cheap look at the prompt."""

from __future__ import annotations

import torch

SINKS = 30  # first key columns always kept (attention sinks)
LOCAL = 100  # nearest diagonals always kept (local window)


def vertical_slash_scores(q_last: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Heads sharing keys: q_last [H, m, d] are the queries at the last m positions of k [L, d]. Their causal
    softmax (fp32) summed per column (vertical scores [H, L]) and per diagonal offset i - j (slash scores [H, L])."""
    h, m, d = q_last.shape
    length = k.shape[0]
    scores = (q_last.float() * d**-0.5) @ k.float().T  # [H, m, L] (scaling the m queries, not the m x L scores)
    # causality only bites in the last m columns: query i (position L - m + i) cannot see those right of it
    tail = torch.ones((m, m), dtype=torch.bool, device=k.device).triu(diagonal=1)
    scores[:, :, length - m :].masked_fill_(tail, float("-inf"))
    # m columns of -inf in front: after the softmax they are zeros that the slash sums below read as padding
    probs = torch.nn.functional.pad(scores, (m, 0), value=float("-inf")).softmax(dim=-1)  # [H, m, m + L]
    vertical = probs[:, :, m:].sum(dim=1)
    # Slash: S[o] = sum_i P[i, (L - m + i) - o] = sum_i padded[i, L + i - o]. Reading `padded` with row stride
    # (m + L) + 1 lines each row's entries up with the previous row's shifted by one: view[i, u] = padded[i, i + u
    # + 1], so S[o] = sum_i view[i, L - 1 - o], one sum and a flip of the [H, L] result.
    width = m + length
    skewed = probs.as_strided((h, m, length), (m * width, width + 1, 1), storage_offset=probs.storage_offset() + 1)
    slash = skewed.sum(dim=1).flip(-1)
    return vertical, slash


def pick_vertical_slash(
    vertical: torch.Tensor,
    slash: torch.Tensor,
    k_v: int,
    k_s: int,
    sinks: int = SINKS,
    local: int = LOCAL,
    slash_group: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One head's kept (columns, offsets), sorted, from its scores [L]: top-k_v columns with the first `sinks`
    forced, top-k_s diagonals with the nearest `local` forced. `slash_group` > 1 keeps diagonals in runs of that
    many neighbouring offsets (the best-scoring runs, about k_s offsets in all): the CPU path attends to a run as
    one band of keys, where scattered single diagonals would each cost a tile-wide range."""
    n = vertical.shape[0]
    vertical, slash = vertical.clone(), slash.clone()
    vertical[: min(sinks, n)] = float("inf")
    slash[: min(local, n)] = float("inf")
    columns = vertical.topk(min(max(k_v, sinks), n)).indices.sort().values
    if slash_group <= 1:
        return columns, slash.topk(min(max(k_s, local), n)).indices.sort().values
    runs = -(-n // slash_group)
    pooled = torch.nn.functional.pad(slash, (0, runs * slash_group - n)).view(runs, slash_group).sum(dim=1)
    kept_runs = pooled.topk(min(-(-max(k_s, local) // slash_group), runs)).indices
    diagonals = (kept_runs[:, None] * slash_group + torch.arange(slash_group, device=slash.device)).flatten()
    return columns, diagonals[diagonals < n].sort().values


def estimate_vertical_slash(
    q: torch.Tensor,
    k: torch.Tensor,
    k_v: int,
    k_s: int,
    last_q: int = 64,
    sinks: int = SINKS,
    local: int = LOCAL,
    slash_group: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One head (q [n, d], k [n, d]): the last `last_q` queries' causal softmax over all keys in fp32; column sums
    score verticals, sums along diagonals (offset i - j) score slashes. Returns (columns, offsets), each sorted,
    with the first `sinks` columns and the nearest `local` offsets always included (see pick_vertical_slash)."""
    m = min(last_q, q.shape[0])
    vertical, slash = vertical_slash_scores(q[-m:][None], k)
    return pick_vertical_slash(vertical[0], slash[0], k_v, k_s, sinks, local, slash_group)


def estimate_block_sparse_mask(q: torch.Tensor, k: torch.Tensor, block: int = 64, top: int = 100) -> torch.Tensor:
    """One head: mean-pool q and k over `block`-token blocks, score block pairs (causal at block level), keep the
    `top` key blocks per query block (the diagonal block always). Returns bool [query blocks, key blocks]."""
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
    picked = scores.topk(min(top, nb), dim=1).indices  # row r: its first min(top, r + 1) picks are causal
    valid = torch.arange(picked.shape[1], device=q.device)[None, :] < (b + 1).clamp(max=top)[:, None]
    mask = torch.zeros((nb, nb + 1), dtype=torch.bool, device=q.device)
    mask.scatter_(1, torch.where(valid, picked, nb), True)
    return mask[:, :nb]


def estimate_block_sparse(q: torch.Tensor, k: torch.Tensor, block: int = 64, top: int = 100) -> list[torch.Tensor]:
    """`estimate_block_sparse_mask` as kept key-block indices per query block (sorted)."""
    return [row.nonzero().squeeze(1) for row in estimate_block_sparse_mask(q, k, block, top)]
