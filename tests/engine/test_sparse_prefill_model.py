"""Sparse prefill on the real default model: the bundled searched patterns keep at least 95% of the attention mass
on a long prompt, a passkey near the model's usable context is answered identically with sparse and dense prefill
(chunked), and short requests decoding alongside a long sparse prefill get the outputs they get alone."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from optimist.engine.attention.sparse.config import bundled_pattern_file, load_pattern_config
from optimist.engine.attention.sparse.search import evaluate
from optimist.engine.bench.prefill import passkey_prompt, repeats_for
from optimist.engine.config import EngineConfig
from optimist.engine.engine import Engine
from optimist.engine.model.llama import prompt_logits
from optimist.engine.request import SamplingParams

from ..conftest import run_concurrently

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sparse_engine(model_path: Path) -> Engine:
    # float32 activations like the dense `engine` fixture it is compared with (bfloat16 would be the GPU default)
    eng = Engine(EngineConfig(model=model_path, dtype="float32", kv_cache_tokens=16384, sparse_prefill_threshold=4096))
    yield eng  # type: ignore[misc]
    eng.shutdown()


def test_bundled_patterns_keep_95_percent_of_the_attention_mass(engine: Engine, model_path: Path) -> None:
    path = bundled_pattern_file(model_path)
    assert path is not None, "the default model ships a searched pattern file"
    mc = engine.model_config
    patterns = load_pattern_config(path, mc.num_layers, mc.num_heads)
    ids = engine.tokenizer.encode(passkey_prompt(repeats_for(4096)))  # not the calibration text
    recall, density = evaluate(engine.model, ids, patterns)
    assert recall >= 0.95, f"recall {recall:.4f} at density {density:.3f}"
    assert density < 0.6, f"the patterns visit {density:.0%} of the causal pairs: hardly sparse"


def test_gpu_plan_keeps_95_percent_of_the_attention_mass(engine: Engine, model_path: Path) -> None:
    """The CUDA path chooses per head (`gpu.plan`), not per KV group as the CPU path and the search do: its own
    choices keep the mass too. The plan is tensor code, so this runs wherever the suite does."""
    import torch

    from optimist.engine.attention.sparse.gpu import plan
    from optimist.engine.attention.sparse.search import capture_qk
    from optimist.engine.bench.sparse_attention import recall

    path = bundled_pattern_file(model_path)
    assert path is not None
    mc = engine.model_config
    patterns = load_pattern_config(path, mc.num_layers, mc.num_heads)
    ids = engine.tokenizer.encode(passkey_prompt(repeats_for(4096)))
    n = len(ids)
    rows = torch.linspace(n // 8, n - 1, 64).long().unique()
    kept, visited = [], 0
    for layer, (q, k) in enumerate(capture_qk(engine.model, ids)):
        sparse = plan(q, k, 0, patterns[layer])
        visited += sum(int(sparse.rows_mask(h, rows).sum()) for h in range(mc.num_heads))
        kept.append(recall(q.transpose(0, 1), k.transpose(0, 1), sparse.rows_mask, rows))
    density = visited / (mc.num_layers * mc.num_heads * int((rows + 1).sum()))
    assert sum(kept) / len(kept) >= 0.95, f"recall {sum(kept) / len(kept):.4f} at density {density:.3f}"
    assert density < 0.6, f"the plan visits {density:.0%} of the sampled rows' causal pairs: hardly sparse"


def _greedy(engine: Engine, ids: list[int], n: int) -> list[int]:
    out, _, final = engine.generate(engine.new_request(ids, SamplingParams(temperature=0.0, max_tokens=n)))
    assert final.reason.value in ("length", "eos", "stop")
    return list(out)


def test_passkey_near_the_usable_context_same_answer_sparse_and_dense(engine: Engine, sparse_engine: Engine) -> None:
    ids = engine.tokenizer.encode(passkey_prompt(repeats_for(7200)))
    assert 7000 < len(ids) < engine.model_config.context_length
    before = sparse_engine.load().sparse_prefill_tokens
    # dense prefill with everything else as the sparse engine has it (its weights and prefill matmuls: int4 and,
    # with VNNI, int8 activations), so that only the attention differs
    config = dataclasses.replace(sparse_engine.config, sparse_prefill_threshold=0, kv_cache_tokens=8192)
    dense_engine = Engine(config)
    try:
        dense = _greedy(dense_engine, ids, 8)
    finally:
        dense_engine.shutdown()
    sparse = _greedy(sparse_engine, ids, 8)
    assert "68193" in engine.tokenizer.decode(dense)
    assert "68193" in engine.tokenizer.decode(_greedy(engine, ids, 8))  # the exact engine (float weights) too
    assert sparse == dense
    # the whole prompt went through the sparse path, in chunks (the engine's step budget is 2048 tokens)
    assert sparse_engine.load().sparse_prefill_tokens - before == len(ids)
    assert sparse_engine.config.max_num_batched_tokens < len(ids)


def test_short_requests_decode_alongside_a_long_sparse_prefill(engine: Engine, sparse_engine: Engine) -> None:
    texts = ["The sun", "Rivers flow", "Numbers: 1, 2,"]
    shorts = [engine.tokenizer.encode(t) for t in texts]
    long_ids = engine.tokenizer.encode(passkey_prompt(repeats_for(5000)))
    n = 24
    expected = [_greedy(engine, p, n) for p in shorts]
    requests = [sparse_engine.new_request(p, SamplingParams(temperature=0, max_tokens=n)) for p in shorts]
    requests.append(sparse_engine.new_request(long_ids, SamplingParams(temperature=0, max_tokens=8)))
    outputs = run_concurrently(sparse_engine, requests)
    assert "68193" in engine.tokenizer.decode(outputs[len(shorts)])
    for text, want, got in zip(texts, expected, [outputs[i] for i in range(len(shorts))], strict=True):
        diverged = next((i for i, (x, y) in enumerate(zip(want, got, strict=False)) if x != y), None)
        if diverged is not None:  # allowed only at a float-noise tie (batched matmuls reorder sums)
            top = prompt_logits(engine.model, engine.tokenizer.encode(text) + want[:diverged]).topk(2).values
            assert float(top[0] - top[1]) < 2e-3, f"{text!r} diverged at {diverged}"


def test_gpu_engines_are_told_when_prefill_chunks_are_too_small_for_sparse_prefill() -> None:
    """On a GPU, sparse prefill re-planned for every 2K chunk is slower than dense: the engine says so at start,
    naming the flag; on CPU (where it pays from a few thousand tokens) and with large chunks it says nothing."""
    from optimist.engine.engine import SPARSE_GPU_CHUNK, sparse_chunk_advice

    advice = sparse_chunk_advice("cuda", 2048)
    assert advice is not None and "--max-batched-tokens" in advice and "2048" in advice
    assert sparse_chunk_advice("cuda", SPARSE_GPU_CHUNK) is None
    assert sparse_chunk_advice("cpu", 2048) is None
