"""Sparse-prefill references: index build against brute-force masks, estimators on planted patterns, and the
masked reference reproducing dense attention at full budgets."""

from __future__ import annotations

import pytest
import torch

from optimist.engine.attention.sparse.estimate import (
    block_sparse_union,
    estimate_block_sparse,
    estimate_block_sparse_mask,
    estimate_vertical_slash,
    vertical_scores,
    vertical_slash_scores,
)
from optimist.engine.attention.sparse.index import build_vertical_slash_index, with_block_columns
from optimist.engine.attention.sparse.reference import (
    a_shape_mask,
    attention_recall,
    block_sparse_mask,
    causal_mask,
    masked_attention,
    vertical_slash_mask,
)


@pytest.mark.parametrize("seed", range(6))
def test_vertical_slash_index_covers_the_exact_mask_and_keeps_columns_left(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(100, 700, (1,), generator=g))
    q_start = int(torch.randint(0, 200, (1,), generator=g)) if seed % 2 else 0  # odd seeds: a chunk
    length = q_start + n
    columns = torch.randperm(length, generator=g)[: int(torch.randint(1, 80, (1,), generator=g))]
    extra = torch.randperm(length, generator=g)[: int(torch.randint(0, 60, (1,), generator=g))]
    offsets = torch.cat([torch.arange(64), extra]).unique()
    index = build_vertical_slash_index(columns, offsets, q_start, n, block=64)
    exact = vertical_slash_mask(length, columns, offsets)[q_start:]
    covered = index.mask(0)
    assert bool((covered | ~exact).all()), "the index must cover every key of the exact mask"
    assert int(index.seg_count[0]) <= len(offsets)
    for b in range(index.num_blocks):
        s = q_start + b * 64
        starts, ends = index.ranges(0, b)
        cols = index.block_columns(0, b)
        assert bool((cols < s).all()), "columns lie left of their query block"
        assert len(cols.unique()) == len(cols), "no duplicate columns"
        assert len(cols) <= len(columns)
        assert bool((starts[1:] > ends[:-1]).all()), "ranges are merged: sorted, disjoint, not touching"
        assert bool((ends <= length).all()) and bool((starts >= 0).all())
        for c in cols.tolist():
            assert not bool(((starts <= c) & (c < ends)).any()), "a column inside a range is listed twice"


def test_vertical_slash_index_joins_diagonal_runs_up_to_the_merge_gap() -> None:
    """Runs of kept diagonals up to block + block / 2 apart share one key range per query block (the gap's keys
    join it: a superset); farther apart they stay two."""
    local = torch.arange(64)
    near = torch.cat([local, torch.arange(159, 170)])  # 159 - 63 = 96 apart: one segment
    far = torch.cat([local, torch.arange(160, 170)])  # 97 apart: two
    for offsets, segments in ((near, 1), (far, 2)):
        index = build_vertical_slash_index(torch.tensor([0]), offsets, 0, 1000, block=64)
        assert int(index.seg_count[0]) == segments
        exact = vertical_slash_mask(1000, torch.tensor([0]), offsets)
        assert bool((index.mask(0) | ~exact).all())
    plain = build_vertical_slash_index(torch.tensor([0]), near, 0, 1000, block=64, merge=64)
    assert int(plain.seg_count[0]) == 2
    with pytest.raises(ValueError, match="merge"):
        build_vertical_slash_index(torch.tensor([0]), near, 0, 1000, block=64, merge=32)


@pytest.mark.parametrize(
    ("q_start", "block", "tile_n", "merge"), [(0, 64, 64, None), (100, 64, 32, 64), (300, 128, 64, None)]
)
def test_tile_table_lists_each_blocks_range_keys_once(q_start: int, block: int, tile_n: int, merge: int | None) -> None:
    """The flat loop's tiles, from each block's first listed one on, visit exactly the keys of the block's ranges
    (clipped to the sequence), none twice; the tiles it skips lie wholly left of key 0."""
    g = torch.Generator().manual_seed(q_start + block)
    n = 900
    length = q_start + n
    offsets = torch.stack(
        [torch.cat([torch.arange(block), block + torch.randperm(length - block, generator=g)[:60]]) for h in range(2)]
    )
    columns = torch.randperm(length, generator=g)[:20][None].expand(2, -1)
    index = build_vertical_slash_index(columns, offsets, q_start, n, block, merge=merge)
    table = index.tile_table(tile_n)
    for h in range(2):
        count = int(table.count[h])
        for b in range(index.num_blocks):
            s = q_start + b * block
            starts, ends = index.ranges(h, b)
            expected = torch.cat([torch.arange(int(a), int(e)) for a, e in zip(starts, ends, strict=True)])
            first = int(table.first[h, b])
            got = []
            for i in range(count):
                a = s + int(table.start[h, i])
                e = min(a + tile_n, s + int(table.end[h, i]), length)
                keys = torch.arange(max(a, 0), max(e, a, 0))  # empty past the sequence's end
                if i < first:
                    assert e <= 0, f"head {h} block {b}: skipped tile {i} holds keys"
                else:
                    got.append(keys)
            got_keys = torch.cat(got)
            assert len(got_keys) == len(got_keys.unique()), "a key visited twice"
            assert torch.equal(got_keys.sort().values, expected.sort().values)


def test_index_refuses_offsets_without_the_local_window() -> None:
    with pytest.raises(ValueError, match="nearest 64 diagonals"):
        build_vertical_slash_index(torch.tensor([0, 5]), torch.tensor([0, 1, 2]), 0, 200, block=64)


def planted_column(n: int = 512, d: int = 32, column: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random q/k plus one key that every query likes: a vertical line at `column`."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=g)
    q = torch.randn(n, d, generator=g) + 1.5 * direction
    k = torch.randn(n, d, generator=g) * 0.3
    k[column] = 4 * direction
    return q, k


def planted_diagonal(n: int = 512, d: int = 32, offset: int = 150, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random q/k with k_j close to q_{j + offset}: query i attends to key i - offset, a slash line."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g)
    k = torch.randn(n, d, generator=g) * 0.3
    k[: n - offset] += 2.5 * q[offset:]
    return q, k


def test_vertical_slash_estimator_recovers_planted_columns_and_diagonals() -> None:
    q, k = planted_column(column=300)
    columns, offsets = estimate_vertical_slash(q, k, k_v=40, k_s=110)
    assert 300 in columns.tolist()
    q, k = planted_diagonal(offset=150)
    columns, offsets = estimate_vertical_slash(q, k, k_v=40, k_s=110)
    assert 150 in offsets.tolist()
    assert set(range(30)) <= set(columns.tolist()), "sinks are always kept"
    assert set(range(100)) <= set(offsets.tolist()), "the local window is always kept"
    assert len(columns) == 40 and len(offsets) == 110


def test_covering_count_takes_the_fewest_largest_entries_reaching_the_share() -> None:
    from optimist.engine.attention.sparse.estimate import covering_count

    scores = torch.tensor([[5.0, 1.0, 3.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    assert covering_count(scores, 0.7).tolist() == [2, 3]  # 5 + 3 reach 7 of 10; three quarters reach 2.8 of 4
    assert covering_count(scores, 0.5).tolist() == [1, 2]
    assert covering_count(scores, 1.0).tolist() == [4, 4]  # everything, whatever the rounding of the sums
    assert covering_count(scores, torch.tensor([0.7, 0.5])).tolist() == [2, 2]  # a share per row
    assert covering_count(scores, torch.tensor([1.0, 0.5])).tolist() == [4, 2]


def test_column_and_diagonal_unions_are_each_heads_own_top_picks() -> None:
    """Heads picked together (one top-k) keep what each would alone: its top k columns besides the forced sinks,
    its best runs of diagonals besides the forced local window."""
    from optimist.engine.attention.sparse.estimate import column_union, diagonal_union

    g = torch.Generator().manual_seed(5)
    vertical, slash = torch.rand(3, 500, generator=g), torch.rand(3, 500, generator=g)
    k_v, k_s = [5, 40, 100], [0, 120, 300]
    expected_columns = set(range(10))
    for s_, k in enumerate(k_v):
        rest = sorted(range(10, 500), key=lambda j: -vertical[s_, j].item())
        expected_columns |= set(rest[: max(k, 10) - 10])
    assert set(column_union(vertical, k_v, sinks=10).nonzero().squeeze(1).tolist()) == expected_columns
    expected_offsets: set[int] = set()
    for s_, k in enumerate(k_s):
        runs = [(float("inf") if r < 2 else slash[s_, r * 16 : r * 16 + 16].sum().item(), r) for r in range(32)]
        for _, r in sorted(runs, reverse=True)[: -(-max(k, 20) // 16)]:  # the local window 0..19 lies in runs 0, 1
            expected_offsets |= {o for o in range(r * 16, r * 16 + 16) if o < 500}
    got = diagonal_union(slash, k_s, local=20, slash_group=16)
    assert set(got.nonzero().squeeze(1).tolist()) == expected_offsets


def test_coverage_budgets_follow_the_prompt_and_keep_planted_lines() -> None:
    """Coverage picks as many columns and diagonals as the estimated mass needs: a head whose queries all look at
    one key keeps few, a head with diffuse attention many; the planted lines, sinks and window are always in."""
    from optimist.engine.attention.sparse.estimate import pick_coverage, vertical_slash_scores

    def pick(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vertical, slash = vertical_slash_scores(q[-64:][None], k)
        return pick_coverage(vertical[0], slash[0], 0.8, 0.8)

    q, k = planted_column(column=300)
    columns, offsets = pick(q, k)
    assert 300 in columns.tolist()
    assert set(range(30)) <= set(columns.tolist()) and set(range(100)) <= set(offsets.tolist())
    g = torch.Generator().manual_seed(1)
    diffuse_columns, diffuse_offsets = pick(torch.randn(512, 32, generator=g) * 0.1, torch.randn(512, 32, generator=g))
    assert len(columns) < 40 < len(diffuse_columns), "concentrated: sinks and the planted column; diffuse: many"
    q, k = planted_diagonal(offset=150)
    columns, offsets = pick(q, k)
    assert 150 in offsets.tolist() and len(offsets) < len(diffuse_offsets)


def test_tile_estimate_sums_each_tiles_last_rows_causal_softmax() -> None:
    from optimist.engine.attention.sparse.estimate import tile_estimate

    g = torch.Generator().manual_seed(2)
    n, q_start, tile, rows = 150, 40, 64, 5
    q, k = torch.randn(n, 2, 16, generator=g), torch.randn(q_start + n, 16, generator=g)
    got = tile_estimate(q, k, tile, rows)
    assert got.shape == (3, q_start + n)
    for t, (a, b) in enumerate([(0, 64), (64, 128), (128, 150)]):
        expected = torch.zeros(q_start + n)
        for i in range(max(a, b - rows), b):
            p = (q[i] @ k[: q_start + i + 1].T / 4).softmax(dim=-1)  # both heads, keys up to the row's position
            expected[: q_start + i + 1] += p.sum(dim=0)
        torch.testing.assert_close(got[t], expected, atol=1e-5, rtol=1e-5)


def test_covering_keys_are_the_fewest_largest_reaching_the_share() -> None:
    from optimist.engine.attention.sparse.estimate import covering_keys

    scores = torch.tensor([[5.0, 1.0, 3.0, 1.0], [0.5, 2.0, 0.0, 7.5]])
    assert covering_keys(scores, 0.7).tolist() == [[True, False, True, False], [False, False, False, True]]
    assert bool(covering_keys(scores, 1.0).all())


@pytest.mark.parametrize(("m", "length"), [(64, 300), (64, 64), (17, 200), (1, 40), (5, 5)])
def test_vertical_and_slash_scores_sum_the_last_rows_causal_softmax(m: int, length: int) -> None:
    """Column and diagonal sums against a brute-force softmax of the last m queries (positions L - m ..)."""
    g = torch.Generator().manual_seed(m * length)
    q, k = torch.randn(2, m, 16, generator=g) * 2, torch.randn(length, 16, generator=g)
    rows = torch.arange(length - m, length)
    keys = torch.arange(length)
    scores = (q @ k.T / 4.0).masked_fill(keys[None, None, :] > rows[None, :, None], float("-inf"))
    probs = scores.softmax(dim=-1).double()  # [2, m, L]
    offset = rows[:, None] - keys[None, :]  # row - key
    expected_slash = torch.zeros((2, length), dtype=torch.float64)
    for o in range(length):
        expected_slash[:, o] = (probs * (offset == o)).sum(dim=(1, 2))
    vertical, slash = vertical_slash_scores(q, k)
    torch.testing.assert_close(vertical.double(), probs.sum(dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(slash.double(), expected_slash, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vertical_scores(q, k), vertical)


@pytest.mark.parametrize(("q_start", "top"), [(0, 3), (640, 4), (700, 2), (1023, 5)])
def test_block_sparse_estimate_of_a_chunk_matches_the_whole_prompts_rows(q_start: int, top: int) -> None:
    """A chunk's query blocks (after a cached prefix) choose the key blocks the whole prompt's estimate does for
    those blocks; a block the chunk only partly holds pools its own rows (same choice when they score alike)."""
    q, k = planted_column(n=1100, column=300)
    whole = estimate_block_sparse_mask(q, k, 64, top)
    chunk = estimate_block_sparse_mask(q[q_start:], k, 64, top)
    first = q_start // 64
    assert chunk.shape == (whole.shape[0] - first, whole.shape[1])
    aligned = 1 if q_start % 64 else 0  # a partly held first block pools fewer rows: compare the rest exactly
    assert torch.equal(chunk[aligned:], whole[first + aligned :])
    assert bool(chunk[torch.arange(chunk.shape[0]), first + torch.arange(chunk.shape[0])].all()), "own block kept"


@pytest.mark.parametrize(("length", "n"), [(1000, 1000), (1000, 300), (1100, 37)])
def test_block_sparse_union_is_every_heads_own_top_blocks(length: int, n: int) -> None:
    """Several heads sharing keys, each with its own budget, estimated together: the union of what each head keeps
    by itself (mean-pooled blocks of the rows present, causal at block level, the diagonal block forced)."""
    g = torch.Generator().manual_seed(length + n)
    q, k = torch.randn(n, 3, 16, generator=g), torch.randn(length, 16, generator=g)
    tops = [1, 3, 6]
    got = block_sparse_union(q, k, 64, tops)
    first, nk = (length - n) // 64, -(-length // 64)
    keys = torch.stack([k[j * 64 : (j + 1) * 64].mean(dim=0) for j in range(nk)])
    expected = torch.zeros((nk - first, nk), dtype=torch.bool)
    for h, top in enumerate(tops):
        for b in range(first, nk):
            lo, hi = max(b * 64, length - n), min((b + 1) * 64, length)
            pooled = q[lo - (length - n) : hi - (length - n), h].mean(dim=0)
            scores = keys[: b + 1] @ pooled
            scores[b] = float("inf")
            expected[b - first, scores.topk(min(top, b + 1)).indices] = True
    assert torch.equal(got, expected)
    assert torch.equal(block_sparse_union(q[:, 1:2], k, 64, [3]), estimate_block_sparse_mask(q[:, 1], k, 64, 3))
    with pytest.raises(ValueError, match="2 block budgets for 3 heads"):
        block_sparse_union(q, k, 64, [1, 2])


def test_block_sparse_estimator_keeps_the_diagonal_block_and_the_planted_one() -> None:
    column = 300
    q, k = planted_column(column=column)
    kept = estimate_block_sparse(q, k, block=64, top=2)
    for b, blocks in enumerate(kept):
        assert b in blocks.tolist()
        assert bool((blocks <= b).all()), "causal at block level"
    late = [b for b in range(len(kept)) if b > column // 64]
    assert all(column // 64 in kept[b].tolist() for b in late)


def test_full_budgets_reproduce_dense_attention() -> None:
    g = torch.Generator().manual_seed(3)
    hq, hkv, n, d = 4, 2, 300, 16
    q, k, v = (torch.randn(h, n, d, generator=g) for h in (hq, hkv, hkv))
    dense = masked_attention(q, k, v, causal_mask(n))
    reference = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(2, 0), v.double().repeat_interleave(2, 0), is_causal=True
    )
    assert torch.allclose(dense.double(), reference, atol=1e-6)
    full_vs = vertical_slash_mask(n, torch.arange(n), torch.arange(n))
    index_mask = build_vertical_slash_index(torch.arange(n), torch.arange(n), 0, n).mask(0)
    nb = -(-n // 64)
    full_blocks = block_sparse_mask(n, [torch.arange(b + 1) for b in range(nb)], 64)
    for mask in (full_vs, index_mask, full_blocks, a_shape_mask(n, n, n)):
        assert torch.equal(mask, causal_mask(n))
        assert torch.allclose(masked_attention(q, k, v, mask), dense)


def test_recall_measures_the_kept_attention_mass() -> None:
    q, k = planted_diagonal(n=256, offset=150)
    q, k = q[None], k[None]
    assert attention_recall(q, k, causal_mask(256)) == pytest.approx(1.0)
    columns, offsets = estimate_vertical_slash(q[0], k[0], k_v=30, k_s=110)  # 10 diagonals beyond the window
    estimated = attention_recall(q, k, vertical_slash_mask(256, columns, offsets))
    static = attention_recall(q, k, a_shape_mask(256, 30, 100))  # the same sinks and window, no estimation
    assert static < 0.75  # the planted diagonal holds much of the mass for rows past 150 ...
    assert estimated > 0.95  # ... and the estimator finds it


def test_block_columns_replace_a_heads_list_and_keep_the_others() -> None:
    """with_block_columns: the chosen heads visit, per block, exactly their own keys left of the block that no range
    covers; the other heads keep their one list; the masks agree with the block lists."""
    q_start, n, block, length = 200, 256, 64, 456
    offsets = torch.arange(64)[None].expand(2, -1)
    index = build_vertical_slash_index(torch.tensor([[5, 50, 150], [7, 70, 170]]), offsets, q_start, n, block)
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(4, length, generator=g) < 0.1
    mixed = with_block_columns(index, [1], [keep.nonzero(as_tuple=True)])
    for b in range(4):
        s0 = q_start + b * block
        assert mixed.block_columns(0, b).tolist() == index.block_columns(0, b).tolist()
        expected = [c for c in keep[b].nonzero().squeeze(1).tolist() if c < s0 - 63]  # ranges cover s0 - 63 ..
        assert mixed.block_columns(1, b).tolist() == expected
        rows = torch.arange(b * block, (b + 1) * block)
        got = mixed.rows_mask(1, rows)
        assert bool(got[:, expected].all()) and not bool(got[:, : max(0, s0 - 63)].sum(dim=1).ne(len(expected)).any())
    with pytest.raises(ValueError, match=r"blocks within 0\.\.3"):
        with_block_columns(index, [1], [(torch.tensor([4]), torch.tensor([0]))])
    with pytest.raises(ValueError, match="for 2 heads, expected 1"):
        with_block_columns(index, [1], [keep.nonzero(as_tuple=True)] * 2)


@pytest.mark.parametrize("share", [0.5, 0.9, 0.99, 1.0])
def test_covering_threshold_keeps_the_share_with_a_few_more_than_the_fewest(share: float) -> None:
    """The sort-free threshold: what it keeps holds the share, contains the fewest keys that do, and adds only keys
    within 1/16 of the threshold of theirs; a row of zeros keeps nothing."""
    from optimist.engine.attention.sparse.estimate import covering_keys, covering_threshold

    g = torch.Generator().manual_seed(int(share * 100))
    scores = torch.rand(6, 3000, generator=g) ** 8  # skewed, as attention is
    scores[2] = 0.0
    scores[3, :10] = 5.0  # a few dominant keys
    thresholds = covering_threshold(scores, share)
    kept = (scores >= thresholds[:, None]) & (scores > 0)
    fewest = covering_keys(scores, share) & (scores > 0)
    live = [r for r in range(6) if r != 2]
    assert bool((scores * kept).sum(dim=1)[live].ge(share * scores.sum(dim=1)[live] * (1 - 1e-5)).all())
    assert bool((kept | ~fewest).all()), "a superset of the fewest"
    lowest = torch.where(fewest, scores, float("inf")).min(dim=1).values  # the exact threshold per row
    extra = kept & ~fewest
    assert bool((scores[extra] >= (lowest[:, None].expand_as(kept)[extra] / 16 * 15)).all()), "within 1/16"
    assert not bool(kept[2].any())
