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


@pytest.mark.parametrize("fused_cpu", [True, False])
@pytest.mark.parametrize(("n", "length", "hq", "hkv"), [(64, 200, 6, 2), (33, 33, 4, 1), (1, 30, 3, 3)])
def test_chunk_attention_on_either_path_equals_the_masked_reference(
    n: int, length: int, hq: int, hkv: int, fused_cpu: bool
) -> None:
    """The engine's dense chunk attention (attention/chunk.py): the CPU split, or SDPA's lower-right causal path
    that CUDA runs in flash (here on CPU tensors), both equal the explicitly masked result."""
    from optimist.engine.attention.chunk import bottom_right_causal

    g = torch.Generator().manual_seed(n * length)
    q = torch.randn(1, n, hq, 32, generator=g).transpose(1, 2)
    k = torch.randn(1, length, hkv, 32, generator=g).transpose(1, 2)
    v = torch.randn(1, length, hkv, 32, generator=g).transpose(1, 2)
    i, j = torch.arange(n)[:, None], torch.arange(length)[None, :]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=j <= i + length - n, enable_gqa=True)
    got = bottom_right_causal(q, k, v, fused_cpu=fused_cpu)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot end with"):
        bottom_right_causal(q, k[:, :, : n - 1], v[:, :, : n - 1], fused_cpu=fused_cpu)


def test_chunk_attention_repeats_kv_where_grouped_heads_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PyTorch whose lower-right dispatch refuses grouped heads still gets the right answer (K/V repeated), and
    the refusal is remembered rather than raised on every call."""
    from optimist.engine.attention import chunk

    real = F.scaled_dot_product_attention
    refused = []

    def strict(*args, enable_gqa: bool = False, **kwargs):  # type: ignore[no-untyped-def]
        if enable_gqa and kwargs.get("attn_mask") is not None:
            refused.append(1)
            raise RuntimeError("grouped heads not supported here")
        return real(*args, enable_gqa=enable_gqa, **kwargs)

    monkeypatch.setattr(chunk, "_sdpa", strict)
    monkeypatch.setitem(chunk._GQA, "native", True)
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 4, 10, 16, generator=g), torch.randn(1, 2, 25, 16, generator=g), torch.randn(1, 2, 25, 16)
    i, j = torch.arange(10)[:, None], torch.arange(25)[None, :]
    expected = real(q, k, v, attn_mask=j <= i + 15, enable_gqa=True)
    for _ in range(2):
        torch.testing.assert_close(chunk.bottom_right_causal(q, k, v, fused_cpu=False), expected, atol=1e-5, rtol=1e-5)
    assert len(refused) == 1 and chunk._GQA["native"] is False
