"""Greedy generations and logits match Hugging Face transformers on the same model files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from optimist.engine.config import EngineConfig
from optimist.engine.engine import Engine
from optimist.engine.model.llama import prompt_logits
from optimist.engine.request import FinishReason, SamplingParams

from .. import tiny_llama

# Greedy choices may differ only where the reference's top two logits are this close (float summation order).
TIE_GAP = 2e-3

PLAIN = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,", "1, 1, 2, 3, 5,"]
CHAT = ["What is 2 + 2?", "Write a haiku about autumn.", "Name three programming languages."]


def hf_greedy(model: Any, prompt_ids: list[int], n: int, eos: tuple[int, ...]) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, eos_token_id=list(eos), pad_token_id=eos[0]
        )
    ids: list[int] = out[0, len(prompt_ids) :].tolist()
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


def hf_top2_gap(model: Any, ids: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    top = logits.topk(2).values
    return float(top[0] - top[1])


def assert_same_or_tie(model: Any, prompt: list[int], ours: list[int], ref: list[int]) -> None:
    for i, (a, b) in enumerate(zip(ours, ref, strict=False)):
        if a != b:
            gap = hf_top2_gap(model, prompt + ref[:i])
            assert gap < TIE_GAP, f"diverged at token {i} ({a} vs {b}) where the reference's top-2 gap is {gap:.4f}"
            return
    assert len(ours) == len(ref), f"lengths differ: {len(ours)} vs {len(ref)}"


def greedy(engine: Engine, prompt_ids: list[int], n: int) -> list[int]:
    ids, _, final = engine.generate(engine.new_request(prompt_ids, SamplingParams(temperature=0, max_tokens=n)))
    assert final.reason in (FinishReason.EOS, FinishReason.LENGTH)
    return ids


@pytest.mark.slow
@pytest.mark.parametrize("prompt,chat", [(p, False) for p in PLAIN] + [(p, True) for p in CHAT])
def test_default_model_greedy_matches_transformers(engine: Engine, hf_model: Any, prompt: str, chat: bool) -> None:
    tok = engine.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
    prompt_ids = tok.encode(text)
    ref = hf_greedy(hf_model, prompt_ids, 24, tok.eos_ids)
    ours = greedy(engine, prompt_ids, 24)
    assert_same_or_tie(hf_model, prompt_ids, ours, ref)


@pytest.mark.slow
def test_default_model_last_logits_close(engine: Engine, hf_model: Any) -> None:
    for prompt in PLAIN:
        ids = engine.tokenizer.encode(prompt)
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0, -1].float()
        ours = prompt_logits(engine.model, ids).float().cpu()
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() < 1e-3 * ref.abs().max().item(), prompt
        assert ours.argmax() == ref.argmax()


def _tiny_engine(path: Path) -> Engine:
    return Engine(EngineConfig(model=path, weights="float", dtype="float32", kv_cache_tokens=4096))  # as the reference


@pytest.mark.parametrize("kind", ["gguf", "safetensors", "qwen2", "qwen2-gguf"])
def test_tiny_random_llama_matches_transformers(
    kind: str, tiny_gguf: Path, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The tiny Llama and a tiny Qwen2 (Q/K/V biases, NeoX rotary in GGUF) from both formats."""
    from transformers import AutoModelForCausalLM

    if kind in ("gguf", "qwen2-gguf"):
        path = tiny_gguf
        if kind == "qwen2-gguf":
            path = tiny_llama.write_gguf(tmp_path_factory.mktemp("qg") / "tiny.gguf", arch="qwen2")
        ref_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
        engine = _tiny_engine(path)
    else:
        folder = tiny_dir if kind == "safetensors" else tiny_llama.write_hf_dir(tmp_path_factory.mktemp("q"), arch=kind)
        ref_model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        assert type(ref_model).__name__ == ("Qwen2ForCausalLM" if kind == "qwen2" else "LlamaForCausalLM")
        engine = _tiny_engine(folder)
    try:
        for prompt in ["the cat sat on the mat", "in a hole in the ground", "x"]:
            ids = engine.tokenizer.encode(prompt)
            with torch.no_grad():
                ref_logits = ref_model(torch.tensor([ids])).logits[0, -1].float()
            ours_logits = prompt_logits(engine.model, ids).cpu()
            assert (ours_logits - ref_logits).abs().max().item() < 1e-4 * max(1.0, ref_logits.abs().max().item())
            ref = hf_greedy(ref_model, ids, 20, engine.tokenizer.eos_ids)
            assert_same_or_tie(ref_model, ids, greedy(engine, ids, 20), ref)
    finally:
        engine.shutdown()


def test_tiny_qwen2_answers_alike_in_each_cpu_weight_mode(tmp_path: Path) -> None:
    """The Q/K/V biases live beside the projection, so float16 weights (the CPU default for these folders) keep
    them: logits as close to exact float32 weights' as for a Llama (test_quant's bound), and the serving path runs."""
    folder = tiny_llama.write_hf_dir(tmp_path / "qwen2", arch="qwen2", seed=3)
    exact = Engine(EngineConfig(model=folder, device="cpu", weights="float", kv_cache_tokens=1024))
    fast = Engine(EngineConfig(model=folder, device="cpu", weights="auto", kv_cache_tokens=1024))
    try:
        assert fast.model_config.attention_bias and fast.model.native_decoder is None
        for text in ("the cat sat", "in a hole in the ground", "x"):
            ids = exact.tokenizer.encode(text)
            ref = prompt_logits(exact.model, ids)
            assert (prompt_logits(fast.model, ids) - ref).abs().max().item() < 0.004 * ref.abs().max().item(), text
            params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
            tokens, _, final = fast.generate(fast.new_request(ids, params))
            assert len(tokens) == 12 and final.reason == FinishReason.LENGTH
    finally:
        exact.shutdown()
        fast.shutdown()


def test_quantized_qwen2_gguf_runs_the_native_linears_with_its_biases(tmp_path: Path) -> None:
    """Q8_0 layers: the native kernels (weights=int4) read the blocks, the biases are added beside them, and the
    all-C decoder (which adds none) stays out; logits as with the same values in float32."""
    import gguf

    path = tiny_llama.write_gguf(tmp_path / "q8.gguf", arch="qwen2", qtype=gguf.GGMLQuantizationType.Q8_0)
    exact = Engine(EngineConfig(model=path, device="cpu", weights="float", kv_cache_tokens=1024))
    fast = Engine(EngineConfig(model=path, device="cpu", weights="int4", kv_cache_tokens=1024))
    try:
        assert fast.weights == "int4" and fast.model.native_decoder is None
        for text in ("the cat sat", "in a hole in the ground"):
            ids = exact.tokenizer.encode(text)
            ref = prompt_logits(exact.model, ids)
            assert (prompt_logits(fast.model, ids) - ref).abs().max().item() < 1e-3 * ref.abs().max().item(), text
            params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
            # decode steps too (a C decoder without the biases would answer otherwise)
            assert fast.generate(fast.new_request(ids, params))[0] == exact.generate(exact.new_request(ids, params))[0]
    finally:
        exact.shutdown()
        fast.shutdown()
