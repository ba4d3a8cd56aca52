"""The fused vertical/slash estimate (Triton, `estimate_kernels`) equals the torch estimate it replaces, and a plan
built with it is the same plan (TRITON_INTERPRET=1 on CPU; on a GPU the same tests run the compiled kernels)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # tests/conftest.py sets TRITON_INTERPRET=1 without a GPU

from optimist.engine.attention.sparse.estimate import vertical_slash_scores
from optimist.engine.attention.sparse.estimate_kernels import vertical_slash_scores_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(
    ("h", "m", "length", "d", "hkv", "dtype"),
    [
        (4, 64, 300, 32, 2, torch.float32),  # grouped heads, keys not a whole number of tiles
        (2, 17, 17, 16, 1, torch.float32),  # a chunk shorter than the estimate's 64 rows: every key causal
        (3, 64, 1000, 16, 3, torch.float16),
        (2, 40, 64 * 9, 64, 1, torch.float32),  # many key splits
    ],
)
def test_fused_estimate_equals_the_torch_estimate(h: int, m: int, length: int, d: int, hkv: int, dtype) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(h * length + m)
    q = (2 * torch.randn(h, m, d, generator=g)).to(DEVICE, dtype)
    k = torch.randn(length, hkv, d, generator=g).to(DEVICE, dtype)
    group = h // hkv
    vertical, slash = vertical_slash_scores_triton(q, k, [i // group for i in range(h)])
    tol = {"atol": 2e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-3, "rtol": 5e-3}
    for kv in range(hkv):
        rows = slice(kv * group, (kv + 1) * group)
        ref_v, ref_s = vertical_slash_scores(q[rows], k[:, kv])
        torch.testing.assert_close(vertical[rows], ref_v, **tol)
        torch.testing.assert_close(slash[rows], ref_s, **tol)
    # each row's softmax sums to one, over columns and over diagonals alike
    torch.testing.assert_close(vertical.sum(dim=1), torch.full((h,), float(m), device=DEVICE), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(slash.sum(dim=1), torch.full((h,), float(m), device=DEVICE), atol=1e-3, rtol=1e-4)


def test_fused_estimate_finds_a_planted_vertical_and_diagonal() -> None:
    """A key every query likes and keys copying the query a fixed distance back top their score lists."""
    g = torch.Generator().manual_seed(7)
    length, m, d, offset, column = 700, 64, 32, 250, 123
    u = torch.randn(d, generator=g)
    u = u / u.norm()
    k = torch.randn(length, 1, d, generator=g)
    q = torch.randn(1, m, d, generator=g) + 2 * u  # every query leans along u
    k[column, 0] = 3 * d**0.5 * u
    for i in range(m):
        k[length - m + i - offset, 0] = q[0, i]
    vertical, slash = vertical_slash_scores_triton(q.to(DEVICE), k.to(DEVICE), [0])
    assert int(vertical[0].argmax()) == column
    assert int(slash[0].argmax()) == offset


def test_fused_estimate_refuses_what_it_cannot_take() -> None:
    k = torch.randn(100, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="1 to 64 queries"):
        vertical_slash_scores_triton(torch.randn(1, 65, 16, device=DEVICE), k, [0])
    with pytest.raises(ValueError, match="head size 24"):
        vertical_slash_scores_triton(torch.randn(1, 8, 24, device=DEVICE), torch.randn(100, 1, 24, device=DEVICE), [0])
    with pytest.raises(ValueError, match="KV heads named"):
        vertical_slash_scores_triton(torch.randn(2, 8, 16, device=DEVICE), k, [0])


@pytest.mark.parametrize("kind", ["vertical_slash", "coverage", "block_sparse", "a_shape"])
def test_a_plan_with_the_fused_estimate_is_the_same_plan(kind: str) -> None:
    """The engine's plan for a chunk after cached keys keeps the same keys whichever estimator scored them."""
    from optimist.engine.attention.sparse.config import HeadPattern
    from optimist.engine.attention.sparse.gpu import plan
    from optimist.engine.bench.sparse_attention import structured_qkv

    q, k, _, _ = structured_qkv(1024, 4, 2, 32, torch.float32, DEVICE, seed=3)
    qe, ke = q.transpose(0, 1)[512:], k.transpose(0, 1)  # a 512-row chunk after 512 cached keys
    budget = {"vertical_slash": (40, 200), "coverage": (900, 900), "block_sparse": (4, 0), "a_shape": (16, 64)}[kind]
    patterns = [HeadPattern(kind, *budget)] * 4
    torch_plan = plan(qe, ke, 512, patterns, estimator="torch")
    fused_plan = plan(qe, ke, 512, patterns, estimator="triton")
    rows = torch.arange(0, 512, 37, device=DEVICE)
    for head in range(4):
        assert torch.equal(torch_plan.rows_mask(head, rows), fused_plan.rows_mask(head, rows)), head
    with pytest.raises(ValueError, match="unknown estimator 'numpy'"):
        plan(qe, ke, 512, patterns, estimator="numpy")
