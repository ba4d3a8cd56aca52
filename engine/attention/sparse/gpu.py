"""Sparse prefill attention with the Triton kernels (the CUDA path; `prefill.py` is the CPU one).

For one prefill chunk (queries at positions q_start .. q_start + n - 1, keys 0 .. q_start + n - 1), `plan` estimates
each head's pattern and builds the kernels' indices with tensor operations on the device; `run` launches one
vertical-slash kernel for the vertical-slash, A-shape and dense heads and one block-sparse kernel for block-sparse
heads, into one output. Same choices as the CPU path, per head rather than per KV group:

- vertical-slash: the chunk's last 64 queries' causal softmax against every key; the top max(k_v, 256) columns
  (the first 30 forced) and the top max(k_s, 100) diagonals (the nearest 100 forced), as MInference keeps them.
  The softmax's column and diagonal sums come from torch (per KV group) or, opt-in, from two fused Triton passes
  (`estimate_kernels`, `ESTIMATOR`).
- A-shape: the first k_v columns and the nearest max(k_s, 64) diagonals, plus 256 estimated columns (as the CPU
  path adds: a passkey or a name a later question needs is a column that no static pattern holds).
- coverage (vertical-slash with budgets from the scores): the first 30 columns and nearest 100 diagonals, then
  the fewest further columns and diagonals whose scores reach the head's shares (per mille) of its totals.
- query-aware (the CPU path's per-tile choice, per head here): per block of query rows, the fewest keys holding the
  head's share of its last a rows' attention, visited as that block's own column list (`with_block_columns`), plus
  the first 30 columns and the nearest max(100, block) diagonals.
- dense (an A-shape head whose sinks cover the whole context, as `search-patterns` writes for heads that need
  everything): every diagonal, no columns.
- block-sparse: mean-pooled 64-query blocks of the chunk against 64-key blocks, causal at block level, the top k_v
  key blocks per query block (those holding the block's own rows always), plus 256 estimated columns (as A-shape:
  without them a passkey prompt's answer changes, measured on the default model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import PER_MILLE, HeadPattern
from .estimate import (
    LOCAL,
    SINKS,
    covering_count,
    covering_threshold,
    tile_estimate,
    vertical_scores,
    vertical_slash_scores,
)
from .index import (
    BlockSparseIndex,
    VerticalSlashIndex,
    build_block_sparse_index,
    build_vertical_slash_index,
    with_block_columns,
)
from .prefill import NEEDLE_VERTICALS

BLOCK = 64  # query rows per kernel program (vertical-slash: `plan(block=)` may widen it); block-sparse blocks
LAST_Q = 64  # queries the vertical-slash estimate looks at


@dataclass
class SparsePlan:
    """Indices for one chunk: `vs` covers query heads `vs_heads` (index head i is query head vs_heads[i]), `bs`
    covers `bs_heads`; either may be None."""

    vs_heads: torch.Tensor | None
    vs: VerticalSlashIndex | None
    bs_heads: torch.Tensor | None
    bs: BlockSparseIndex | None

    def rows_mask(self, head: int, rows: torch.Tensor) -> torch.Tensor:
        """bool [R, L]: the keys query head `head` attends to at chunk rows `rows`."""
        for heads, index in ((self.vs_heads, self.vs), (self.bs_heads, self.bs)):
            if heads is not None and index is not None and head in heads.tolist():
                return index.rows_mask(heads.tolist().index(head), rows)
        raise ValueError(f"head {head} is in no index of this plan")


def _topk_with_forced(
    scores: torch.Tensor, forced: torch.Tensor, counts: torch.Tensor, width: int | None = None
) -> torch.Tensor:
    """Per row of scores [H, L]: the first forced[h] entries, then the best others, counts[h] in all; [H, max
    count] with -1 past each row's count. width: the largest count where the caller knows it (else read back)."""
    length = scores.shape[1]
    pos = torch.arange(length, device=scores.device)[None, :]
    scores = torch.where(pos < forced[:, None], float("inf"), scores)
    width = int(counts.max()) if width is None else width
    picked = scores.topk(width, dim=1).indices
    rank = torch.arange(width, device=scores.device)[None, :]
    return torch.where(rank < counts[:, None], picked, -1)


ESTIMATORS = ("torch", "triton")
# The vertical/slash estimate's implementation: torch (a [H, 64, L] float32 softmax, read and written several
# times per chunk) or triton (`estimate_kernels`: two passes, nothing of that size stored). Both give the same
# scores (tested); triton stays opt-in (`plan(estimator=)`, `bench sparse-attention --estimators`) until a GPU run
# times it against torch.
ESTIMATOR = "torch"


def _scores(
    q: torch.Tensor,
    k: torch.Tensor,
    heads: list[int],
    needs: list[bool],
    slashes: bool = True,
    estimator: str = ESTIMATOR,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertical and slash scores [len(heads), L] of the chunk's last LAST_Q queries (zeros where not `needs`; slash
    scores all zeros without `slashes`); the heads of one KV group share its keys: one estimate for those of them
    that need it (triton: one launch for every head that needs it)."""
    n, hq, _ = q.shape
    length, hkv, _ = k.shape
    group = hq // hkv
    vertical = torch.zeros((len(heads), length), device=q.device)
    slash = torch.zeros((len(heads), length), device=q.device)
    m = min(LAST_Q, n)
    if estimator == "triton":
        from .estimate_kernels import vertical_slash_scores_triton

        rows = [i for i in range(len(heads)) if needs[i]]
        if rows:
            q_last = q[n - m :, [heads[i] for i in rows]].transpose(0, 1)
            found = vertical_slash_scores_triton(q_last, k, [heads[i] // group for i in rows])
            vertical[rows] = found[0]
            if slashes:
                slash[rows] = found[1]
        return vertical, slash
    for g in range(hkv):
        rows = [i for i, h in enumerate(heads) if h // group == g and needs[i]]
        if rows:
            q_last = q[n - m :, [heads[i] for i in rows]].transpose(0, 1)
            if slashes:
                vertical[rows], slash[rows] = vertical_slash_scores(q_last, k[:, g])
            else:
                vertical[rows] = vertical_scores(q_last, k[:, g])
    return vertical, slash


def _vertical_slash_index(
    q: torch.Tensor,
    k: torch.Tensor,
    q_start: int,
    patterns: Sequence[HeadPattern],
    heads: list[int],
    block: int,
    estimator: str,
) -> VerticalSlashIndex:
    n = q.shape[0]
    length = k.shape[0]
    device = q.device

    def budget(p: HeadPattern) -> tuple[int, int, int, int]:
        """(forced columns, columns, forced diagonals, diagonals) for one head, clipped to the context."""
        if p.kind == "a_shape" and p.a >= length:  # dense
            c_forced, c_count, o_forced, o_count = 0, 0, length, length
        elif p.kind == "a_shape":
            window = max(p.b, block)
            c_forced, c_count, o_forced, o_count = p.a, p.a + NEEDLE_VERTICALS, window, window
        elif p.kind == "coverage":  # counts follow the scores (below); estimated like vertical-slash
            c_forced, c_count, o_forced, o_count = SINKS, SINKS + 1, max(LOCAL, block), max(LOCAL, block)
        elif p.kind == "query_aware":  # the local window; its columns come per block (below)
            c_forced, c_count, o_forced, o_count = 0, 0, max(LOCAL, block), max(LOCAL, block)
        else:
            c_forced, c_count = SINKS, max(p.a, NEEDLE_VERTICALS, SINKS)
            o_forced, o_count = max(LOCAL, block), max(p.b, LOCAL, block)
        return tuple(min(x, length) for x in (c_forced, c_count, o_forced, o_count))  # type: ignore[return-value]

    # decided on the host from the budgets' Python values (reading them back from the device would wait for the
    # GPU once per head: 64 of a 4K chunk's 69 waits on 32 heads before this)
    raw = [budget(patterns[h]) for h in heads]
    budgets = torch.tensor(raw, device=device)
    needs = [b[1] > b[0] for b in raw]
    vertical, slash = _scores(q, k, heads, needs, estimator=estimator)
    # coverage heads: the forced ones, then the fewest that reach the head's share of its scores (all such heads in
    # one sort per kind of score: per head, the loop's operators were most of a 32-head plan's launches); their
    # counts follow the scores, known only on the device
    cover = [i for i, h in enumerate(heads) if patterns[h].kind == "coverage"]
    if cover:
        at = torch.tensor(cover, device=device)
        for score, share, base, col in ((vertical, "a", 0, 1), (slash, "b", 2, 3)):
            shares = torch.tensor([getattr(patterns[heads[i]], share) / PER_MILLE for i in cover], device=device)
            budgets[at, col] = (budgets[at, base] + covering_count(score[at], shares)).clamp(max=length)
    widths = (None, None) if cover else (max(b[1] for b in raw), max(b[3] for b in raw))
    # (a coverage head's column count only grows from its host budget: the host values say whether any is kept)
    any_columns = max(b[1] for b in raw) > 0
    columns = _topk_with_forced(vertical, budgets[:, 0], budgets[:, 1], widths[0]) if any_columns else None
    offsets = _topk_with_forced(slash, budgets[:, 2], budgets[:, 3], widths[1])
    if columns is None:
        columns = torch.full((len(heads), 1), -1, dtype=torch.long, device=device)
    index = build_vertical_slash_index(columns, offsets, q_start, n, block)
    aware = [i for i, h in enumerate(heads) if patterns[h].kind == "query_aware"]
    if aware:
        chosen = [_query_aware_keys(q, k, heads[i], patterns[heads[i]], block) for i in aware]
        index = with_block_columns(index, aware, chosen)
    return index


def _query_aware_keys(
    q: torch.Tensor, k: torch.Tensor, head: int, p: HeadPattern, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, keys) sorted by block, then key: per block of `block` chunk rows, the keys holding p.b per mille of
    its last p.a rows' attention (the CPU path's choice, one head at a time; the threshold from a histogram, not a
    sort: `covering_threshold`), and the sinks. The estimate runs over groups of blocks so that its [blocks, rows,
    keys] scores stay near 2^26 floats at any context."""
    n, hq, _ = q.shape
    length = k.shape[0]
    q_start, g = length - n, head // (hq // k.shape[1])
    blocks, rows = -(-n // block), min(p.a, block)  # a block has no more rows to sample
    step = max(1, (1 << 26) // (rows * length))
    found: list[tuple[torch.Tensor, torch.Tensor]] = []
    for b0 in range(0, blocks, step):
        r0, r1 = b0 * block, min(n, (b0 + step) * block)
        scores = tile_estimate(q[r0:r1, head : head + 1], k[: q_start + r1, g], block, rows)  # [blocks, keys]
        keep = (scores >= covering_threshold(scores, p.b / PER_MILLE)[:, None]) & (scores > 0)
        keep[:, : min(SINKS, keep.shape[1])] = True
        b, key = keep.nonzero(as_tuple=True)
        found.append((b + b0, key))
    return torch.cat([b for b, _ in found]), torch.cat([key for _, key in found])


def _block_sparse_index(
    q: torch.Tensor, k: torch.Tensor, q_start: int, patterns: Sequence[HeadPattern], heads: list[int], estimator: str
) -> BlockSparseIndex:
    n, hq, d = q.shape
    length, hkv, _ = k.shape
    group = hq // hkv
    device = q.device
    nq, nk = -(-n // BLOCK), -(-length // BLOCK)
    # query blocks of the chunk (rows q_start + b * BLOCK ..), key blocks aligned to absolute positions; pooled one
    # head at a time (a float copy of every head at 1M tokens would be 16 GB)
    q_rows = torch.full((nq,), float(BLOCK), device=device)
    q_rows[-1] = n - (nq - 1) * BLOCK
    k_rows = torch.full((nk,), float(BLOCK), device=device)
    k_rows[-1] = length - (nk - 1) * BLOCK

    def pooled(x: torch.Tensor, blocks: int, rows: torch.Tensor) -> torch.Tensor:
        """[len, d] -> [blocks, d] means over BLOCK rows (a partial last block over its own rows)."""
        padded = torch.nn.functional.pad(x.float(), (0, 0, 0, blocks * BLOCK - x.shape[0]))
        return padded.view(blocks, BLOCK, d).sum(dim=1) / rows[:, None]

    k_mean = {g: pooled(k[:, g], nk, k_rows) for g in sorted({h // group for h in heads})}
    first_row = q_start + BLOCK * torch.arange(nq, device=device)
    last_row = (first_row + BLOCK - 1).clamp(max=length - 1)
    kb = torch.arange(nk, device=device)
    visible = kb[None, :] * BLOCK <= last_row[:, None]  # [nq, nk]
    own = (kb[None, :] >= (first_row // BLOCK)[:, None]) & (kb[None, :] <= (last_row // BLOCK)[:, None])
    top = max(p.a for p in (patterns[h] for h in heads))
    width = min(top, nk)
    kept = torch.empty((len(heads), nq, width), dtype=torch.long, device=device)
    counts = torch.empty((len(heads), nq), dtype=torch.long, device=device)
    for i, h in enumerate(heads):
        scores = pooled(q[:, h], nq, q_rows) @ k_mean[h // group].T  # [nq, nk]
        scores = scores.masked_fill(~visible, float("-inf")).masked_fill(own, float("inf"))
        kept[i] = scores.topk(width, dim=1).indices
        counts[i] = visible.sum(dim=1).clamp(max=min(patterns[h].a, width))
    vertical, _ = _scores(q, k, heads, [True] * len(heads), slashes=False, estimator=estimator)
    forced = torch.full((len(heads),), min(SINKS, length), device=device)
    columns = _topk_with_forced(vertical, forced, torch.full_like(forced, min(NEEDLE_VERTICALS, length)))
    return build_block_sparse_index(kept, counts, q_start, n, BLOCK, columns)


def plan(
    q: torch.Tensor,
    k: torch.Tensor,
    q_start: int,
    patterns: Sequence[HeadPattern],
    block: int = BLOCK,
    estimator: str | None = None,
) -> SparsePlan:
    """q [n, Hq, D] (positions q_start ..), k [q_start + n, Hkv, D]: estimation and indices for every head.
    `block`: query rows per vertical-slash program (64 as MInference; 128 trades wider ranges for larger tiles).
    `estimator`: the vertical/slash scores' implementation (see ESTIMATOR; default: ESTIMATOR)."""
    estimator = ESTIMATOR if estimator is None else estimator
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r} (one of {', '.join(ESTIMATORS)})")
    n, hq, _ = q.shape
    if k.shape[0] != q_start + n:
        raise ValueError(f"keys ({k.shape[0]}) must cover the prefix ({q_start}) and the chunk ({n})")
    if len(patterns) != hq:
        raise ValueError(f"{len(patterns)} head patterns for {hq} query heads")
    for p in patterns:
        if p.kind not in ("vertical_slash", "a_shape", "block_sparse", "coverage", "query_aware"):
            raise ValueError(f"unknown sparse pattern {p.kind!r}")
    vs_heads = [h for h, p in enumerate(patterns) if p.kind != "block_sparse"]
    bs_heads = [h for h, p in enumerate(patterns) if p.kind == "block_sparse"]
    with torch.no_grad():
        vs = _vertical_slash_index(q, k, q_start, patterns, vs_heads, block, estimator) if vs_heads else None
        bs = _block_sparse_index(q, k, q_start, patterns, bs_heads, estimator) if bs_heads else None

    def ids(heads: list[int]) -> torch.Tensor | None:
        return torch.tensor(heads, dtype=torch.int32, device=q.device) if heads else None

    return SparsePlan(ids(vs_heads), vs, ids(bs_heads), bs)


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sparse: SparsePlan, loop: str = "auto") -> torch.Tensor:
    """Attention of the chunk over the plan's indices: [n, Hq, D]. loop: the vertical-slash kernel's range loop
    (see `vertical_slash_attention`; auto: the faster of the two as autotuning measures them on the GPU, nested
    where nothing is timed)."""
    from .triton_kernels import block_sparse_attention, vertical_slash_attention

    out = torch.empty_like(q)
    if sparse.vs is not None:
        vertical_slash_attention(q, k, v, sparse.vs, heads=sparse.vs_heads, out=out, loop=loop)
    if sparse.bs is not None:
        block_sparse_attention(q, k, v, sparse.bs, heads=sparse.bs_heads, out=out)
    return out


def sparse_prefill_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, patterns: Sequence[HeadPattern]
) -> torch.Tensor:
    """q [n, Hq, D] (positions q_start ..), k/v [q_start + n, Hkv, D] -> [n, Hq, D]."""
    return run(q, k, v, plan(q, k, q_start, patterns))
