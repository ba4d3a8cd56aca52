"""A float16 KV cache under a float32 CPU model (`--kv-cache-dtype float16`): half the bytes per token, the native
decode kernels reading it (converted on load), and the same answers as the float32 cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from optimist.engine.bench.prefill import passkey_prompt, repeats_for
from optimist.engine.config import ConfigError, EngineConfig
from optimist.engine.engine import Engine
from optimist.engine.model import native
from optimist.engine.request import SamplingParams

needs_f16 = pytest.mark.skipif(not native.kv_float16(), reason="the decode kernels take no float16 cache here")


def test_kv_cache_dtype_is_checked(tiny_gguf: Path) -> None:
    with pytest.raises(ConfigError, match="kv_cache_dtype must be auto, float32 or float16"):
        Engine(EngineConfig(model=tiny_gguf, device="cpu", kv_cache_tokens=256, kv_cache_dtype="int8"))
    with pytest.raises(ConfigError, match="CPU engines with float32 activations; this one runs bfloat16"):
        Engine(EngineConfig(model=tiny_gguf, device="cpu", dtype="bfloat16", kv_cache_tokens=256,
                            kv_cache_dtype="float16"))  # fmt: skip
    with pytest.raises(ConfigError, match="kv_cache_dtype=float32 under a bfloat16 model"):
        Engine(EngineConfig(model=tiny_gguf, device="cpu", dtype="bfloat16", kv_cache_tokens=256,
                            kv_cache_dtype="float32"))  # fmt: skip


def _answer(engine: Engine, ids: list[int], n: int) -> list[int]:
    out, _, _ = engine.generate(engine.new_request(ids, SamplingParams(temperature=0.0, max_tokens=n)))
    return list(out)


@needs_f16
def test_float16_cache_holds_half_the_bytes_and_answers_as_the_float32_one(engine: Engine, model_path: Path) -> None:
    """Float32 weights and activations both, only the cache differs: a question and a 1.5K-token passkey prompt (its
    decode steps read more than one 1,024-key chunk per KV group) get the float32 cache's greedy answers."""
    half = Engine(EngineConfig(model=model_path, weights="float", dtype="float32", kv_cache_tokens=4096,
                               kv_cache_dtype="float16"))  # fmt: skip
    try:
        assert engine.kv_dtype == torch.float32 and half.kv_dtype == torch.float16
        k16, k32 = half.runner.kv_cache[0][0], engine.runner.kv_cache[0][0]
        assert k16.dtype == torch.float16 and k16[0].nbytes * 2 == k32[0].nbytes  # per slot: half the bytes
        assert half.model.native_attention  # decode attention reads it in C
        tok = half.tokenizer
        question = tok.encode("What is the capital of France? Answer in one sentence.")
        assert _answer(half, question, 16) == _answer(engine, question, 16)
        ids = tok.encode(passkey_prompt(repeats_for(1500)))
        answer = _answer(half, ids, 8)
        assert "68193" in tok.decode(answer)
        assert answer == _answer(engine, ids, 8)
    finally:
        half.shutdown()


@needs_f16
@pytest.mark.slow
def test_native_decoder_runs_over_a_float16_cache(model_path: Path) -> None:
    """The default CPU engine (int4 weights: decode steps in one C call) with a float16 cache: the C decoder is the
    one that runs, and the passkey comes back."""
    eng = Engine(EngineConfig(model=model_path, device="cpu", kv_cache_tokens=4096, kv_cache_dtype="float16"))
    try:
        assert eng.weights == "int4" and eng.model.native_decoder is not None
        rows: list[int] = []
        run = eng.model.native_decoder.run
        eng.model.native_decoder.run = lambda x, *a: rows.append(x.shape[0]) or run(x, *a)  # type: ignore[method-assign]
        ids = eng.tokenizer.encode(passkey_prompt(repeats_for(1500)))
        assert "68193" in eng.tokenizer.decode(_answer(eng, ids, 8))
        # every position after the first token's went through C (in fewer steps where the answer copies the prompt:
        # speculative drafts are rows of the same call)
        assert sum(rows) >= 7
    finally:
        eng.shutdown()
