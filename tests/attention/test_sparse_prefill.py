"""The CPU sparse-prefill path: full budgets reproduce dense attention (whole prompts and chunks with a cached
prefix), each pattern's keys are a superset of its reference mask, and the work shrinks with the budget."""

from __future__ import annotations

import pytest
import torch

from optimist.engine.attention.sparse import prefill
from optimist.engine.attention.sparse.config import HeadPattern
from optimist.engine.attention.sparse.estimate import estimate_vertical_slash
from optimist.engine.attention.sparse.prefill import (
    BLOCK,
    DENSE_ABOVE,
    NEEDLE_VERTICALS,
    SLASH_GROUP,
    GroupSelection,
    group_keys,
    key_matrix,
    last_rows_scores,
    select_group,
    sparse_prefill_attention,
    tile_keys,
    visited_pairs,
)
from optimist.engine.attention.sparse.reference import (
    a_shape_mask,
    causal_mask,
    masked_attention,
    vertical_slash_mask,
)
from optimist.engine.model import native

from .needles import needle_per_tile


def qkv(n: int, hq: int = 6, hkv: int = 2, d: int = 32, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, h, d, generator=g) for h in (hq, hkv, hkv))


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int) -> torch.Tensor:
    n, length = q.shape[0], k.shape[0]
    qpos = torch.arange(q_start, q_start + n)
    mask = torch.arange(length)[None, :] <= qpos[:, None]
    ref = masked_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), mask)
    return ref.transpose(0, 1)


FULL = [
    HeadPattern("a_shape", 10_000, 10_000),
    HeadPattern("vertical_slash", 10_000, 10_000),
    HeadPattern("block_sparse", 10_000, 0),
    HeadPattern("coverage", 1000, 1000),
    HeadPattern("query_aware", 64, 1000),
]


@pytest.fixture(params=["fused-cpu", "sdpa-mask", "native"])
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """The ways the path runs its tiles, as keyword arguments for sparse_prefill_attention: torch's fused CPU
    attention over gathered batches (CPU), SDPA with an explicit mask (the path other devices take, forced here on
    CPU), and the C kernels (what the engine runs on CPU)."""
    if request.param == "sdpa-mask":
        monkeypatch.setattr(prefill, "_fused_cpu", lambda device: False)
    if request.param == "native":
        if native.unavailable_reason() is not None:
            pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
        return {"native": True}
    return {}


@pytest.mark.parametrize("pattern", FULL, ids=lambda p: p.kind)
@pytest.mark.parametrize(("n", "q_start"), [(300, 0), (257, 400), (64, 1000)])
@pytest.mark.parametrize("dense_above", [1.01, DENSE_ABOVE], ids=["gathered", "dense-switch"])
def test_full_budgets_reproduce_dense(
    pattern: HeadPattern, n: int, q_start: int, dense_above: float, kernel: dict[str, bool]
) -> None:
    q, k, v = qkv(q_start + n)
    q = q[q_start:]
    # tile 96 with small batches: tiles of several widths share a batch (front padding), a partial last tile
    out, work = sparse_prefill_attention(
        q, k, v, q_start, [pattern] * 6, tile=96, max_keys=800, dense_above=dense_above, dense_up_to=0, **kernel
    )
    torch.testing.assert_close(out, dense(q, k, v, q_start), rtol=1e-4, atol=1e-5)
    causal_pairs = sum(q_start + i + 1 for i in range(n))
    assert work == 6 * causal_pairs


@pytest.mark.parametrize(("n", "q_start"), [(1600, 0), (300, 1500)])
def test_sparse_tiles_attend_exactly_to_their_selected_keys(n: int, q_start: int, kernel: dict[str, bool]) -> None:
    """Mixed patterns below the dense switch: every row attends to exactly its tile's selected keys left of it."""
    q, k, v = qkv(q_start + n, seed=7)
    q = q[q_start:]
    patterns = [
        HeadPattern("vertical_slash", 40, 64),
        HeadPattern("a_shape", 16, 64),
        HeadPattern("block_sparse", 2, 0),
    ]
    patterns += [HeadPattern("a_shape", 8, 64)] * 3
    out, work = sparse_prefill_attention(q, k, v, q_start, patterns, tile=64, max_keys=4096, dense_up_to=0, **kernel)
    rows = torch.arange(q_start, q_start + n)
    visible = torch.arange(q_start + n)[None, :] <= rows[:, None]
    visited = 0
    for g in range(2):
        sel = select_group(patterns[3 * g : 3 * g + 3], q[:, 3 * g : 3 * g + 3], k[:, g], q_start, **kernel)
        mask = key_matrix(sel, q_start, n, 64).repeat_interleave(64, dim=0)[:n] & visible
        assert bool(mask.sum() < visible.sum() * DENSE_ABOVE)  # the gathered path ran, not the dense switch
        heads = slice(3 * g, 3 * g + 3)
        ref = masked_attention(q[:, heads].transpose(0, 1), k[:, g : g + 1].transpose(0, 1).expand(3, -1, -1),
                               v[:, g : g + 1].transpose(0, 1).expand(3, -1, -1), mask).transpose(0, 1)  # fmt: skip
        torch.testing.assert_close(out[:, heads], ref, rtol=1e-4, atol=1e-5)
        visited += 3 * int(mask.sum())
    assert work == visited


@pytest.mark.parametrize(
    ("length", "n", "tile", "with_blocks"),
    [(300, 300, 64, False), (500, 137, 64, True), (257, 257, 96, True), (130, 5, 7, False), (64, 64, 64, True),
     (700, 640, 96, True), (1000, 437, 130, True)],
)  # fmt: skip
@pytest.mark.parametrize("with_tiles", [False, True], ids=["", "query-aware"])
def test_key_matrix_and_visited_pairs_follow_their_definitions(
    length: int, n: int, tile: int, with_blocks: bool, with_tiles: bool
) -> None:
    """Against the definitions, key by key: tile t (rows [a, b) of a chunk at positions length - n ..) visits key j
    if j < b and j is a kept column, or some kept offset o puts it on row r's diagonal (j = r - o for a row r of
    the tile), or its block is kept for one of the tile's query blocks (tiles of 96 and 130 rows starting inside a
    block span three), or the tile chose it (query-aware); pairs count (row, key) with key <= row. The C key lists
    (`group_keys`, native) are the same keys, counts and pairs."""
    g = torch.Generator().manual_seed(length + n + tile)
    q_start = length - n
    # sparse enough that a tile's diagonals leave most keys out, so that blocks and choices show
    columns, offsets = torch.rand(length, generator=g) < 0.05, torch.rand(length, generator=g) < 0.005
    offsets[10:20] = True  # a run of diagonals
    blocks = None
    if with_blocks:
        key_blocks = -(-length // BLOCK)
        blocks = torch.rand(key_blocks - q_start // BLOCK, key_blocks, generator=g) < 0.2
    tiles = -(-n // tile)
    chosen = torch.rand(tiles, length, generator=g) < 0.03 if with_tiles else None
    sel = GroupSelection(columns, offsets, blocks, chosen)
    keep = key_matrix(sel, q_start, n, tile)
    assert keep.shape == (tiles, length)
    pairs = 0
    for t in range(tiles):
        a, b = q_start + t * tile, min(q_start + n, q_start + (t + 1) * tile)
        expected = torch.zeros(length, dtype=torch.bool)
        for j in range(b):
            on_diagonal = any(bool(offsets[r - j]) for r in range(max(a, j), b))
            in_block = blocks is not None and any(
                bool(blocks[r // BLOCK - q_start // BLOCK, j // BLOCK]) for r in range(a, b)
            )
            expected[j] = bool(columns[j]) or on_diagonal or in_block or (chosen is not None and bool(chosen[t, j]))
        assert torch.equal(keep[t], expected), t
        pairs += sum(int(expected[: r + 1].sum()) for r in range(a, b))
    assert visited_pairs(keep, q_start, n, tile) == pairs
    for use_native in [False] + ([True] if native.unavailable_reason() is None else []):
        keys, counts, visited = group_keys(sel, q_start, n, tile, use_native)
        assert torch.equal(counts, keep.sum(dim=1)) and visited == pairs, use_native
        assert torch.equal(keys, keep.nonzero()[:, 1]), use_native


def test_selection_from_precomputed_scores_is_the_same() -> None:
    """The search scores a group once and selects for many pattern lists: that must select what select_group does
    when it scores by itself, for every pattern kind and with the C scores too."""
    q, k, _ = qkv(2000, seed=3)
    q = q[:, :3]
    patterns = [
        [HeadPattern("vertical_slash", 40, 120)] * 3,
        # heads taking different numbers of columns: each must score with its own row
        [HeadPattern("vertical_slash", 700, 300), HeadPattern("block_sparse", 3, 0), HeadPattern("a_shape", 16, 64)],
        [HeadPattern("block_sparse", 2, 0)] * 3,
    ]
    ways = [False] + ([True] if native.unavailable_reason() is None else [])
    for use_native in ways:
        scores = last_rows_scores(q, k[:, 0], native=use_native)
        for group in patterns:
            alone = select_group(group, q, k[:, 0], 0, use_native)
            shared = select_group(group, q, k[:, 0], 0, scores=scores)
            assert torch.equal(alone.columns, shared.columns)
            assert torch.equal(alone.offsets, shared.offsets)
            assert (alone.blocks is None) == (shared.blocks is None)
            assert alone.blocks is None or torch.equal(alone.blocks, shared.blocks)
    with pytest.raises(ValueError, match="slash scores"):
        select_group(patterns[0], q, k[:, 0], 0, scores=last_rows_scores(q, k[:, 0], slashes=False))


def test_a_shape_keys_are_exactly_sinks_and_window_plus_tile_slack() -> None:
    n = 700
    q, k, _ = qkv(n, hq=1, hkv=1)
    sel = select_group([HeadPattern("a_shape", 16, 64)], q, k[:, 0], 0)
    covered = torch.zeros(n, n, dtype=torch.bool)
    for a in range(0, n, 100):
        b = min(n, a + 100)
        covered[a:b, tile_keys(sel, a, b)] = True
    covered &= causal_mask(n)
    exact = a_shape_mask(n, 16, 64)
    assert bool((covered | ~exact).all())  # superset of the reference mask
    # and no more than the window widened by one tile, plus the dynamic verticals every sparse head keeps
    extra = int(sel.columns.sum()) - 16
    assert 0 < extra <= NEEDLE_VERTICALS
    assert int(covered.sum()) <= int(a_shape_mask(n, 16, 64 + 100).sum()) + extra * n


def test_vertical_slash_selection_is_a_superset_of_its_estimate() -> None:
    n = 600
    q, k, _ = qkv(n, hq=1, hkv=1, seed=3)
    pattern = HeadPattern("vertical_slash", 40, 120)
    sel = select_group([pattern], q, k[:, 0], 0)
    columns, offsets = estimate_vertical_slash(q[:, 0], k[:, 0], 40, 120, slash_group=SLASH_GROUP)
    exact = vertical_slash_mask(n, columns, offsets)
    for a in range(0, n, 128):
        b = min(n, a + 128)
        row_keys = torch.zeros(n, dtype=torch.bool)
        row_keys[tile_keys(sel, a, b)] = True
        assert bool((row_keys[None, :] | ~exact[a:b]).all())


def test_coverage_selection_is_a_superset_of_its_estimate_and_adapts_its_size() -> None:
    from optimist.engine.attention.sparse.estimate import pick_coverage, vertical_slash_scores

    n = 600
    q, k, _ = qkv(n, hq=1, hkv=1, seed=3)
    pattern = HeadPattern("coverage", 700, 800)
    sel = select_group([pattern], q, k[:, 0], 0)
    vertical, slash = vertical_slash_scores(q[-64:, 0][None], k[:, 0])
    columns, offsets = pick_coverage(vertical[0], slash[0], 0.7, 0.8, slash_group=SLASH_GROUP)
    assert sel.columns.nonzero().squeeze(1).tolist() == columns.tolist()  # no dynamic verticals added
    assert sel.offsets.nonzero().squeeze(1).tolist() == offsets.tolist()
    exact = vertical_slash_mask(n, columns, offsets)
    for a in range(0, n, 128):
        row_keys = torch.zeros(n, dtype=torch.bool)
        row_keys[tile_keys(sel, a, min(n, a + 128))] = True
        assert bool((row_keys[None, :] | ~exact[a : a + 128]).all())
    wider = select_group([HeadPattern("coverage", 950, 950)], q, k[:, 0], 0)
    assert bool((wider.columns >= sel.columns).all()) and int(wider.columns.sum()) > int(sel.columns.sum())


@pytest.mark.parametrize("native_path", [False, True], ids=["torch", "native"])
def test_query_aware_tiles_find_their_own_needles(native_path: bool) -> None:
    """Each 64-row tile's queries look for a different key (a needle per tile, far back): query-aware heads keep
    every tile's needle from the tile's own rows, where vertical-slash, estimating from the chunk's last rows, finds
    only the last tile's, and the output follows the needles."""
    if native_path and native.unavailable_reason() is not None:
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    n, q_start = 512, 1024
    length = q_start + n
    q, k, v, needles = needle_per_tile(n, q_start=q_start)  # tile t's needle: key 100 + 90 t, in the prefix
    aware = select_group([HeadPattern("query_aware", 8, 900)], q, k[:, 0], q_start, native_path)
    keep = key_matrix(aware, q_start, n)
    assert all(bool(keep[t, key]) for t, key in enumerate(needles))
    assert int(keep.sum(dim=1).max()) < length // 3, "a sparse choice, not every key"
    vs = select_group([HeadPattern("vertical_slash", 30, 100)], q, k[:, 0], q_start, native_path)
    assert sum(bool(key_matrix(vs, q_start, n)[t, key]) for t, key in enumerate(needles)) < len(needles) // 2
    out, work = sparse_prefill_attention(q, k, v, q_start, [HeadPattern("query_aware", 8, 900)], native=native_path,
                                         dense_up_to=0)  # fmt: skip
    torch.testing.assert_close(out, dense(q, k, v, q_start), atol=0.05, rtol=0.05)
    assert work < 0.5 * (n * q_start + n * (n + 1) // 2)


def test_work_shrinks_with_the_budget_and_chunk_estimation_uses_the_prefix() -> None:
    n = 3072  # well beyond the dynamic verticals every sparse head keeps
    q, k, v = qkv(n, seed=5)
    _, full = sparse_prefill_attention(q, k, v, 0, [HeadPattern("vertical_slash", 10_000, 10_000)] * 6)
    out, small = sparse_prefill_attention(q, k, v, 0, [HeadPattern("vertical_slash", 30, 100)] * 6)
    assert small < full / 2
    assert torch.isfinite(out).all()
    # a chunk at the end of the prompt, with the rest as cached prefix, attends to the prefix too
    _, work = sparse_prefill_attention(q[2816:], k, v, 2816, [HeadPattern("a_shape", 64, 64)] * 6)
    assert work > 6 * 256 * (64 + 64)  # sinks and dynamic verticals from the prefix on top of the window


def test_chunks_seeing_few_keys_and_groups_above_the_dense_switch_run_dense() -> None:
    small = [HeadPattern("vertical_slash", 30, 100)] * 6
    q, k, v = qkv(1000, seed=2)  # under DENSE_UP_TO keys: dense whatever the patterns
    out, work = sparse_prefill_attention(q, k, v, 0, small)
    torch.testing.assert_close(out, dense(q, k, v, 0), rtol=1e-4, atol=1e-5)
    assert work == 6 * 1000 * 1001 // 2
    # the same chunk forced through selection: far less work, so it really was the size rule above
    assert sparse_prefill_attention(q, k, v, 0, small, dense_up_to=0)[1] < work * DENSE_ABOVE
    # a group whose selection is nearly everything runs dense; the other stays sparse
    q, k, v = qkv(3000, seed=4)
    wide = [HeadPattern("vertical_slash", 2900, 3000)] * 3 + small[:3]
    out, work = sparse_prefill_attention(q, k, v, 0, wide)
    torch.testing.assert_close(out[:, :3], dense(q, k, v, 0)[:, :3], rtol=1e-4, atol=1e-5)
    assert 3 * 3000 * 3001 // 2 < work < 6 * 3000 * 3001 // 2 * DENSE_ABOVE


def test_bad_shapes_are_refused() -> None:
    q, k, v = qkv(100)
    with pytest.raises(ValueError, match="must cover the prefix"):
        sparse_prefill_attention(q, k, v, 10, [FULL[0]] * 6)
    with pytest.raises(ValueError, match="head patterns for 6 query heads"):
        sparse_prefill_attention(q, k, v, 0, [FULL[0]] * 2)


def test_query_aware_rows_beyond_the_tile_sample_the_whole_tile() -> None:
    """A pattern file may ask for more sampled rows than a tile has: the tile's own rows are all there is (the same
    keys as sampling exactly the tile), not a [tiles, rows, keys] estimate sized by the request."""
    q, k, _ = qkv(300, seed=4)
    q_start = 0
    whole = select_group([HeadPattern("query_aware", 64, 900)] * 3, q[:, :3], k[:, 0], q_start, tile=64)
    huge = select_group([HeadPattern("query_aware", 10**9, 900)] * 3, q[:, :3], k[:, 0], q_start, tile=64)
    assert whole.tiles is not None and huge.tiles is not None and torch.equal(whole.tiles, huge.tiles)
