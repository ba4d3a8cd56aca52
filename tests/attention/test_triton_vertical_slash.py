"""The vertical-slash Triton kernel equals the masked reference on the same index (TRITON_INTERPRET=1 on CPU)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")  # tests/conftest.py sets TRITON_INTERPRET=1 without a GPU

from optimist.engine.attention.sparse.estimate import estimate_vertical_slash  # noqa: E402
from optimist.engine.attention.sparse.index import build_vertical_slash_index  # noqa: E402
from optimist.engine.attention.sparse.reference import causal_mask, masked_attention  # noqa: E402
from optimist.engine.attention.sparse.triton_vertical_slash import (  # noqa: E402
    pack_indices,
    vertical_slash_attention,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run(
    n: int, hq: int, hkv: int, d: int, dtype: torch.dtype, k_v: int, k_s: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(h, n, d, generator=g) for h in (hq, hkv, hkv))
    indices = []
    masks = []
    for h in range(hq):
        cols, offs = estimate_vertical_slash(q[h], k[h // (hq // hkv)], k_v=k_v, k_s=k_s)
        ix = build_vertical_slash_index(n, cols, offs, block=64)
        indices.append(ix)
        masks.append(ix.mask(n))
    packed = pack_indices(indices, DEVICE)
    got = vertical_slash_attention(*(t.to(DEVICE, dtype).contiguous() for t in (q, k, v)), packed)
    expected = masked_attention(q, k, v, torch.stack(masks))
    return got.float().cpu(), expected.float()


@pytest.mark.parametrize(
    "n,hq,hkv,d,dtype,k_v,k_s",
    [
        (200, 2, 1, 32, torch.float32, 30, 100),
        (333, 4, 2, 16, torch.float32, 40, 120),
        (256, 2, 2, 32, torch.float16, 35, 110),
    ],
)
def test_kernel_matches_the_reference_on_the_same_index(n, hq, hkv, d, dtype, k_v, k_s) -> None:
    got, expected = run(n, hq, hkv, d, dtype, k_v, k_s, seed=n)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got, expected, atol=tol, rtol=tol), (got - expected).abs().max()


def test_full_budget_reproduces_dense_attention() -> None:
    n, d = 192, 16
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, n, d, generator=g) for _ in range(3))
    ix = build_vertical_slash_index(n, torch.arange(n), torch.arange(n), block=64)
    got = vertical_slash_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), pack_indices([ix], DEVICE)).cpu()
    dense = masked_attention(q, k, v, causal_mask(n))
    assert torch.allclose(got, dense, atol=1e-5)


def test_the_same_kernel_serves_a_shape_and_block_sparse() -> None:
    from optimist.engine.attention.sparse.estimate import estimate_block_sparse
    from optimist.engine.attention.sparse.index import build_a_shape_index, build_block_sparse_index
    from optimist.engine.attention.sparse.reference import a_shape_mask, block_sparse_mask

    n, d = 320, 16
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, n, d, generator=g) for _ in range(3))
    a_shape = build_a_shape_index(n, n_init=16, n_local=100)
    assert torch.equal(a_shape.mask(n), a_shape_mask(n, 16, 100) | a_shape.mask(n))  # superset of the exact mask
    kept = estimate_block_sparse(q[0], k[0], block=64, top=2)
    blocks = build_block_sparse_index(n, kept)
    assert torch.equal(blocks.mask(n), block_sparse_mask(n, kept, 64))
    for index in (a_shape, blocks):
        got = vertical_slash_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), pack_indices([index], DEVICE)).cpu()
        assert torch.allclose(got, masked_attention(q, k, v, index.mask(n)), atol=1e-4)
