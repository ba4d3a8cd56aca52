"""Reduced-precision weights: GGUF blocks decode exactly; the int4 and float16 paths stay close to float and
answer the same."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from optimist.engine.config import EngineConfig
from optimist.engine.engine import Engine
from optimist.engine.model.llama import prompt_logits
from optimist.engine.model.quant import Fp16Linear, Int4Linear, fp16_available, int4_available, parts_from_gguf
from optimist.engine.request import SamplingParams

needs_int4 = pytest.mark.skipif(not int4_available(), reason="torch has no int4 CPU kernel")
needs_fp16 = pytest.mark.skipif(not fp16_available(), reason="torch has no fbgemm float16 GEMM")


@needs_int4
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0])
def test_blocks_decode_exactly_and_the_kernel_matches_float(qtype: T) -> None:
    rng = np.random.default_rng(int(qtype))
    n, k = 96, 128
    w = rng.standard_normal((n, k)).astype(np.float32)
    raw = gguf.quants.quantize(w, qtype)
    reference = gguf.quants.dequantize(raw, qtype).reshape(n, k)
    parts = parts_from_gguf(raw, int(qtype), n, k)
    assert np.array_equal(sum(p.dequantize() for p in parts), reference)
    x = torch.randn(5, k)
    expected = x @ torch.from_numpy(reference).t()
    got = Int4Linear(parts)(x)
    # bfloat16 activations: about 3 significant digits per product, errors average out over k
    assert (got - expected).abs().max().item() < 0.02 * expected.abs().max().item()


@needs_int4
@pytest.mark.slow
def test_int4_engine_answers_like_the_float_engine(engine: Engine, model_path: Path) -> None:
    fast = Engine(EngineConfig(model=model_path, device="cpu", weights="int4", kv_cache_tokens=4096))  # CPU kernels
    try:
        for text in ["The capital of France is", "def fibonacci(n):", "1, 1, 2, 3, 5,"]:
            ids = engine.tokenizer.encode(text)
            params = SamplingParams(temperature=0, max_tokens=8)
            exact = engine.generate(engine.new_request(ids, params))[0]
            approx = fast.generate(fast.new_request(ids, params))[0]
            assert approx[:4] == exact[:4], text
        chat = fast.tokenizer.encode(
            fast.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
        )
        assert "Paris" in fast.generate(fast.new_request(chat, SamplingParams(temperature=0, max_tokens=20)))[1]
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


def test_auto_weights_pick_fp16_on_cpu_and_float_where_it_would_change_the_arithmetic(tiny_gguf: Path) -> None:
    chosen = {}
    for dtype in ("auto", "bfloat16"):
        eng = Engine(EngineConfig(model=tiny_gguf, device="cpu", dtype=dtype, kv_cache_tokens=256))
        chosen[dtype] = eng.weights
        eng.shutdown()
    assert chosen == {"auto": "fp16" if fp16_available() else "float", "bfloat16": "float"}
