"""Bottom-right causal attention on CPU (a chunk's queries at the end of its keys) without a mask: equal to SDPA
with the explicit mask, for grouped query heads, non-contiguous inputs and chunks as long as their keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from optimist.engine.attention.cpu import bottom_right_causal_attention


@pytest.mark.parametrize(
    ("n", "length", "hq", "hkv"), [(5, 5, 2, 1), (64, 200, 6, 2), (1, 30, 3, 3), (100, 101, 4, 2), (7, 300, 9, 3)]
)
def test_equals_sdpa_with_the_bottom_right_mask(n: int, length: int, hq: int, hkv: int) -> None:
    g = torch.Generator().manual_seed(n + length)
    # the engine's packed layout viewed as [B, H, n, D]: non-contiguous
    q = torch.randn(2, n, hq, 16, generator=g).transpose(1, 2)
    k = torch.randn(2, length, hkv, 16, generator=g).transpose(1, 2)
    v = torch.randn(2, length, hkv, 16, generator=g).transpose(1, 2)
    i, j = torch.arange(n)[:, None], torch.arange(length)[None, :]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=j <= i + length - n, enable_gqa=True)
    torch.testing.assert_close(bottom_right_causal_attention(q, k, v), expected, atol=1e-5, rtol=1e-5)
    scaled = F.scaled_dot_product_attention(q, k, v, attn_mask=j <= i + length - n, enable_gqa=True, scale=0.3)
    torch.testing.assert_close(bottom_right_causal_attention(q, k, v, scale=0.3), scaled, atol=1e-5, rtol=1e-5)


def test_refuses_more_queries_than_keys() -> None:
    q, k = torch.randn(1, 1, 8, 16), torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="4 keys cannot end with 8 queries"):
        bottom_right_causal_attention(q, k, k)
