"""Reduced-precision weights: GGUF blocks are kept exactly and the native kernels do float32 arithmetic on them;
the float16 path stays close to float; both answer like the float path."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from optimist.engine.config import EngineConfig
from optimist.engine.engine import Engine
from optimist.engine.model import native
from optimist.engine.model.llama import prompt_logits
from optimist.engine.model.native import NativeLinear, NativeWeight
from optimist.engine.model.quant import Fp16Linear, fp16_available
from optimist.engine.request import SamplingParams

needs_fp16 = pytest.mark.skipif(not fp16_available(), reason="torch has no fbgemm float16 GEMM")
needs_native = pytest.mark.skipif(native.unavailable_reason() is not None, reason=str(native.unavailable_reason()))


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0])
def test_gguf_blocks_are_kept_exactly(qtype: T) -> None:
    rng = np.random.default_rng(int(qtype))
    n, k = 96, 128
    raw = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)
    reference = gguf.quants.dequantize(raw, qtype).reshape(n, k)
    weight = NativeWeight.from_gguf(raw, int(qtype), n, k)
    assert weight.shape == (n, k)
    assert np.array_equal(weight.dequantize(), reference)
    # rows permute together (the loader undoes llama.cpp's rotary row order this way)
    flipped = weight.map_rows(lambda a: a[::-1])
    assert np.array_equal(flipped.dequantize(), reference[::-1])
    both = NativeWeight.concat([weight, flipped])
    assert np.array_equal(both.dequantize(), np.concatenate([reference, reference[::-1]]))


def test_unsupported_block_types_are_refused() -> None:
    raw = gguf.quants.quantize(np.ones((4, 64), dtype=np.float32), T.Q5_0)
    with pytest.raises(ValueError, match="no native kernel"):
        NativeWeight.from_gguf(raw, int(T.Q5_0), 4, 64)
    with pytest.raises(ValueError, match="different block types"):
        q4 = NativeWeight.from_gguf(gguf.quants.quantize(np.ones((4, 64), np.float32), T.Q4_1), int(T.Q4_1), 4, 64)
        q8 = NativeWeight.from_gguf(gguf.quants.quantize(np.ones((4, 64), np.float32), T.Q8_0), int(T.Q8_0), 4, 64)
        NativeWeight.concat([q4, q8])


@needs_native
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 11, 33, 150])  # >4: the panel kernel; 150: two row blocks
def test_native_kernel_is_float_arithmetic_on_the_files_weights(qtype: T, rows: int) -> None:
    rng = np.random.default_rng(rows)
    n, k = 74, 224  # k: 7 blocks (odd, so no pairing of blocks is assumed); n: not a whole number of panels
    raw = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)
    w = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(n, k).copy())
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    got = NativeLinear(NativeWeight.from_gguf(raw, int(qtype), n, k))(x)  # no fallback: every row natively
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    exact = x.double() @ w.double().t()
    # float32 products and sums of the exact weights: the error is float32 rounding over k terms, as in x @ w.T
    bound = 8 * k * 2**-24 * (x.double().abs() @ w.double().abs().t())
    assert ((got.double() - exact).abs() <= bound).all()
    assert ((x @ w.t()).double() - exact).abs().max() <= bound.max()  # the same bound holds for torch's float32


@needs_native
def test_native_linear_hands_large_calls_to_its_fallback() -> None:
    raw = gguf.quants.quantize(np.random.default_rng(0).standard_normal((40, 64)).astype(np.float32), T.Q4_1)
    w = torch.from_numpy(gguf.quants.dequantize(raw, T.Q4_1).reshape(40, 64).copy())
    fallback = torch.nn.Linear(64, 40, bias=False)
    fallback.weight.data = -w  # a different answer, to tell which path ran
    layer = NativeLinear(NativeWeight.from_gguf(raw, int(T.Q4_1), 40, 64), fallback, native_rows=4)
    x = torch.randn(5, 64)
    assert torch.allclose(layer(x[:4]), x[:4] @ w.t(), atol=1e-4)
    assert torch.equal(layer(x), fallback(x))


@needs_native
@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q8_0])
def test_native_linear_widens_its_blocks_for_prefill_sized_calls(qtype: T) -> None:
    """From WIDEN_ROWS rows a layer runs torch's float32 GEMM over its blocks widened for the call: the file's
    weights exactly (not the fallback's), nothing kept between calls."""
    n, k = 48, 96
    raw = gguf.quants.quantize(np.random.default_rng(1).standard_normal((n, k)).astype(np.float32), qtype)
    w = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(n, k).copy())
    fallback = torch.nn.Linear(k, n, bias=False)
    fallback.weight.data = -w  # a different answer, to tell which path ran
    layer = NativeLinear(NativeWeight.from_gguf(raw, int(qtype), n, k), fallback, native_rows=4)
    assert torch.allclose(layer.widened(), w, rtol=1e-6, atol=1e-7)  # the blocks' values (d * q + z, fused)
    x = torch.randn(native.WIDEN_ROWS, k, generator=torch.Generator().manual_seed(2))
    exact = x.double() @ w.double().t()
    got = layer(x)
    assert ((got.double() - exact).abs() <= 8 * k * 2**-24 * (x.double().abs() @ w.double().abs().t()) + 1e-6).all()
    assert torch.equal(layer(x[:-1]), fallback(x[:-1]))  # one row fewer: the fallback
    kept = [t for t in vars(layer).values() if isinstance(t, torch.Tensor) and t.dtype == torch.float32]
    assert sum(t.numel() for t in kept) < n * k  # only the blocks' scales: no float32 copy of the weights


def test_native_build_failure_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OPTIMIST_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "cc"))
    (tmp_path / "cc").write_text("#!/bin/sh\necho 'cc: error: unrecognized option' >&2\nexit 1\n")
    (tmp_path / "cc").chmod(0o755)
    with pytest.raises(native.NativeUnavailable, match=r"building the native CPU kernels .* failed: cc: error"):
        native.build()
    assert not list(tmp_path.rglob("*.so"))  # no partial library left behind


@needs_native
@pytest.mark.slow
def test_int4_engine_answers_like_the_float_engine(engine: Engine, model_path: Path) -> None:
    fast = Engine(EngineConfig(model=model_path, device="cpu", kv_cache_tokens=4096))  # weights=auto
    try:
        assert fast.weights == "int4"  # what auto picks for a GGUF of Q4_1/Q8_0 blocks where the kernels build
        assert isinstance(fast.model.head_fast, NativeLinear)
        assert fast.model.native_decoder is not None  # decode steps of a few sequences: one C call
        assert all(isinstance(m, NativeLinear) for b in fast.model.layers for m in (b.attn.wqkv, b.mlp.w_down))
        prompts = ["The capital of France is", "def fibonacci(n):", "1, 1, 2, 3, 5,"]
        prompts.append(fast.tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}]))
        for text in prompts:
            ids = engine.tokenizer.encode(text)
            params = SamplingParams(temperature=0, max_tokens=16)
            exact = engine.generate(engine.new_request(ids, params))
            got = fast.generate(fast.new_request(ids, params))
            assert got[:2] == exact[:2], text
            # Prompts of up to 4 tokens run every matmul natively (longer ones are prefilled with the fallback):
            # the file's weights exactly and float32 arithmetic, so logits agree to float32 rounding (fp16: ~0.1%).
            logits = prompt_logits(engine.model, ids[:4]).cpu()  # the engine fixture is on the GPU where there is one
            diff = (prompt_logits(fast.model, ids[:4]) - logits).abs().max().item()
            assert diff < 1e-4 * logits.abs().max().item(), (text, diff)
    finally:
        fast.shutdown()


@needs_fp16
@pytest.mark.parametrize("rows", [1, 8, 33, 700])
def test_fp16_linear_is_float_arithmetic_on_rounded_weights(rows: int) -> None:
    torch.manual_seed(rows)
    w = torch.randn(96, 160)
    x = torch.randn(rows, 160)
    got = Fp16Linear(w)(x)
    assert got.dtype == torch.float32 and got.shape == (rows, 96)
    exact_rounded = (x.double() @ w.half().double().t()).float()
    # float32 sums of float32 activations times the float16-rounded weights: float32 rounding only ...
    assert torch.allclose(got, exact_rounded, rtol=1e-5, atol=1e-4)
    # ... and the rounding of the weights is the whole difference from float32 weights
    exact = x @ w.t()
    assert (got - exact).abs().max().item() < 2**-10 * (x.abs() @ w.abs().t()).max().item()
    assert not torch.equal(got, exact)


@needs_fp16
@pytest.mark.slow
def test_fp16_engine_answers_like_the_float_engine(engine: Engine, model_path: Path) -> None:
    fast = Engine(EngineConfig(model=model_path, device="cpu", weights="fp16", kv_cache_tokens=4096))  # CPU kernels
    try:
        prompts = ["The capital of France is", "def fibonacci(n):", "1, 1, 2, 3, 5,"]
        prompts.append(fast.tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}]))
        for text in prompts:
            ids = engine.tokenizer.encode(text)
            params = SamplingParams(temperature=0, max_tokens=16)
            exact = engine.generate(engine.new_request(ids, params))
            approx = fast.generate(fast.new_request(ids, params))
            assert approx[:2] == exact[:2], text
            logits = prompt_logits(engine.model, ids).cpu()  # the engine fixture is on the GPU where there is one
            diff = (prompt_logits(fast.model, ids) - logits).abs().max().item()
            # float16 weights move logits by ~0.1% of their range (the int4 path by 1-2%)
            assert diff < 0.004 * logits.abs().max().item(), (text, diff)
    finally:
        fast.shutdown()


def test_auto_weights_pick_fp16_for_float_tensors_and_float_where_it_would_change_the_arithmetic(
    tiny_gguf: Path,
) -> None:
    # the tiny GGUF holds float32 tensors: no blocks for the native kernels
    chosen = {}
    for dtype in ("auto", "bfloat16"):
        eng = Engine(EngineConfig(model=tiny_gguf, device="cpu", dtype=dtype, kv_cache_tokens=256))
        chosen[dtype] = eng.weights
        eng.shutdown()
    assert chosen == {"auto": "fp16" if fp16_available() else "float", "bfloat16": "float"}
