"""The Triton kernels equal the float64 masked reference on the same index (TRITON_INTERPRET=1 on CPU): vertical-
slash, A-shape and block-sparse, whole prompts and chunks after a cached prefix, grouped-query heads, head subsets;
full budgets reproduce dense attention."""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")  # tests/conftest.py sets TRITON_INTERPRET=1 without a GPU

from optimist.engine.attention.sparse.estimate import SINKS, estimate_vertical_slash  # noqa: E402
from optimist.engine.attention.sparse.index import (  # noqa: E402
    build_a_shape_index,
    build_block_sparse_index,
    build_vertical_slash_index,
)
from optimist.engine.attention.sparse.prefill import NEEDLE_VERTICALS  # noqa: E402
from optimist.engine.attention.sparse.reference import masked_attention  # noqa: E402
from optimist.engine.attention.sparse.triton_kernels import (  # noqa: E402
    block_sparse_attention,
    vertical_slash_attention,
)

from .needles import needle_per_tile  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def qkv(n: int, q_start: int, hq: int, hkv: int, d: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Packed engine layout: q [n, Hq, D] at positions q_start.., k/v [q_start + n, Hkv, D]."""
    g = torch.Generator().manual_seed(seed)
    length = q_start + n
    return (
        torch.randn(n, hq, d, generator=g),
        torch.randn(length, hkv, d, generator=g),
        torch.randn(length, hkv, d, generator=g),
    )


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """masks [Hq, n, L] -> [n, Hq, D] in float64 softmax."""
    out = masked_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), masks)
    return out.transpose(0, 1)


def on_device(*tensors: torch.Tensor, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [t.to(DEVICE, dtype) for t in tensors]


@pytest.mark.parametrize(
    "n,q_start,hq,hkv,d,dtype",
    [
        (200, 0, 2, 1, 32, torch.float32),
        (333, 0, 4, 2, 16, torch.float32),
        (150, 190, 2, 2, 32, torch.float32),  # a chunk after a cached prefix, unaligned to the block
        (256, 0, 2, 2, 32, torch.float16),
    ],
)
@pytest.mark.parametrize(("loop", "tile_n"), [("nested", 64), ("flat", 64), ("flat", 32)])
def test_vertical_slash_kernel_matches_the_reference(n, q_start, hq, hkv, d, dtype, loop, tile_n) -> None:
    q, k, v = qkv(n, q_start, hq, hkv, d, seed=n + q_start)
    length = q_start + n
    columns, offsets = [], []
    for h in range(hq):
        # each head its own estimate from its last queries (different budgets per head: padded lists)
        qh = torch.cat([torch.zeros(q_start, d), q[:, h]])
        c, o = estimate_vertical_slash(qh, k[:, h // (hq // hkv)], k_v=30 + 10 * h, k_s=100 + 7 * h)
        columns.append(c)
        offsets.append(o)
    width_c, width_o = max(map(len, columns)), max(map(len, offsets))
    cols = torch.stack([torch.nn.functional.pad(c, (0, width_c - len(c)), value=-1) for c in columns])
    offs = torch.stack([torch.nn.functional.pad(o, (0, width_o - len(o)), value=-1) for o in offsets])
    index = build_vertical_slash_index(cols, offs, q_start, n)
    masks = torch.stack([index.mask(h) for h in range(hq)])
    got = vertical_slash_attention(*on_device(q, k, v, dtype=dtype), _to(index), loop=loop, tile_n=tile_n)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float().cpu(), reference(q, k, v, masks).float(), atol=tol, rtol=tol)
    assert length > index.block  # the test covers more than one block


def _to(index):  # type: ignore[no-untyped-def]
    """The index's tensors on the test device."""
    fields = {name: (t.to(DEVICE) if isinstance(t, torch.Tensor) else t) for name, t in vars(index).items()}
    return type(index)(**fields)


@pytest.mark.parametrize("loop", ["nested", "flat"])
def test_full_budgets_reproduce_dense_attention(loop: str) -> None:
    for n, q_start in ((192, 0), (130, 100)):
        q, k, v = qkv(n, q_start, 2, 1, 16, seed=1)
        length = q_start + n
        everything = torch.arange(length)[None].expand(2, -1)
        index = build_vertical_slash_index(everything, everything, q_start, n)
        qpos = q_start + torch.arange(n)
        causal = (torch.arange(length)[None, :] <= qpos[:, None]).expand(2, -1, -1)
        assert torch.equal(torch.stack([index.mask(h) for h in range(2)]), causal)
        dense = reference(q, k, v, causal)
        got = vertical_slash_attention(*on_device(q, k, v), _to(index), loop=loop).cpu()
        torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)
        nb, nk = -(-n // 64), -(-length // 64)
        kept = torch.arange(nk)[None, None].expand(2, nb, -1)
        # every key block up to the one holding the query block's last row
        counts = ((q_start + 64 * torch.arange(nb) + 63) // 64 + 1).clamp(max=nk)[None].expand(2, -1)
        blocks = build_block_sparse_index(kept, counts, q_start, n)
        assert torch.equal(torch.stack([blocks.mask(h) for h in range(2)]), causal)
        got = block_sparse_attention(*on_device(q, k, v), _to(blocks)).cpu()
        torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loop", ["nested", "flat", "auto"])
def test_a_shape_runs_on_the_vertical_slash_kernel(loop: str) -> None:
    """(auto: on a GPU autotuning picks the loop among its configurations; in the interpreter it runs nested)"""
    n, d = 320, 16
    q, k, v = qkv(n, 0, 2, 2, d, seed=7)
    index = build_a_shape_index(2, 0, n, n_init=16, n_local=100)
    i = torch.arange(n)
    exact = (i[None, :] <= i[:, None]) & ((i[None, :] < 16) | (i[:, None] - i[None, :] < 100))
    mask = index.mask(0)
    assert bool((mask | ~exact).all()), "the index covers the exact A-shape mask"
    assert int(mask.sum(dim=1).max()) <= 16 + 100 + 63, "and no row sees more than sinks, window and a block"
    got = vertical_slash_attention(*on_device(q, k, v), _to(index), loop=loop).cpu()
    torch.testing.assert_close(got, reference(q, k, v, torch.stack([mask, mask])), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="a GPU runs the real autotuner (the a-shape test's auto case)")
def test_auto_loop_candidates_each_compute_the_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """loop="auto" gives the autotuner both loops' configurations (FLAT and BLOCK_N among their parameters) and
    both loops' inputs. With an autotuner that times on the CPU clock, the launcher's auto path runs in the
    interpreter: every candidate, nested (64- and 128-key tiles) and flat, writes the reference output, and the
    output after the pick is it too."""
    import triton

    from optimist.engine.attention.sparse import triton_kernels

    n, d, q_start = 150, 16, 90
    q, k, v = qkv(n, q_start, 4, 2, d, seed=11)
    columns = torch.tensor([[3, 40, 77], [5, 60, 100]])
    offsets = torch.cat([torch.arange(64), torch.tensor([70, 71, 72, 130])])[None].expand(2, -1)
    index = build_vertical_slash_index(columns, offsets, q_start, n)
    heads = torch.tensor([1, 2])  # two of the four query heads, over both KV heads
    masks = torch.stack([index.mask(h) for h in range(2)])
    expected = reference(q[:, heads], k[:, heads // 2], v[:, heads // 2], masks)
    out = torch.zeros_like(q)
    ran = []

    def cpu_bench(kernel_call, quantiles):  # type: ignore[no-untyped-def]  # Triton's do_bench signature
        out.fill_(float("nan"))
        kernel_call()
        torch.testing.assert_close(out[:, heads], expected, atol=1e-5, rtol=1e-5)
        ran.append(len(ran))
        return [1.0 + len(ran)] * len(quantiles)  # the first candidate is the fastest

    auto = triton.autotune(triton_kernels._TUNE_AUTO, key=["HEAD_DIM", "BLOCK_M", "IEEE"], do_bench=cpu_bench)(
        triton_kernels._vertical_slash_kernel
    )
    monkeypatch.setattr(triton_kernels, "_autotuned", lambda _q: True)
    monkeypatch.setattr(triton_kernels, "_vertical_slash_auto", auto)
    vertical_slash_attention(q, k, v, index, heads=heads.to(torch.int32), out=out, loop="auto")
    assert len(ran) == len(triton_kernels._TUNE_AUTO) == 18
    assert {c.kwargs["FLAT"] for c in triton_kernels._TUNE_AUTO} == {True, False}
    assert {(c.kwargs["FLAT"], c.kwargs.get("LAZY", False)) for c in triton_kernels._TUNE_AUTO} == {
        (flat, lazy) for flat in (True, False) for lazy in (True, False)
    }
    assert auto.best_config.kwargs == triton_kernels._TUNE_AUTO[0].kwargs
    torch.testing.assert_close(out[:, heads], expected, atol=1e-5, rtol=1e-5)
    assert bool(out[:, [0, 3]].isnan().all()), "the other query heads are left as they were (NaN from the last fill)"


@pytest.mark.skipif(DEVICE.type == "cuda", reason="simulates a GPU's autotuner on CPU tensors")
def test_auto_loop_that_fails_on_a_gpu_falls_back_to_the_nested_loop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """If the autotuned launch raises (a candidate the GPU's compiler rejects, say), the call still returns the
    attention, through the nested loop, says why in the log, and later calls go straight to the nested loop."""
    import triton

    from optimist.engine.attention.sparse import triton_kernels

    n, d = 120, 16
    q, k, v = qkv(n, 0, 2, 2, d, seed=5)
    index = build_a_shape_index(2, 0, n, n_init=8, n_local=64)
    expected = reference(q, k, v, torch.stack([index.mask(h) for h in range(2)]))
    attempts = []

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        attempts.append(1)
        raise RuntimeError("no such instruction on this GPU")

    class Broken:
        def __getitem__(self, grid):  # type: ignore[no-untyped-def]
            return broken

    def cpu_bench(kernel_call, quantiles):  # type: ignore[no-untyped-def]
        kernel_call()
        return [1.0] * len(quantiles)

    nested = triton.autotune(triton_kernels._TUNE_VS, key=["HEAD_DIM", "BLOCK_M", "IEEE"], do_bench=cpu_bench)(
        triton_kernels._vertical_slash_kernel
    )
    monkeypatch.setattr(triton_kernels, "_autotuned", lambda _q: True)
    monkeypatch.setattr(triton_kernels, "_vertical_slash_auto", Broken())
    monkeypatch.setattr(triton_kernels, "_vertical_slash_tuned", nested)
    monkeypatch.setattr(triton_kernels, "_auto_failed", [])
    with caplog.at_level("WARNING"):
        got = vertical_slash_attention(q, k, v, index, loop="auto")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert "no such instruction on this GPU" in caplog.text and "nested loop" in caplog.text
    torch.testing.assert_close(vertical_slash_attention(q, k, v, index, loop="auto"), expected, atol=1e-5, rtol=1e-5)
    assert len(attempts) == 1  # not retried


@pytest.mark.parametrize("q_start", [0, 100])
def test_block_sparse_kernel_matches_the_reference_for_a_subset_of_heads(q_start: int) -> None:
    n, d, hq = 300, 16, 4
    q, k, v = qkv(n, q_start, hq, 2, d, seed=11)
    length = q_start + n
    nb, nk = -(-n // 64), -(-length // 64)
    g = torch.Generator().manual_seed(5)
    kept = torch.zeros((2, nb, 3), dtype=torch.long)
    counts = torch.zeros((2, nb), dtype=torch.long)
    for h in range(2):
        for b in range(nb):
            last = (q_start + 64 * b + 63) // 64  # the block holding the query block's last row
            own = [min(last, nk - 1)]
            others = [x for x in torch.randperm(nk, generator=g).tolist() if x < own[0]][:2]
            picks = own + others
            kept[h, b, : len(picks)] = torch.tensor(picks)
            counts[h, b] = len(picks)
    # extra columns per head: sinks, some inside kept blocks (visited once), some right of early query blocks
    columns = torch.stack([torch.cat([torch.arange(4), torch.randperm(length, generator=g)[:20]]) for _ in range(2)])
    index = build_block_sparse_index(kept, counts, q_start, n, columns=columns)
    assert int(index.col_skip.sum()) > 0 and int((index.col_count < columns.shape[1]).sum()) > 0
    for h in range(2):
        mask = index.mask(h)
        block_start = q_start + torch.arange(n) // 64 * 64
        for c in columns[h].tolist():  # a column is seen by every query block right of it
            assert bool(mask[block_start > c, c].all())
    heads = torch.tensor([1, 3])  # the other two heads keep what `out` held
    out = torch.full((n, hq, d), 7.0)
    got = block_sparse_attention(*on_device(q, k, v), _to(index), heads=heads.to(DEVICE), out=out.to(DEVICE)).cpu()
    masks = torch.stack([index.mask(0), index.mask(0), index.mask(1), index.mask(1)])
    expected = reference(q, k, v, masks)
    torch.testing.assert_close(got[:, [1, 3]], expected[:, [1, 3]], atol=1e-4, rtol=1e-4)
    assert bool((got[:, [0, 2]] == 7.0).all())


@pytest.mark.parametrize(("n", "q_start"), [(90, 0), (40, 30), (300, 0), (150, 170), (40, 300)])
def test_kernels_read_only_the_prompts_keys(n: int, q_start: int) -> None:
    # the range loops load whole tiles, moved left at the keys' end: keys stored past the prompt (here NaN, as in
    # a cache's unwritten rows) must not leak in, and a prompt shorter than the widest tile works too
    q, k, v = qkv(n, q_start, 2, 1, 16, seed=3)
    length = q_start + n
    qpos = q_start + torch.arange(n)
    causal = (torch.arange(length)[None, :] <= qpos[:, None]).expand(2, -1, -1)
    dense = reference(q, k, v, causal)
    nan = torch.full((37, 1, 16), float("nan"))
    k_stored, v_stored = on_device(torch.cat([k, nan]), torch.cat([v, nan]))
    everything = torch.arange(length)[None].expand(2, -1)
    index = _to(build_vertical_slash_index(everything, everything, q_start, n))
    for loop, tile_n in (("nested", 64), ("flat", 64), ("flat", 32)):
        got = vertical_slash_attention(on_device(q)[0], k_stored, v_stored, index, loop=loop, tile_n=tile_n).cpu()
        torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)
    nb, nk = -(-n // 64), -(-length // 64)
    counts = ((q_start + 64 * torch.arange(nb) + 63) // 64 + 1).clamp(max=nk)[None].expand(2, -1)
    blocks = build_block_sparse_index(torch.arange(nk)[None, None].expand(2, nb, -1), counts, q_start, n)
    got = block_sparse_attention(on_device(q)[0], k_stored, v_stored, _to(blocks)).cpu()
    torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=f"{length} keys and values needed"):
        vertical_slash_attention(*on_device(q, k[:-1], v[:-1]), index)


@pytest.mark.parametrize(("q_start", "dtype"), [(0, torch.float32), (70, torch.float32), (70, torch.float16)])
def test_lazy_rescaling_matches_the_reference(q_start: int, dtype: torch.dtype) -> None:
    """LAZY (conditional rescaling, an autotuning option on a GPU): keys whose scores jump far above a row's
    running max late in the row (planted along a query's own direction: its block rescales; under a stale max
    their weights, 2^24, would overflow float16) and modest increases (no rescale: weights up to 2^8 under a stale
    max) give the reference output, in every range loop and block-sparse."""
    from optimist.engine.attention.sparse import triton_kernels as tk

    n, d = 260, 16
    q, k, v = qkv(n, q_start, 2, 1, d, seed=21)
    length = q_start + n
    for r in (160, 200, 240):  # row r's key 90 to its left scores 24 (base 2) for head 0: far above the rest
        qr = q[r, 0]
        k[q_start + r - 90, 0] = qr * 24 / (qr.dot(qr) * math.log2(math.e) / d**0.5)
    everything = torch.arange(length)[None].expand(2, -1)
    qpos = q_start + torch.arange(n)
    causal = (torch.arange(length)[None, :] <= qpos[:, None]).expand(2, -1, -1)
    dense = reference(*(t.to(dtype).float() for t in (q, k, v)), causal)
    q, k, v = on_device(q, k, v, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    index = _to(build_vertical_slash_index(everything, everything, q_start, n))
    for loop in ("nested", "flat"):
        out = torch.empty_like(q)
        grid, args, consts = tk.vertical_slash_launch(q, k, v, index, None, out, loop, 64)
        tk._vertical_slash_kernel[grid](*args, BLOCK_N=64, FLAT=loop == "flat", LAZY=True, **consts)
        torch.testing.assert_close(out.float().cpu(), dense, atol=tol, rtol=tol)
    nb, nk = -(-n // 64), -(-length // 64)
    counts = ((q_start + 64 * torch.arange(nb) + 63) // 64 + 1).clamp(max=nk)[None].expand(2, -1)
    blocks = _to(build_block_sparse_index(torch.arange(nk)[None, None].expand(2, nb, -1), counts, q_start, n))
    out = torch.empty_like(q)
    grid, args, consts = tk.block_sparse_launch(q, k, v, blocks, None, out)
    tk._block_sparse_kernel[grid](*args, LAZY=True, **consts)
    torch.testing.assert_close(out.float().cpu(), dense, atol=tol, rtol=tol)


def test_kernels_refuse_shapes_they_cannot_run() -> None:
    q, k, v = qkv(64, 0, 3, 2, 16, seed=0)
    index = build_a_shape_index(3, 0, 64, 4, 64)
    with pytest.raises(ValueError, match="do not group"):
        vertical_slash_attention(q, k, v, index)
    q, k, v = qkv(64, 0, 2, 1, 24, seed=0)
    with pytest.raises(ValueError, match="power of two"):
        vertical_slash_attention(q, k, v, build_a_shape_index(2, 0, 64, 4, 64))
    q, k, v = qkv(64, 0, 2, 1, 16, seed=0)
    with pytest.raises(ValueError, match="unknown loop"):
        vertical_slash_attention(q, k, v, build_a_shape_index(2, 0, 64, 4, 64), loop="spiral")
    with pytest.raises(ValueError, match="tile width 48"):
        vertical_slash_attention(q, k, v, build_a_shape_index(2, 0, 64, 4, 64), tile_n=48)


# ------------------------------------------------------------------ the CUDA path: estimation, indices, kernels


@pytest.mark.parametrize("fourth", ["sinks", "coverage"])
def test_gpu_path_reproduces_dense_attention_for_dense_heads_and_full_budgets(fourth: str) -> None:
    from optimist.engine.attention.sparse.config import HeadPattern
    from optimist.engine.attention.sparse.gpu import sparse_prefill_attention_triton

    for n, q_start in ((200, 0), (130, 150)):
        q, k, v = qkv(n, q_start, 4, 2, 16, seed=3)
        length = q_start + n
        qpos = q_start + torch.arange(n)
        causal = (torch.arange(length)[None, :] <= qpos[:, None]).expand(4, -1, -1)
        dense = reference(q, k, v, causal)
        patterns = [
            HeadPattern("a_shape", 10_000, 10_000),  # dense
            HeadPattern("vertical_slash", 10_000, 10_000),
            HeadPattern("block_sparse", 10_000, 0),
            # sinks cover everything: dense too; or all the estimated mass of columns and diagonals
            HeadPattern("a_shape", length, 64) if fourth == "sinks" else HeadPattern("coverage", 1000, 1000),
        ]
        got = sparse_prefill_attention_triton(*on_device(q, k, v), q_start, patterns).cpu()
        torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("block", "fourth"), [(64, "vertical_slash"), (128, "vertical_slash"), (64, "coverage"), (64, "query_aware")]
)
def test_gpu_path_matches_the_reference_on_its_own_plan(block: int, fourth: str) -> None:
    from optimist.engine.attention.sparse.config import HeadPattern
    from optimist.engine.attention.sparse.gpu import plan, run

    n, q_start = 600, 100
    q, k, v = qkv(n, q_start, 4, 2, 16, seed=9)
    patterns = [
        HeadPattern("vertical_slash", 40, 120),
        HeadPattern("a_shape", 16, 64),
        HeadPattern("block_sparse", 3, 0),
        {
            "vertical_slash": HeadPattern("vertical_slash", 120, 150),
            "coverage": HeadPattern("coverage", 600, 700),
            "query_aware": HeadPattern("query_aware", 16, 700),
        }[fourth],  # query-aware: a column list per block
    ]
    sparse = plan(q, k, q_start, patterns, block)
    assert sparse.vs is not None and sparse.vs.block == block
    rows = torch.arange(n)
    masks = torch.stack([sparse.rows_mask(h, rows) for h in range(4)])
    got = run(*on_device(q, k, v), _plan_to(sparse)).cpu()
    torch.testing.assert_close(got, reference(q, k, v, masks), atol=1e-4, rtol=1e-4)
    seen = masks.sum(dim=2).float().mean(dim=1)
    causal = (q_start + rows + 1).float().mean()
    # the small budgets stay sparse even on random inputs (head 3's generous one may cover every key there)
    assert bool((seen[:3] < causal).all()), "the heads with small budgets attend to fewer keys than dense"
    # A-shape: sinks, window and the estimated columns; block-sparse: at most 3 blocks of 64 keys per row and the
    # estimated columns (the first SINKS of them forced)
    assert bool(masks[1, :, :16].logical_or(torch.arange(16)[None, :] > (q_start + rows)[:, None]).all())
    assert int(masks[2].sum(dim=1).max()) <= 3 * 64 + NEEDLE_VERTICALS
    assert bool(masks[2, :, :SINKS].all())


@pytest.mark.parametrize("loop", ["nested", "flat"])
def test_gpu_query_aware_blocks_visit_their_own_needles(loop: str) -> None:
    """Each 64-row block's queries look for a different key far back: on the GPU path a query-aware head visits each
    block's own needle through that block's column list (not the others' needles), and the kernel's output equals
    the reference on those keys and follows the needles."""
    from optimist.engine.attention.sparse.config import HeadPattern
    from optimist.engine.attention.sparse.gpu import plan, run

    n, q_start = 512, 1024
    length = q_start + n
    q, k, v, needles = needle_per_tile(n, q_start=q_start)  # tile t's needle: key 100 + 90 t, in the prefix
    sparse = plan(q, k, q_start, [HeadPattern("query_aware", 8, 900)])
    assert sparse.vs is not None
    mask = sparse.rows_mask(0, torch.arange(n))
    for t, key in enumerate(needles):
        rows = mask[t * 64 : (t + 1) * 64]
        assert bool(rows[:, key].all()), f"block {t} visits its needle"
        assert not any(bool(rows[:, other].any()) for other in needles if other != key), "and no other block's"
        assert bool(rows[:, :SINKS].all())
    assert int(mask.sum(dim=1).max()) < length // 3, "a sparse choice, not every key"
    got = run(*on_device(q, k, v), _plan_to(sparse), loop=loop).cpu()
    torch.testing.assert_close(got, reference(q, k, v, mask[None]), atol=1e-4, rtol=1e-4)
    dense = reference(q, k, v, (torch.arange(length)[None, :] <= (q_start + torch.arange(n))[:, None])[None])
    torch.testing.assert_close(got, dense, atol=0.05, rtol=0.05)


def _plan_to(sparse):  # type: ignore[no-untyped-def]
    from optimist.engine.attention.sparse.gpu import SparsePlan

    def move(t):  # type: ignore[no-untyped-def]
        return None if t is None else (_to(t) if not isinstance(t, torch.Tensor) else t.to(DEVICE))

    return SparsePlan(move(sparse.vs_heads), move(sparse.vs), move(sparse.bs_heads), move(sparse.bs))


def test_kernel_benchmark_reports_every_pattern_with_recall(tmp_path) -> None:
    """`optimist bench sparse-attention` end to end at a tiny size (the GPU run uses the same code at 32K-1M)."""
    import argparse
    import json

    from optimist.engine.bench.sparse_attention import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    out = tmp_path / "sparse.json"
    args = parser.parse_args(
        ["sparse-attention", "--lengths", "384", "--shape", "2,1,16", "--vs", "30,100", "--a-shape", "16,64",
         "--block-sparse", "2", "--blocks", "64", "--repeats", "1", "--recall-rows", "8", "--out", str(out)]
        + (["--cpu"] if DEVICE.type == "cpu" else [])
    )  # fmt: skip
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    # the vertical-slash kernel's range loops (and on a GPU the autotuned choice between them) for the patterns it
    # runs; block-sparse has its own kernel
    rows = {(r["pattern"], r["loop"]): r for r in report["results"]}
    loops = ["nested", "flat"] + (["auto"] if DEVICE.type == "cuda" else [])
    assert set(rows) == {(p, loop) for p in ("vertical_slash", "a_shape") for loop in loops} | {("block_sparse", "-")}
    for r in rows.values():
        assert 0.3 < r["recall"] <= 1.0 + 1e-6
        # no index keeps more than each row's heaviest keys of the same number, and this one visits fewer than all
        assert r["recall"] <= r["oracle_recall"] + 1e-4 and r["oracle_recall"] <= 1.0 + 1e-6
        assert r["keys_per_row"] > 0 and 0 < r["pairs"] < 1
        assert r["sparse_ms"] == pytest.approx(r["estimate_index_ms"] + r["kernel_ms"], abs=0.02)
    # the structured input's slash lines and verticals are what vertical-slash estimation finds (at this size the
    # other patterns' 256 estimated columns cover most keys too, so no ranking between them is asserted)
    assert rows[("vertical_slash", "flat")]["recall"] >= 0.95
    # the report names, per length, the fastest row at the targets' recall
    best = report["fastest_at_target_recall"]["384"]
    eligible = [r for r in rows.values() if r["recall"] >= 0.95]
    assert best["recall"] >= 0.95 and best["speedup"] == max(r["speedup"] for r in eligible)
    assert out.with_suffix(".md").read_text().startswith("| tokens | pattern |")


def test_kernel_benchmark_takes_patterns_per_length_and_checks_dense_against_sdpa(tmp_path) -> None:
    """--patterns-at replaces the patterns at one length (the GPU run's 1M row runs vertical-slash alone), and the
    dense row (every key through our kernel) reports its largest difference from SDPA's output."""
    import argparse
    import json

    from optimist.engine.bench.sparse_attention import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    out = tmp_path / "sparse.json"
    argv = ["sparse-attention", "--lengths", "192,256", "--shape", "2,1,16", "--patterns", "dense,a_shape",
            "--a-shape", "16,64", "--patterns-at", "256=vertical_slash", "--vs", "30,100", "--blocks", "64",
            "--loops", "flat", "--chunks", "100", "--estimators", "torch,triton", "--repeats", "1",
            "--recall-rows", "4", "--out", str(out)]  # fmt: skip
    args = parser.parse_args(argv + (["--cpu"] if DEVICE.type == "cpu" else []))
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    chunked = {(r["tokens"], r["pattern"]): r for r in report["results"] if "chunk" in r}
    rows = {(r["tokens"], r["pattern"]): r for r in report["results"] if "chunk" not in r}
    assert set(rows) == {(192, "dense"), (192, "a_shape"), (256, "vertical_slash")}
    # prefilled in chunks of 100 queries as the engine does: the sparse patterns (not dense-through-ours), their
    # dense baseline (bottom-right causal per chunk) equal to one causal call over the whole prompt
    assert set(chunked) == {(192, "a_shape"), (256, "vertical_slash")}
    for r in chunked.values():
        assert r["chunk"] == 100 and 0.3 < r["recall"] <= 1.0 + 1e-6
        assert r["max_abs_error"] < (1e-4 if DEVICE.type == "cpu" else 0.1)
    # the targets' reading is about whole prompts
    assert "chunk" not in report["fastest_at_target_recall"]["256"]
    # both estimators timed, whole prompts and chunks (the rows' plans are the first one's)
    assert set(rows[(256, "vertical_slash")]["estimate_index_ms_by_estimator"]) == {"torch", "triton"}
    assert set(chunked[(256, "vertical_slash")]["sparse_ms_by_estimator"]) == {"torch", "triton"}
    wrong = parser.parse_args([*argv[:-2], "--estimators", "numpy", "--cpu"])
    assert wrong.func(wrong) == 2
    assert rows[(192, "dense")]["recall"] == pytest.approx(1.0, abs=1e-5)
    assert rows[(192, "dense")]["max_abs_error"] < (1e-4 if DEVICE.type == "cpu" else 0.1)  # bf16 on a GPU
    assert "max_abs_error" not in rows[(192, "a_shape")]  # sparse rows differ from dense by design
    bad = parser.parse_args([*argv[:-2], "--patterns-at", "256=nope", "--cpu"])
    assert bad.func(bad) == 2


def test_kernel_benchmark_names_the_fastest_row_at_the_target_recall() -> None:
    from optimist.engine.bench.sparse_attention import best_at_recall

    rows = [
        {"tokens": 8, "pattern": "vertical_slash", "speedup": 2.0, "recall": 0.97},
        {"tokens": 8, "pattern": "a_shape", "speedup": 9.0, "recall": 0.70},  # fast, but below the recall
        {"tokens": 8, "pattern": "coverage", "speedup": 3.0, "recall": 0.95},
        {"tokens": 8, "pattern": "dense", "speedup": 5.0, "recall": 1.0},  # every key: not a sparse row
        {"tokens": 16, "pattern": "a_shape", "speedup": 9.0, "recall": 0.70},
        {"tokens": 32, "pattern": "-", "error": "out of memory"},
    ]
    best = best_at_recall(rows, 0.95)
    assert best[8] is not None and best[8]["pattern"] == "coverage"
    assert best[16] is None and 32 not in best


def test_kernel_benchmark_runs_the_adaptive_patterns_too(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """`--patterns coverage,query_aware,dense` (opt-in rows for a GPU session), and a clear refusal of an unknown
    one."""
    import argparse
    import json

    from optimist.engine.bench.sparse_attention import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    out = tmp_path / "adaptive.json"
    common = ["sparse-attention", "--lengths", "384", "--shape", "2,1,16", "--blocks", "64", "--repeats", "1",
              "--recall-rows", "8"] + (["--cpu"] if DEVICE.type == "cpu" else [])  # fmt: skip
    args = parser.parse_args([*common, "--patterns", "coverage,query_aware,dense", "--query-aware", "16,950",
                              "--out", str(out)])  # fmt: skip
    assert args.func(args) == 0
    rows = json.loads(out.read_text())["results"]
    assert {r["pattern"] for r in rows} == {"coverage", "query_aware", "dense"}
    assert all(0.5 < r["recall"] <= 1.0 + 1e-6 for r in rows)
    dense = [r for r in rows if r["pattern"] == "dense"]  # every key through our kernel, each loop
    assert {r["loop"] for r in dense} == {"nested", "flat"} | ({"auto"} if DEVICE.type == "cuda" else set())
    assert all(r["recall"] == pytest.approx(1.0) and r["pairs"] == pytest.approx(1.0) for r in dense), dense
    assert {tuple(r["budget"]) for r in rows if r["pattern"] == "query_aware"} == {(16, 950)}
    args = parser.parse_args([*common, "--patterns", "vertical_slash,xattention"])
    assert args.func(args) == 2
    assert "unknown pattern 'xattention'" in capsys.readouterr().err
    args = parser.parse_args([*common, "--patterns", "vertical_slash", "--loops", "nested,spiral"])
    assert args.func(args) == 2
    assert "unknown loop 'spiral'" in capsys.readouterr().err


def test_gpu_path_takes_the_engines_strided_query_view() -> None:
    """In the engine, q is a column slice of the fused q/k projection ([t, Hq + Hkv, D]): not contiguous."""
    from optimist.engine.attention.sparse.config import HeadPattern
    from optimist.engine.attention.sparse.gpu import plan, run

    n, q_start, hq, hkv, d = 200, 70, 4, 2, 16
    g = torch.Generator().manual_seed(4)
    qk = torch.randn(n, hq + hkv, d, generator=g)
    q = qk[:, :hq]
    assert not q.is_contiguous()
    k, v = torch.randn(q_start + n, hkv, d, generator=g), torch.randn(q_start + n, hkv, d, generator=g)
    patterns = [HeadPattern("vertical_slash", 30, 100), HeadPattern("a_shape", 8, 64)] * 2
    sparse = plan(q, k, q_start, patterns)
    masks = torch.stack([sparse.rows_mask(h, torch.arange(n)) for h in range(hq)])
    got = run(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), _plan_to(sparse)).cpu()
    torch.testing.assert_close(got, reference(q.contiguous(), k, v, masks), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("heads", [8, 32])
def test_gpu_plan_reads_the_device_back_a_fixed_few_times(heads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each value read back from a GPU waits for everything queued before it: a plan's host reads do not grow with
    the head count (a 4K chunk's plan on an H200 took 10.6 ms with 69 reads on 32 heads, half of it the GPU idle)."""
    from optimist.engine.attention.sparse.config import HeadPattern
    from optimist.engine.attention.sparse.gpu import plan

    q, k, _ = qkv(256, 512, heads, 2, 16, seed=heads)
    q, k = on_device(q, k)
    reads = []
    for name in ("item", "__int__", "__bool__", "__index__", "__float__", "tolist"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):  # type: ignore[no-untyped-def]
            reads.append(1)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    index = plan(q, k, 512, [HeadPattern("vertical_slash", 30, 100)] * heads).vs
    monkeypatch.undo()
    assert index is not None and int(index.seg_count.min()) >= 1
    assert len(reads) <= 4, len(reads)
