"""Prompt logprobs (scoring a text): each prompt token's logprob under the model, as the engine computes them in
its prefill chunks, equal to one whole-prompt forward pass; over gRPC and as OpenAI's echo + logprobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from optimist.engine.api import engine_pb2 as pb
from optimist.engine.api import engine_pb2_grpc as pb_grpc
from optimist.engine.config import EngineConfig
from optimist.engine.engine import Engine
from optimist.engine.model.llama import prompt_logits
from optimist.engine.outputs import Chunk, Finished
from optimist.engine.request import SamplingParams

from ..conftest import ServerThread, events_of

TEXT = "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times."


def run(engine: Engine, ids: list[int], params: SamplingParams) -> tuple[list[Any], list[int], Finished]:
    """(prompt logprob entries, generated tokens, final), checking prompt entries come before any token."""
    events = events_of(engine, engine.new_request(ids, params))
    chunks = [e for e in events if isinstance(e, Chunk)]
    scored = [i for i, c in enumerate(chunks) if c.prompt_logprobs]
    tokens_at = [i for i, c in enumerate(chunks) if c.token_ids]
    assert not scored or not tokens_at or max(scored) < min(tokens_at), "prompt logprobs after a generated token"
    final = events[-1]
    assert isinstance(final, Finished)
    return [e for c in chunks for e in c.prompt_logprobs], [t for c in chunks for t in c.token_ids], final


def reference(engine: Engine, ids: list[int]) -> torch.Tensor:
    """[n - 1, vocab] log-probabilities of prompt tokens 1.. from one forward pass over the whole prompt."""
    return prompt_logits(engine.model, ids, every_position=True)[:-1].float().log_softmax(dim=-1).cpu()


def check(entries: list[Any], ids: list[int], ref: torch.Tensor, k: int, tol: float) -> None:
    assert [tok for tok, _, _ in entries] == ids[1:]  # every prompt token from the second, once, in order
    for i, (tok, lp, top) in enumerate(entries):
        assert abs(lp - ref[i, tok].item()) < tol, i
        assert len(top) == k
        # the k most likely tokens (in order; equal values may trade places): their values match the reference's
        best = ref[i].topk(k).values.tolist()
        assert all(abs(v - b) < tol for (_, v), b in zip(top, best, strict=True))
        assert all(abs(v - ref[i, t].item()) < tol for t, v in top)


def test_prompt_logprobs_equal_one_forward_pass(engine: Engine) -> None:
    ids = engine.tokenizer.encode(TEXT)
    entries, tokens, final = run(engine, ids, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3))
    check(entries, ids, reference(engine, ids), 3, 1e-3)
    assert len(tokens) == 2 and final.prompt_tokens == len(ids)


def test_chunked_prefill_and_the_prefix_cache_score_each_token_once(tiny_gguf: Path) -> None:
    """16-token prefill chunks; the same prompt already cached (its blocks are not reused for scoring)."""
    eng = Engine(EngineConfig(model=tiny_gguf, kv_cache_tokens=1024, max_num_batched_tokens=16, max_num_seqs=4))
    try:
        ids = eng.tokenizer.encode("the cat sat on the mat in a hole in the ground " * 3)
        assert len(ids) > 40
        run(eng, ids, SamplingParams(temperature=0, max_tokens=1))  # now cached
        entries, _, final = run(eng, ids, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
        assert final.cached_tokens == 0
        check(entries, ids, reference(eng, ids), 0, 1e-4)
        again, _, final = run(eng, ids, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
        assert final.cached_tokens == 0 and again == entries
    finally:
        eng.shutdown()


def test_prompt_logprobs_over_grpc(server: ServerThread, engine: Engine) -> None:
    ids = engine.tokenizer.encode(TEXT)
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2)
    )
    with grpc.insecure_channel(server.address) as channel:
        chunks = [m.chunk for m in pb_grpc.EngineStub(channel).Generate(request) if m.HasField("chunk")]
    entries = [(e.token_id, e.logprob, [(t.token_id, t.logprob) for t in e.top]) for c in chunks
               for e in c.prompt_logprobs]  # fmt: skip
    check(entries, ids, reference(engine, ids), 2, 1e-3)
    bad = pb.GenerateRequest(text="x", sampling=pb.SamplingParams(prompt_logprobs=21))
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as err:
        list(pb_grpc.EngineStub(channel).Generate(bad))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sampling.prompt_logprobs" in err.value.details()


@pytest.mark.parametrize("stream", [False, True])
def test_openai_echo_with_logprobs_scores_the_prompt(engine: Engine, stream: bool) -> None:
    """What evaluation harnesses send to score a text: echo, logprobs, a token or so."""
    openai = pytest.importorskip("openai")  # a test extra (the GPU machine's environment may lack it)
    srv = ServerThread(engine.config, engine_factory=lambda: engine, http=True)
    try:
        srv.call(srv.server.load())
        client = openai.OpenAI(base_url=f"{srv.http_url}/v1", api_key="unused", max_retries=0)
        kwargs: dict[str, Any] = {"model": engine.model_name, "prompt": TEXT, "max_tokens": 2, "temperature": 0,
                                  "echo": True, "logprobs": 1}  # fmt: skip
        if stream:
            text, tokens, token_lps, tops = "", [], [], []
            for chunk in client.completions.create(stream=True, **kwargs):
                for c in chunk.choices:
                    text += c.text
                    if c.logprobs is not None:
                        tokens += c.logprobs.tokens or []
                        token_lps += c.logprobs.token_logprobs or []
                        tops += c.logprobs.top_logprobs or []
        else:
            choice = client.completions.create(**kwargs).choices[0]
            assert choice.logprobs is not None
            text, tokens = choice.text, choice.logprobs.tokens or []
            token_lps, tops = choice.logprobs.token_logprobs or [], choice.logprobs.top_logprobs or []
        ids = engine.tokenizer.encode(TEXT)
        assert text.startswith(TEXT) and "".join(tokens) == text
        assert len(tokens) == len(ids) + 2
        assert token_lps[0] is None and tops[0] is None  # nothing before the first token to condition on
        ref = reference(engine, ids)
        for i in range(1, len(ids)):
            assert abs(token_lps[i] - ref[i - 1, ids[i]].item()) < 1e-3, i
        assert all(lp is not None and lp <= 0 for lp in token_lps[1:])
    finally:
        srv.stop()


def test_a_preempted_request_scores_its_prompt_once(tiny_gguf: Path) -> None:
    """Two requests that cannot both fit: one is preempted and re-prefilled from its first token (no prefix cache
    to resume from); neither repeats a prompt entry."""
    from concurrent.futures import ThreadPoolExecutor

    config = EngineConfig(
        model=tiny_gguf, kv_cache_tokens=112, max_num_batched_tokens=16, max_num_seqs=4, prefix_caching=False
    )
    eng = Engine(config)
    try:
        # 24-token prompts (2 blocks each) growing to 64 tokens (4 blocks each) in a 7-block cache
        texts = ("the cat sat on the mat " * 3, "in a hole in the ground " * 3)
        prompts = [eng.tokenizer.encode(t)[:24] for t in texts]
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, prompt_logprobs=0)
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda ids: run(eng, ids, params), prompts))
        assert sum(final.evictions for _, _, final in results) > 0, "no preemption: the test needs a smaller cache"
        for ids, (entries, tokens, _) in zip(prompts, results, strict=True):
            assert len(tokens) == 40
            check(entries, ids, reference(eng, ids), 0, 1e-4)
    finally:
        eng.shutdown()
