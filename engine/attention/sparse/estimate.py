"""Online pattern estimation (MInference): which columns and diagonals (vertical-slash) or which key blocks
(block-sparse) a head attends to, from a cheap look at the prompt."""

from __future__ import annotations

from collections.abc import Sequence

import torch

SINKS = 30  # first key columns always kept (attention sinks)
LOCAL = 100  # nearest diagonals always kept (local window)


def _last_rows_softmax(q_last: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q_last [H, m, d] are the queries at the last m positions of k [L, d]: their causal softmax (fp32) [H, m, L]."""
    m, d = q_last.shape[1], q_last.shape[2]
    length = k.shape[0]
    scores = (q_last.float() * d**-0.5) @ k.float().T  # [H, m, L] (scaling the m queries, not the m x L scores)
    # causality only bites in the last m columns: query i (position L - m + i) cannot see those right of it
    tail = torch.ones((m, m), dtype=torch.bool, device=k.device).triu(diagonal=1)
    scores[:, :, length - m :].masked_fill_(tail, float("-inf"))
    return scores.softmax(dim=-1)


def vertical_scores(q_last: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Heads sharing keys: q_last [H, m, d] are the queries at the last m positions of k [L, d]. Their causal
    softmax (fp32) summed per column: [H, L]."""
    return _last_rows_softmax(q_last, k).sum(dim=1)


def vertical_slash_scores(q_last: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As `vertical_scores`, and the softmax summed per diagonal offset i - j too (slash scores [H, L])."""
    h, m = q_last.shape[0], q_last.shape[1]
    length = k.shape[0]
    probs = _last_rows_softmax(q_last, k)
    vertical = probs.sum(dim=1)
    # Slash: S[o] = sum_i P[i, L - m + i - o]. Read with row stride L + 1, the rows line up along diagonals:
    # view[i, u] = P[i, i + u], so S[o] = sum_i view[i, L - m - o] for o <= L - m (every such entry lies inside
    # row i). The last m - 1 offsets reach left of key 0 for the first rows; they only touch the first m columns,
    # summed the same way over a copy of those with m zero columns in front.
    width = length - m + 1
    skewed = probs.as_strided((h, m, width), (m * length, length + 1, 1), storage_offset=probs.storage_offset())
    near = skewed.sum(dim=1).flip(-1)  # offsets 0 .. L - m
    # offset L - m + t (t = 1 .. m - 1) is sum_i P[i, i - t] = sum_i head[i, m + i - t] = sum_i far[i, m - 1 - t]
    head = torch.nn.functional.pad(probs[:, :, :m], (m, 0))  # [H, m, 2m]: column c of the first m at m + c
    far = head.as_strided((h, m, m - 1), (2 * m * m, 2 * m + 1, 1), storage_offset=head.storage_offset() + 1)
    return vertical, torch.cat([near, far.sum(dim=1).flip(-1)], dim=1)


def top_columns(vertical: torch.Tensor, k_v: int, sinks: int = SINKS) -> torch.Tensor:
    """One head's kept columns (sorted) from its vertical scores [L]: the top k_v, the first `sinks` forced."""
    return column_union(vertical[None], [k_v], sinks).nonzero().squeeze(1)


def _forced(scores: torch.Tensor, first: int) -> torch.Tensor:
    """A copy of scores [..., L] with the first `first` entries of each row ranked above all others."""
    scores = scores.clone()
    scores[..., : min(first, scores.shape[-1])] = float("inf")
    return scores


def top_union(scores: torch.Tensor, counts: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """bool [L]: the union over rows of scores [S, L] of row s's counts[s] largest entries (one top-k for all: the
    widest count's, each row keeping its own prefix)."""
    width = scores.shape[-1]
    counts = torch.as_tensor(counts, device=scores.device).clamp(min=0, max=width)
    widest = int(counts.max()) if counts.numel() else 0
    order = scores.topk(widest, dim=-1).indices  # sorted, largest first
    chosen = order[torch.arange(widest, device=scores.device)[None, :] < counts[:, None]]
    return torch.zeros(width, dtype=torch.bool, device=scores.device).index_fill_(0, chosen, True)


def _run_sums(slash: torch.Tensor, group: int) -> torch.Tensor:
    """Slash scores [..., L] summed over runs of `group` neighbouring offsets: [..., ceil(L / group)]."""
    length = slash.shape[-1]
    runs = -(-length // group)
    padded = torch.nn.functional.pad(slash, (0, runs * group - length))
    return padded.view(*slash.shape[:-1], runs, group).sum(dim=-1)


def column_union(vertical: torch.Tensor, k_v: Sequence[int] | torch.Tensor, sinks: int = SINKS) -> torch.Tensor:
    """bool [L]: the columns heads keep, from their vertical scores [S, L]: head s's top k_v[s], the first `sinks`
    forced (one top-k for all the heads)."""
    counts = torch.as_tensor(k_v, device=vertical.device).clamp(min=sinks)
    return top_union(_forced(vertical, sinks), counts)


def diagonal_union(
    slash: torch.Tensor, k_s: Sequence[int] | torch.Tensor, local: int = LOCAL, slash_group: int = 1
) -> torch.Tensor:
    """bool [L] over offsets: the diagonals heads keep, from their slash scores [S, L]: head s's top k_s[s], the
    nearest `local` forced. `slash_group` > 1 keeps diagonals in runs of that many neighbouring offsets (the
    best-scoring runs, about k_s offsets in all): the CPU path attends to a run as one band of keys, where
    scattered single diagonals would each cost a tile-wide range."""
    wanted = torch.as_tensor(k_s, device=slash.device).clamp(min=local)
    forced = _forced(slash, local)
    if slash_group <= 1:
        return top_union(forced, wanted)
    runs = top_union(_run_sums(forced, slash_group), -(-wanted // slash_group))
    return runs.repeat_interleave(slash_group)[: slash.shape[-1]]


def pick_vertical_slash(
    vertical: torch.Tensor,
    slash: torch.Tensor,
    k_v: int,
    k_s: int,
    sinks: int = SINKS,
    local: int = LOCAL,
    slash_group: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One head's kept (columns, offsets), sorted, from its scores [L]: `column_union` and `diagonal_union` for
    one head."""
    columns = column_union(vertical[None], [k_v], sinks)
    offsets = diagonal_union(slash[None], [k_s], local, slash_group)
    return columns.nonzero().squeeze(1), offsets.nonzero().squeeze(1)


def covering_count(scores: torch.Tensor, share: float | torch.Tensor) -> torch.Tensor:
    """Per row of scores [..., L] (non-negative): how many of its largest entries it takes for their sum to reach
    `share` of the row's total (at least 1; every entry for a share of 1 or more); share: one for all rows or one
    per row [...]. Returns [...] long."""
    width = scores.shape[-1]
    if not isinstance(share, torch.Tensor) and share >= 1:  # a plain number: no device round trip to decide
        return torch.full(scores.shape[:-1], width, dtype=torch.long, device=scores.device)
    share = torch.as_tensor(share, dtype=torch.float32, device=scores.device)
    ranked = scores.sort(dim=-1, descending=True).values.cumsum(dim=-1)
    count = ((ranked < share[..., None] * ranked[..., -1:]).sum(dim=-1) + 1).clamp(max=width)
    return torch.where(share >= 1, width, count)


def coverage_budgets(
    vertical: torch.Tensor,
    slash: torch.Tensor,
    vertical_share: float | torch.Tensor,
    slash_share: float | torch.Tensor,
    sinks: int = SINKS,
    local: int = LOCAL,
    slash_group: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coverage heads' (k_v, k_s) for `column_union` and `diagonal_union`, from their scores [S, L] and shares
    (one, or one per head [S]): the fewest columns whose scores reach `vertical_share` of the head's total and the
    fewest diagonals (runs of `slash_group`) reaching `slash_share`, each plus the sinks or local window."""
    k_v = covering_count(vertical, vertical_share) + sinks
    k_s = covering_count(_run_sums(slash, slash_group), slash_share) * slash_group + local
    return k_v, k_s


def pick_coverage(
    vertical: torch.Tensor,
    slash: torch.Tensor,
    vertical_share: float,
    slash_share: float,
    sinks: int = SINKS,
    local: int = LOCAL,
    slash_group: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As pick_vertical_slash, with budgets from the scores themselves (`coverage_budgets`)."""
    k_v, k_s = coverage_budgets(vertical[None], slash[None], vertical_share, slash_share, sinks, local, slash_group)
    return pick_vertical_slash(vertical, slash, int(k_v[0]), int(k_s[0]), sinks, local, slash_group)


def tile_estimate(q: torch.Tensor, k: torch.Tensor, tile: int, rows: int) -> torch.Tensor:
    """Query-aware estimation (ours): q [n, H, d] a prefill chunk's queries (heads sharing k [L, d]; positions
    L - n ..). Per tile of `tile` rows, its last `rows` rows' causal softmax (fp32) summed over those rows and the
    heads: [tiles, L]. Each tile's own rows say which keys it needs, where vertical-slash extrapolates from the
    chunk's last queries to all of them."""
    n, _, d = q.shape
    length = k.shape[0]
    tiles = -(-n // tile)
    ends = (torch.arange(1, tiles + 1, device=q.device) * tile).clamp(max=n)
    picked = ends[:, None] - rows + torch.arange(rows, device=q.device)[None, :]  # [tiles, rows]
    valid = picked >= (ends[:, None] - 1) // tile * tile  # within the tile (a short tile has fewer)
    idx = picked.clamp(min=0)
    scores = torch.einsum("trhd,ld->thrl", q[idx].float() * d**-0.5, k.float())  # [tiles, H, rows, L]
    pos = (length - n + idx)[:, None, :, None]
    scores.masked_fill_(torch.arange(length, device=q.device) > pos, float("-inf"))
    probs = scores.softmax(dim=-1) * valid[:, None, :, None]
    return probs.sum(dim=(1, 2))


SHARE_BITS = 19  # float32 bits below covering_threshold's resolution (as native.c's SHARE_BITS)


def covering_threshold(scores: torch.Tensor, share: float) -> torch.Tensor:
    """Per row of scores [R, L] (non-negative float32): the largest threshold, to 1/16 of its value, such that the
    entries at or above it hold at least `share` of the row's total, from a histogram of the scores' float bits
    (sign, exponent and 4 mantissa bits: 4,096 buckets) instead of a sort: O(L) a row, for rows too long or too many
    to sort (the GPU path's per-block choice at long contexts). Keeping `(scores >= t) & (scores > 0)` is a small
    superset of `covering_keys`. The same method as native.c's tile thresholds. Returns [R] float32."""
    rows = scores.shape[0]
    if share >= 1:  # every key with any weight (a float sum stops growing before the smallest are added)
        return torch.zeros(rows, dtype=torch.float32, device=scores.device)
    buckets = 1 << (31 - SHARE_BITS)
    flat = scores.float().contiguous()
    bucket = (flat.view(torch.int32) >> SHARE_BITS).long()
    hist = torch.zeros((rows, buckets), dtype=torch.float32, device=scores.device).scatter_add_(1, bucket, flat)
    from_top = hist.flip(1).cumsum(dim=1)  # the mass at or above each bucket, top bucket first
    reached = (from_top >= share * from_top[:, -1:]).to(torch.uint8).argmax(dim=1)  # first bucket reaching it
    low = ((buckets - 1 - reached) << SHARE_BITS).to(torch.int32)
    return low.view(torch.float32)


def covering_keys(scores: torch.Tensor, share: float) -> torch.Tensor:
    """bool [..., L]: per row of scores [..., L], its fewest largest entries reaching `share` of the row's total."""
    count = covering_count(scores, share)
    order = scores.argsort(dim=-1, descending=True)
    rank = torch.arange(scores.shape[-1], device=scores.device) < count[..., None]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, rank)


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
    """One head: mean-pool q and k over `block`-token blocks (aligned to positions), score block pairs (causal at
    block level), keep the `top` key blocks per query block (the diagonal block always). q [n, d] holds the last n
    positions of k [L, d] (a prefill chunk after a cached prefix; n = L for a whole prompt). Returns bool
    [query blocks the chunk touches, key blocks]."""
    return block_sparse_union(q[:, None], k, block, [top])


def _block_means(x: torch.Tensor, lead: int, block: int) -> torch.Tensor:
    """Means over `block`-position blocks of x's rows [rows, ...] (row 0 sits `lead` positions into its block; the
    first and last blocks may be partial): [blocks, ...] in float32."""
    rows, rest = x.shape[0], x.shape[1:]
    back = -(-(lead + rows) // block) * block - lead - rows
    padded = torch.zeros((lead + rows + back, *rest), dtype=torch.float32, device=x.device)
    padded[lead : lead + rows] = x
    counts = torch.full((padded.shape[0] // block,), float(block), device=x.device)
    counts[0] -= lead
    counts[-1] -= back
    sums = padded.view(-1, block, *rest).sum(dim=1)
    return sums / counts.view(-1, *([1] * len(rest)))


def block_sparse_union(q: torch.Tensor, k: torch.Tensor, block: int, tops: Sequence[int]) -> torch.Tensor:
    """`estimate_block_sparse_mask` for several heads sharing k: q [n, H, d] (head h keeping tops[h] key blocks per
    query block), the union of their masks. k is pooled once and the heads' block scores come from one matmul."""
    n, heads = q.shape[:2]
    if len(tops) != heads:
        raise ValueError(f"{len(tops)} block budgets for {heads} heads")
    length = k.shape[0]
    nk = -(-length // block)
    first = (length - n) // block  # the chunk's first query block
    qm = _block_means(q, length - n - first * block, block)  # [query blocks, H, d]
    km = _block_means(k, 0, block)  # [key blocks, d]
    scores = torch.einsum("bhd,kd->hbk", qm, km)  # [H, query blocks, key blocks]
    b = first + torch.arange(nk - first, device=q.device)  # each query block's position
    kb = torch.arange(nk, device=q.device)
    scores.masked_fill_(kb[None, None, :] > b[None, :, None], float("-inf"))
    scores[:, torch.arange(nk - first, device=q.device), b] = float("inf")
    widest = min(max(tops), nk)
    picked = scores.topk(widest, dim=2).indices  # row r: its first min(top, b + 1) picks are causal
    budget = torch.tensor(tops, device=q.device).clamp(max=widest)
    limit = torch.minimum(budget[:, None], b[None, :] + 1)  # [H, query blocks]
    valid = torch.arange(widest, device=q.device)[None, None, :] < limit[:, :, None]
    mask = torch.zeros((nk - first, nk + 1), dtype=torch.bool, device=q.device)
    rows = torch.arange(nk - first, device=q.device)[None, :, None].expand_as(picked)
    mask[rows.reshape(-1), torch.where(valid, picked, nk).reshape(-1)] = True
    return mask[:, :nk]


def estimate_block_sparse(q: torch.Tensor, k: torch.Tensor, block: int = 64, top: int = 100) -> list[torch.Tensor]:
    """`estimate_block_sparse_mask` as kept key-block indices per query block (sorted)."""
    return [row.nonzero().squeeze(1) for row in estimate_block_sparse_mask(q, k, block, top)]
