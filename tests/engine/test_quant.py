"""int4 weights: GGUF blocks decode exactly; the int4 kernel path stays close to float and answers the same."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from optimist.engine.config import EngineConfig
from optimist.engine.engine import Engine
from optimist.engine.model.quant import Int4Linear, int4_available, parts_from_gguf
from optimist.engine.request import SamplingParams

pytestmark = pytest.mark.skipif(not int4_available(), reason="torch has no int4 CPU kernel")


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


@pytest.mark.slow
def test_int4_engine_answers_like_the_float_engine(engine: Engine, model_path: Path) -> None:
    fast = Engine(EngineConfig(model=model_path, weights="int4", kv_cache_tokens=4096))
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
