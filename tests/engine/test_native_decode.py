"""The native decoder (one C call for all layers of a decode step) computes what the torch layers compute."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from optimist.engine.attention.sparse.reference import masked_attention
from optimist.engine.config import ModelConfig
from optimist.engine.kv_cache import allocate_cache
from optimist.engine.model import native
from optimist.engine.model.llama import AttentionMeta, DecodeGroup, Llama, PrefillSpan
from optimist.engine.model.native import NativeDecoder, NativeWeight

pytestmark = pytest.mark.skipif(native.unavailable_reason() is not None, reason=str(native.unavailable_reason()))

CONFIG = ModelConfig(
    name="tiny-quantized",
    vocab_size=96,
    hidden_size=64,
    intermediate_size=160,  # 5 blocks: an odd count
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    context_length=512,
    tie_embeddings=True,
)
# one block type per matrix, all three kinds in use (Q, K and V share one: they are fused)
TYPES = {"wq": T.Q4_1, "wk": T.Q4_1, "wv": T.Q4_1, "wo": T.Q4_0, "w_gate": T.Q4_1, "w_up": T.Q8_0, "w_down": T.Q4_0}


def quantized_model(seed: int = 0) -> Llama:
    """A random model whose float weights are exactly its GGUF blocks' values, with the native kernels swapped in."""
    rng = np.random.default_rng(seed)
    c = CONFIG
    shapes = {
        "wq": (c.q_size, c.hidden_size),
        "wk": (c.kv_size, c.hidden_size),
        "wv": (c.kv_size, c.hidden_size),
        "wo": (c.hidden_size, c.q_size),
        "w_gate": (c.intermediate_size, c.hidden_size),
        "w_up": (c.intermediate_size, c.hidden_size),
        "w_down": (c.hidden_size, c.intermediate_size),
    }
    weights: dict[str, torch.Tensor] = {}
    blocks: dict[str, NativeWeight] = {}

    def add(key: str, shape: tuple[int, int], qtype: T, scale: float) -> None:
        raw = gguf.quants.quantize((rng.standard_normal(shape) * scale).astype(np.float32), qtype)
        weights[key] = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(shape).copy())
        blocks[key] = NativeWeight.from_gguf(raw, int(qtype), *shape)

    add("embed", (c.vocab_size, c.hidden_size), T.Q8_0, 1.0)
    weights["norm"] = torch.from_numpy(1 + 0.1 * rng.standard_normal(c.hidden_size).astype(np.float32))
    for i in range(c.num_layers):
        for name, shape in shapes.items():
            add(f"layers.{i}.{name}", shape, TYPES[name], 0.3)
        for name in ("attn_norm", "ffn_norm"):
            weights[f"layers.{i}.{name}"] = torch.from_numpy(
                1 + 0.1 * rng.standard_normal(c.hidden_size).astype(np.float32)
            )
    model = Llama(c)
    model.load_weights(weights)
    model.eval()
    model.init_rope()
    # No float16 fallback: calls of more rows use the float32 weights, exactly the blocks' values.
    assert model.use_native(blocks, fp16=False) == 5 * c.num_layers + 1  # five matmuls per layer, and the head
    return model


def decode_meta(lengths: list[int], num_slots: int, seed: int) -> tuple[torch.Tensor, AttentionMeta]:
    """One decode row per context length (equal lengths adjacent, one group each, as the runner groups them),
    each sequence on scattered cache slots, its new token in its last slot."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_slots, generator=g)
    ends = np.cumsum(lengths).tolist()
    slots_of_row = [perm[end - n : end] for n, end in zip(lengths, ends, strict=True)]
    groups = []
    i = 0
    while i < len(lengths):
        j = i
        while j < len(lengths) and lengths[j] == lengths[i]:
            j += 1
        groups.append(DecodeGroup(i, j, torch.stack(slots_of_row[i:j]), None, lengths[i:j]))
        i = j
    positions = torch.tensor([n - 1 for n in lengths])
    slot_mapping = torch.stack([s[-1] for s in slots_of_row])
    tokens = torch.randint(0, CONFIG.vocab_size, (len(lengths),), generator=g)
    return tokens, AttentionMeta(positions, slot_mapping, [], groups, torch.arange(len(lengths)))


def filled_cache(
    num_slots: int, seed: int, dtype: torch.dtype = torch.float32
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cache = allocate_cache(CONFIG, num_slots // 16, 16, torch.device("cpu"), dtype)
    g = torch.Generator().manual_seed(seed)
    for k, v in cache:
        k.copy_(torch.randn(k.shape, generator=g))
        v.copy_(torch.randn(v.shape, generator=g))
    return cache


needs_f16 = pytest.mark.skipif(not native.kv_float16(), reason="the decode kernels take no float16 cache here")
KV_DTYPES = [torch.float32, pytest.param(torch.float16, marks=needs_f16)]


@pytest.mark.parametrize(
    "lengths",
    [[1], [37], [300], [9, 9], [40, 12, 12], [5, 130, 130, 64], [3] * 3 + [50] * 6, [2] * 20 + [30] * 20],
    ids=["first-token", "one", "long", "two-equal", "three-mixed", "four-mixed", "nine", "forty"],
)
@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=["kv32", "kv16"])
def test_native_decode_step_matches_the_torch_layers(
    lengths: list[int], kv_dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(A float16 cache: both store the new K/V rounded to float16; their float32 K/V differ by rounding order, so
    a stored value may land one float16 step apart.)"""
    model = quantized_model()
    num_slots = 1024
    native_cache, torch_cache = filled_cache(num_slots, 1, kv_dtype), filled_cache(num_slots, 1, kv_dtype)
    assert model.attach_native(native_cache)
    tokens, meta = decode_meta(lengths, num_slots, seed=len(lengths))
    calls = []
    run = NativeDecoder.run
    monkeypatch.setattr(NativeDecoder, "run", lambda self, *a: calls.append(1) or run(self, *a))
    with torch.inference_mode():
        got = model(tokens, meta, native_cache)
        assert calls, "the native decoder did not run"
        model.native_attention = False
        expected = model(tokens, meta, torch_cache)  # another cache: the torch layers, torch's attention
    assert len(calls) == 1
    assert got.shape == expected.shape == (len(lengths), CONFIG.vocab_size)
    # float32 arithmetic on the same weights in another order: agreement to rounding, and the same argmax (with a
    # float16 cache a new token's K or V may be stored one float16 step apart, ~1e-3 of it, which later layers read)
    tol = 1e-4 if kv_dtype == torch.float32 else 1e-3
    assert torch.allclose(got, expected, rtol=tol, atol=tol * expected.abs().max().item())
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    # the step wrote its new K/V where the torch layers write them (to rounding), and nothing else
    others = torch.ones(num_slots, dtype=torch.bool)
    others[meta.slot_mapping] = False
    for (kn, vn), (kt, vt) in zip(native_cache, torch_cache, strict=True):
        assert kn.dtype == kt.dtype == kv_dtype
        tol = 1e-4 if kv_dtype == torch.float32 else 2e-3  # float16 steps are 2^-10 of the value
        assert torch.allclose(kn, kt, rtol=tol, atol=tol) and torch.allclose(vn, vt, rtol=tol, atol=tol)
        assert torch.equal(kn[others], kt[others]) and torch.equal(vn[others], vt[others])


def test_native_decoder_leaves_other_steps_to_the_torch_layers() -> None:
    model = quantized_model()
    cache = filled_cache(1024, 2)
    assert model.attach_native(cache)
    tokens, meta = decode_meta([7] * (NativeDecoder.max_rows + 1), 1024, seed=3)  # more rows than it takes
    assert model._native_layers(model.embed(tokens), meta, cache) is None
    tokens, meta = decode_meta([7], 1024, seed=3)
    assert model._native_layers(model.embed(tokens), meta, filled_cache(1024, 2)) is None  # a scratch cache
    assert model._native_layers(model.embed(tokens), meta, cache) is not None


def reference_attention(q, k_cache, v_cache, slots, lens):  # type: ignore[no-untyped-def]
    """float64 softmax attention of each row's query heads over its context slots (GQA: head h reads h // rep)."""
    rows = []
    for r in range(q.shape[0]):
        keys = k_cache[slots[r, : lens[r]]].transpose(0, 1)  # [kv, L, D]
        values = v_cache[slots[r, : lens[r]]].transpose(0, 1)
        everything = torch.ones(q.shape[1], 1, int(lens[r]), dtype=torch.bool)
        rows.append(masked_attention(q[r].double().unsqueeze(1), keys, values, everything).squeeze(1))
    return torch.stack(rows)


# head sizes of a multiple of 32 take the grouped kernel (query heads of a KV group in runs of up to three, keys
# four at a time: lengths 1, 17, 299 leave remainders), others the per-head loop
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"), [(4, 2, 16), (9, 3, 64), (2, 2, 20), (8, 2, 32), (10, 2, 128), (4, 4, 64)]
)
@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=["kv32", "kv16"])
def test_decode_attention_matches_softmax_attention(heads: int, kv_heads: int, dim: int, kv_dtype: torch.dtype) -> None:
    """(A float16 cache against the same float16 values in float64: the kernels convert exactly.)"""
    g = torch.Generator().manual_seed(heads * dim)
    num_slots, lens = 700, torch.tensor([1, 300, 17, 299, 64])
    k_cache = torch.randn(num_slots, kv_heads, dim, generator=g).to(kv_dtype)
    v_cache = torch.randn(num_slots, kv_heads, dim, generator=g).to(kv_dtype)
    slots = torch.stack([torch.randperm(num_slots, generator=g)[:300] for _ in lens])  # past lens[r]: padding
    qkv = torch.randn(len(lens), heads + 2 * kv_heads, dim, generator=g) * 3  # q as the layers have it: a view
    q = qkv[:, :heads]
    out = torch.full((len(lens), heads + 1, dim), 7.0)[:, 1:]  # a strided view; the column before stays put
    native.decode_attention(q, k_cache, v_cache, slots, lens, out)
    expected = reference_attention(q, k_cache, v_cache, slots, lens)
    assert torch.allclose(out.double(), expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(out._base[:, 0], torch.full((len(lens), dim), 7.0))  # type: ignore[index]


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (10, 2, 128), (4, 4, 32)])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=["kv32", "kv16"])
def test_decode_attention_splits_long_contexts_and_stays_batch_invariant(
    heads: int, kv_heads: int, dim: int, kv_dtype: torch.dtype
) -> None:
    """Contexts longer than the kernel's 1,024-key chunk run as several tasks whose softmax pieces are combined:
    the result is still softmax attention (lengths at, just past and well past chunk boundaries), and a row's
    output is bit for bit the same alone as beside other rows, long or short (the split follows its length only)."""
    g = torch.Generator().manual_seed(heads + dim)
    num_slots, lens = 5000, torch.tensor([1024, 1025, 2500, 4100, 3])
    k_cache = torch.randn(num_slots, kv_heads, dim, generator=g).to(kv_dtype)
    v_cache = torch.randn(num_slots, kv_heads, dim, generator=g).to(kv_dtype)
    slots = torch.stack([torch.randperm(num_slots, generator=g)[:4100] for _ in lens])
    q = torch.randn(len(lens), heads, dim, generator=g) * 3
    out = torch.empty(len(lens), heads, dim)
    native.decode_attention(q, k_cache, v_cache, slots, lens, out)
    expected = reference_attention(q, k_cache, v_cache, slots, lens)
    assert torch.allclose(out.double(), expected, rtol=1e-4, atol=1e-5)
    for r in range(len(lens)):
        alone = torch.empty(1, heads, dim)
        native.decode_attention(q[r : r + 1], k_cache, v_cache, slots[r : r + 1], lens[r : r + 1], alone)
        assert torch.equal(alone[0], out[r]), r


def test_decode_attention_rejects_what_it_cannot_take() -> None:
    cache = torch.zeros(64, 2, 16)
    q, out, slots = torch.zeros(2, 4, 16), torch.zeros(2, 4, 16), torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="length"):
        native.decode_attention(q, cache, cache, slots, torch.tensor([0, 3]), out)  # an empty context
    with pytest.raises(ValueError, match="length"):
        native.decode_attention(q, cache, cache, slots, torch.tensor([9, 3]), out)  # more keys than slots
    with pytest.raises(ValueError, match="float32"):
        native.decode_attention(q.half(), cache, cache, slots, torch.tensor([1, 3]), out)
    with pytest.raises(ValueError, match="caches"):  # K and V of different types
        native.decode_attention(q, cache, cache.half(), slots, torch.tensor([1, 3]), out)
    with pytest.raises(ValueError, match=r"not torch\.bfloat16"):
        native.decode_attention(q, cache.bfloat16(), cache.bfloat16(), slots, torch.tensor([1, 3]), out)
    with pytest.raises(ValueError, match="rows"):
        native.decode_attention(q, cache, cache, slots[:1], torch.tensor([1]), out)
    with pytest.raises(ValueError, match="KV heads"):
        native.decode_attention(torch.zeros(2, 3, 16), cache, cache, slots, torch.tensor([1, 3]), torch.zeros(2, 3, 16))


# (query heads, KV heads, head size, chunk, context): a fresh prompt and chunks after a cached prefix; one
# query row, row counts that leave a partial block, key counts that leave partial tiles; head sizes of a multiple
# of 16 and of only 8; up to 12 query heads per KV head; contexts of several 256-key chunks (the kernel folds each
# chunk into all of a task's query blocks before the next)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "n", "length"),
    [(9, 3, 64, 71, 71), (9, 3, 64, 13, 200), (9, 3, 64, 1, 1), (8, 2, 32, 130, 130), (4, 4, 16, 33, 90),
     (12, 1, 24, 17, 17), (32, 8, 128, 40, 150), (9, 3, 64, 301, 777), (8, 2, 32, 530, 530)],
)  # fmt: skip
def test_prefill_attention_matches_causal_softmax_attention(
    heads: int, kv_heads: int, dim: int, n: int, length: int
) -> None:
    g = torch.Generator().manual_seed(n * dim + length)
    qkv = torch.randn(n, heads + 2 * kv_heads, dim, generator=g) * 2  # the layers' packed projection: row views
    q = qkv[:, :heads]
    if n == length:  # a fresh prompt: keys and values are the chunk's own, views of the same rows
        k, v = qkv[:, heads : heads + kv_heads], qkv[:, heads + kv_heads :]
    else:
        k, v = torch.randn(length, kv_heads, dim, generator=g), torch.randn(length, kv_heads, dim, generator=g)
    out = torch.full((n, heads + 1, dim), 7.0)[:, 1:]
    assert native.prefill_attention(q, k, v, out)
    causal = torch.arange(length)[None, :] <= torch.arange(length - n, length)[:, None]  # [n, L]
    expected = masked_attention(q.double().transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), causal)
    assert torch.allclose(out.double(), expected.transpose(0, 1), rtol=1e-4, atol=1e-5)
    assert torch.equal(out._base[:, 0], torch.full((n, dim), 7.0))  # type: ignore[index]


def test_prefill_attention_declines_what_it_cannot_take() -> None:
    q, kv, out = torch.randn(4, 2, 20), torch.randn(4, 1, 20), torch.zeros(4, 2, 20)
    assert not native.prefill_attention(q, kv, kv, out)  # a head size not a multiple of 8
    q, kv, out = torch.randn(4, 13, 16), torch.randn(4, 1, 16), torch.zeros(4, 13, 16)
    assert not native.prefill_attention(q, kv, kv, out)  # 13 query heads on one KV head
    q, kv, out = torch.randn(5, 2, 16), torch.randn(4, 1, 16), torch.zeros(5, 2, 16)
    assert not native.prefill_attention(q, kv, kv, out)  # more queries than keys
    assert not native.prefill_attention(q.double(), kv.double(), kv.double(), out.double())
    assert torch.equal(out, torch.zeros(5, 2, 16))


# (query heads, query rows, keys, head size): SmolLM2's group at 7K keys, rows that leave a partial block of 12,
# as many rows as keys, one row, a head size of only 8, keys that leave a partial 16-key panel
@pytest.mark.parametrize(
    ("heads", "m", "length", "dim"),
    [(3, 64, 2100, 64), (2, 64, 64, 64), (4, 17, 1000, 24), (1, 5, 5, 8), (3, 1, 33, 64), (5, 30, 301, 128)],
)
def test_estimate_scores_match_the_torch_estimate(heads: int, m: int, length: int, dim: int) -> None:
    from optimist.engine.attention.sparse.estimate import vertical_scores, vertical_slash_scores

    g = torch.Generator().manual_seed(m * length + dim)
    k = torch.randn(length, 3, dim, generator=g)[:, 1]  # one KV head's keys: a strided view, as the engine has them
    q_last = torch.randn(m, heads, dim, generator=g).transpose(0, 1) * 2  # [heads, m, D] with strided rows
    got = native.estimate_scores(q_last, k)
    assert got is not None and got[1] is not None
    vertical, slash = vertical_slash_scores(q_last, k)
    assert torch.allclose(got[0], vertical, rtol=1e-4, atol=1e-6)
    assert torch.allclose(got[1], slash, rtol=1e-4, atol=1e-6)
    # every row's probabilities sum to one, once per column and once per diagonal
    assert torch.allclose(got[0].sum(dim=1), torch.full((heads,), float(m)), rtol=1e-5)
    assert torch.allclose(got[1].sum(dim=1), torch.full((heads,), float(m)), rtol=1e-5)
    only = native.estimate_scores(q_last, k, slashes=False)
    assert only is not None and only[1] is None
    assert torch.equal(only[0], got[0])
    assert torch.allclose(only[0], vertical_scores(q_last, k), rtol=1e-4, atol=1e-6)


def test_estimate_scores_decline_what_they_cannot_take() -> None:
    q_last, k = torch.randn(3, 8, 64), torch.randn(100, 64)
    assert native.estimate_scores(q_last[..., :20], k[:, :20]) is None  # a head size not a multiple of 8
    assert native.estimate_scores(q_last.double(), k.double()) is None
    assert native.estimate_scores(q_last, k[:5]) is None  # more query rows than keys
    assert native.estimate_scores(q_last, k[:, :32]) is None  # keys of another head size
    assert native.estimate_scores(q_last, k) is not None


# (chunk rows, cached prefix, tile, sampled rows, head size): a 7K-key chunk's shape scaled down, a prefix and a
# partial last tile, one tile sampled whole, tiles shorter than the sample, a partial 16-key panel
@pytest.mark.parametrize(
    ("n", "q_start", "tile", "rows", "dim"),
    [(512, 1500, 64, 16, 64), (130, 77, 64, 8, 64), (64, 1000, 64, 64, 32), (200, 5, 32, 40, 8), (33, 0, 64, 3, 24)],
)
def test_tile_scores_match_the_torch_estimate_and_their_thresholds_cover_the_share(
    n: int, q_start: int, tile: int, rows: int, dim: int
) -> None:
    from optimist.engine.attention.sparse.estimate import covering_keys, tile_estimate

    g = torch.Generator().manual_seed(n + q_start + dim)
    qk = torch.randn(n, 5, dim, generator=g) * 2
    q = qk[:, :3]  # a group's heads: a column slice of the fused projection, as the engine has them
    k = torch.randn(q_start + n, 3, dim, generator=g)[:, 1]
    got = native.tile_scores(q, k, tile, rows, share=0.9)
    assert got is not None and got[1] is not None
    scores, thresholds = got
    expected = tile_estimate(q, k, tile, rows)
    assert torch.allclose(scores, expected, rtol=1e-4, atol=1e-6)
    # each tile's sampled rows' probabilities: one per row and head, none right of the tile's end
    ends = (torch.arange(1, scores.shape[0] + 1) * tile).clamp(max=n)
    sampled = (ends - (ends - rows).clamp(min=(ends - 1) // tile * tile)) * 3
    assert torch.allclose(scores.sum(dim=1), sampled.float(), rtol=1e-5)
    assert not bool((scores[:, None, :] * (torch.arange(q_start + n) >= q_start + ends[:, None])[:, None]).any())
    fewest = covering_keys(expected, 0.9)
    kept = scores >= thresholds[:, None]
    assert bool((scores * kept).sum(dim=1).ge(0.9 * scores.sum(dim=1) * (1 - 1e-5)).all()), "the share is kept"
    # a superset of the fewest keys reaching the share, found to 1/16 of the threshold: only a few more
    assert bool((kept | ~fewest).all())
    assert bool((scores[kept & ~fewest] >= (thresholds[:, None].expand_as(kept)[kept & ~fewest])).all())
    assert int(kept.sum()) <= int(fewest.sum()) * 1.5 + 16
    assert native.tile_scores(q, k, tile, rows)[1] is None  # type: ignore[index]
    everything = native.tile_scores(q, k, tile, rows, share=1.0)
    assert everything is not None and everything[1] is not None
    assert bool((everything[1] == 0).all()), "a full share keeps every key with any weight, however small"


def test_tile_scores_decline_what_they_cannot_take() -> None:
    q, k = torch.randn(100, 3, 64), torch.randn(150, 64)
    assert native.tile_scores(q[..., :20], k[:, :20], 64, 8) is None  # a head size not a multiple of 8
    assert native.tile_scores(q.double(), k.double(), 64, 8) is None
    assert native.tile_scores(q, k[:50], 64, 8) is None  # fewer keys than rows
    assert native.tile_scores(q, k, 64, 0) is None
    assert native.tile_scores(q, k, 64, 8) is not None


def test_sparse_attention_declines_what_it_cannot_take() -> None:
    """What it takes is checked against the reference through sparse_prefill_attention (tests/attention); here, the
    calls it must refuse without touching the output."""
    q, kv, out = torch.randn(70, 3, 16), torch.randn(70, 1, 16), torch.zeros(70, 3, 16)
    keys, counts = torch.cat([torch.arange(64), torch.arange(70)]), torch.tensor([64, 70])
    assert not native.sparse_attention(q, kv, kv, out, 0, 64, keys, counts[:1])  # a count per tile is missing
    assert not native.sparse_attention(q, kv, kv, out, 0, 64, keys[:-1], counts)  # counts and keys disagree
    assert not native.sparse_attention(q[..., :12], kv[..., :12], kv[..., :12], out[..., :12], 0, 64, keys, counts)
    assert not native.sparse_attention(q.double(), kv.double(), kv.double(), out.double(), 0, 64, keys, counts)
    assert not native.sparse_attention(q, kv, kv, out, 0, 64, keys + 1, counts)  # key 70 lies past the keys
    assert not native.sparse_attention(q, kv, kv, out, 0, 0, keys, counts)  # no tile size
    assert not native.sparse_attention(q, kv, kv, out, 1, 64, keys, counts)  # no KV head 1
    assert torch.equal(out, torch.zeros(70, 3, 16))
    assert native.sparse_attention(q, kv, kv, out, 0, 64, keys, counts)  # the same call, well formed
    assert out.abs().sum() > 0


def with_prefill(
    meta: AttentionMeta, tokens: torch.Tensor, n: int, slots: torch.Tensor
) -> tuple[torch.Tensor, AttentionMeta]:
    """`meta`'s decode step with a fresh sequence's n-token prefill (on `slots`) packed before its rows."""
    for group in meta.decodes:
        group.start += n
        group.end += n
    return torch.cat([torch.arange(n) % CONFIG.vocab_size, tokens]), AttentionMeta(
        torch.cat([torch.arange(n), meta.positions]),
        torch.cat([slots, meta.slot_mapping]),
        [PrefillSpan(0, n, None, n)],
        meta.decodes,
        torch.cat([torch.tensor([n - 1]), meta.logits_rows + n]),
    )


@pytest.mark.parametrize("prefill", [0, 23], ids=["decode-only", "with-a-prefill"])
def test_torch_layers_with_native_attention_match_torch_attention(prefill: int) -> None:
    """Steps the native decoder does not take (too many rows, or a prefill among them) still attend in C."""
    model = quantized_model()
    num_slots = 1024
    native_cache, torch_cache = filled_cache(num_slots, 4), filled_cache(num_slots, 4)
    assert model.attach_native(native_cache) and model.native_attention
    lengths = [60] * 10 + [9] * 31 + [2] * 30  # 71 rows, more than the native decoder takes
    tokens, meta = decode_meta(lengths, num_slots, seed=5)
    if prefill:
        used = torch.cat([g.slots.flatten() for g in meta.decodes])
        free = torch.ones(num_slots, dtype=torch.bool)
        free[used] = False
        tokens, meta = with_prefill(meta, tokens, prefill, free.nonzero().flatten()[:prefill])
    with torch.inference_mode():
        got = model(tokens, meta, native_cache)
        assert meta.decode_table is not None and meta.native_prefill  # the C attention was used
        model.native_attention = False
        expected = model(tokens, meta, torch_cache)
        assert meta.decode_table is None and not meta.native_prefill
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    for (kn, vn), (kt, vt) in zip(native_cache, torch_cache, strict=True):
        assert torch.allclose(kn, kt, rtol=1e-5, atol=1e-5) and torch.allclose(vn, vt, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("lanes", "capability", "keys"),
    [(8, "AVX2", 8192), (16, "AVX512", 8192), (8, "AVX512", 1024), (8, "AVX512_BF16", 1024)],
)
def test_dense_prefill_attention_runs_in_c_where_it_beats_torchs(lanes: int, capability: str, keys: int) -> None:
    """Where torch's flash kernel runs AVX-512 and ours are 8-wide it passes them above ~1K keys; at equal widths
    ours lead at every length the engine runs."""
    assert native._prefill_keys(lanes, capability) == keys


def test_kernel_width_follows_the_build_flags() -> None:
    """The kernels are 16-wide exactly where the compiler targets AVX-512 (-march=native unless told otherwise), and
    the engine's dense C attention bound follows."""
    lanes = native.library().native_simd()
    flags = native.FLAGS + os.environ.get(native.EXTRA_FLAGS_ENV, "").split()
    target = [f for f in flags if f.startswith("-m")]
    probe = subprocess.run(
        [native._compiler(), *target, "-dM", "-E", "-x", "c", "/dev/null"], capture_output=True, text=True, check=True
    ).stdout
    assert lanes == (16 if "__AVX512F__" in probe else 8)
    assert native.prefill_keys() == native._prefill_keys(lanes, torch.backends.cpu.get_cpu_capability())


def test_cpu_attention_benchmark_compares_both_kernels_on_the_same_inputs(tmp_path: Any, capsys: Any) -> None:
    """`optimist bench cpu-attention` at tiny shapes: a row per shape with both sides timed, outputs that agree, and
    what this machine runs (our width, torch's capability, the engine's bound)."""
    import json

    from optimist.engine.cli import build_parser

    parser = build_parser()
    out = tmp_path / "attention.json"
    args = parser.parse_args(["bench", "cpu-attention", "--shapes", "16:16,40:300", "--heads", "4", "--kv-heads", "2",
                              "--dim", "32", "--decode", "3:1500,8:4", "--repeats", "1",
                              "--out", str(out)])  # fmt: skip
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert [(r["n"], r["keys"]) for r in report["rows"]] == [(16, 16), (40, 300)]
    # decode steps: more sequences than keys is a shape too; 1,500 keys take the chunked (split) kernel
    caches = ["float32"] + (["float16"] if native.kv_float16() else [])
    assert [(r["m"], r["keys"], r["cache"]) for r in report["decode_rows"]] == [
        (m, keys, cache) for m, keys in ((3, 1500), (8, 4)) for cache in caches
    ]
    for r in report["rows"] + report["decode_rows"]:
        assert r["ours_ms"] > 0 and r["torch_ms"] > 0 and r["max_abs_error"] < 1e-5
    assert report["lanes"] == native.library().native_simd() and report["prefill_keys"] == native.prefill_keys()
    text = out.with_suffix(".md").read_text()
    assert text.startswith("| rows | keys | ours ms |") and "| sequences | keys | cache | ours ms |" in text
    for shape, named in (("8:4", "0 < n <= L"), ("8", "n:L")):
        with pytest.raises(SystemExit):
            parser.parse_args(["bench", "cpu-attention", "--shapes", shape])
        assert named in capsys.readouterr().err


def test_prefill_elementwise_steps_in_c_match_torchs() -> None:
    """A prefill chunk's RMSNorm, rotary embedding (in place, bit for bit) and SiLU x up, rows in parallel in C."""
    import torch.nn.functional as F

    from optimist.engine.model.llama import apply_rope

    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(130, 96, generator=g) * 3, torch.randn(96, generator=g)
    got = native.rms_norm_rows(x, w, 1e-5)
    assert torch.allclose(got, F.rms_norm(x, (96,), w, 1e-5), rtol=1e-5, atol=1e-5)
    # rotary over the query and key heads of a fused QKV output (rows 10 * 16 floats apart), V untouched
    qkv = torch.randn(70, 10 * 16, generator=g)
    cos, sin = torch.randn(70, 16, generator=g), torch.randn(70, 16, generator=g)
    want = apply_rope(qkv[:, :128].view(70, 8, 16), cos, sin)
    done = qkv.clone()
    assert native.rope_rows_(done[:, :128].view(70, 8, 16), cos, sin)
    assert torch.equal(done[:, :128].view(70, 8, 16), want) and torch.equal(done[:, 128:], qkv[:, 128:])
    # layouts and sizes it does not take are left to torch: nothing written
    big = torch.randn(4, 1, 1024, generator=g)
    assert not native.rope_rows_(big.clone(), torch.ones(4, 1024), torch.ones(4, 1024))
    strided = qkv.clone()
    assert not native.rope_rows_(strided[:, :128].view(70, 8, 16)[:, ::2], cos, sin)
    assert torch.equal(strided, qkv)
    gate, up = torch.randn(33, 200, generator=g) * 6, torch.randn(33, 200, generator=g)
    want = F.silu(gate) * up
    assert torch.allclose(native.silu_mul_(gate.clone(), up), want, rtol=1e-5, atol=1e-6)
