"""The engine over real gRPC on a loopback port: streaming, concurrency, cancel, deadlines, health, bad input."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from optimist.engine.api import engine_pb2 as pb
from optimist.engine.api import engine_pb2_grpc as pb_grpc
from optimist.engine.config import ConfigError, EngineConfig
from optimist.engine.engine import Engine

from ..conftest import LoadingServer, ServerThread

TIE_GAP = 2e-3  # as in test_reference: batching may flip a greedy choice only between near-equal logits


@pytest.fixture()
def stub(server: ServerThread) -> Iterator[pb_grpc.EngineStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.EngineStub(channel)


def greedy_request(prompt: str, n: int, **kw: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(text=prompt, sampling=pb.SamplingParams(temperature=0, max_tokens=n, **kw))


def collect(responses: Any) -> tuple[list[int], str, pb.Final, list[pb.TokenLogprobs]]:
    ids: list[int] = []
    text, logprobs = "", []
    final = None
    for msg in responses:
        if msg.HasField("chunk"):
            ids.extend(msg.chunk.token_ids)
            text += msg.chunk.text
            logprobs.extend(msg.chunk.logprobs)
        else:
            assert final is None, "more than one final message"
            final = msg.final
    assert final is not None, "stream ended without a final message"
    return ids, text, final, logprobs


def wait_idle(stub: pb_grpc.EngineStub, timeout: float = 20.0) -> pb.Load:
    deadline = time.monotonic() + timeout
    while True:
        load = stub.GetLoad(pb.GetLoadRequest())
        if load.running == 0 and load.waiting == 0 and load.kv_blocks_used == 0:
            return load
        assert time.monotonic() < deadline, f"engine still busy: {load}"
        time.sleep(0.05)


PROMPTS = [
    "The capital of France is",
    "def quicksort(arr):",
    "List three fruits:",
    "The quick brown fox",
    "In 1492, Columbus",
    "Water boils at",
    "import numpy as np\n",
    "My favourite book is",
    "The meaning of life is",
    "Translate to French: cheese",
    "SELECT * FROM",
    "Roses are red,",
    "Dear Sir or Madam,",
    "The largest planet in the solar system",
    "Once upon a time",
    "To be or not to be,",
]


@pytest.mark.slow
def test_sixteen_concurrent_streams_get_their_one_at_a_time_outputs(stub: pb_grpc.EngineStub) -> None:
    n = 20
    alone = [collect(stub.Generate(greedy_request(p, n, logprobs=2))) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: collect(stub.Generate(greedy_request(p, n))), PROMPTS))
    load = wait_idle(stub)
    assert load.steps_total > 0
    for prompt, (ids_a, text_a, fin_a, lps), (ids_b, text_b, fin_b, _) in zip(PROMPTS, alone, together, strict=True):
        diverged = next((i for i, (a, b) in enumerate(zip(ids_a, ids_b, strict=False)) if a != b), None)
        if diverged is None:
            assert ids_a == ids_b and text_a == text_b, prompt
            assert fin_a.finish_reason == fin_b.finish_reason
            continue
        top = lps[diverged].top
        gap = top[0].logprob - top[1].logprob
        assert gap < TIE_GAP, f"{prompt!r}: diverged at token {diverged} where the top-2 gap is {gap:.4f}"
        assert ids_b[diverged] in (top[0].token_id, top[1].token_id)


def test_stream_delivers_chunks_then_one_final_with_usage(stub: pb_grpc.EngineStub) -> None:
    messages = list(stub.Generate(greedy_request("Count: one, two, three,", 12, ignore_eos=True)))
    assert len(messages) >= 2 and messages[-1].HasField("final")
    assert all(m.HasField("chunk") for m in messages[:-1])
    ids, _, final, _ = collect(messages)
    assert final.finish_reason == pb.FINISH_REASON_LENGTH
    assert final.usage.completion_tokens == len(ids) == 12
    assert final.usage.prompt_tokens > 0
    assert 0 < final.timings.time_to_first_token_s <= final.timings.total_s
    assert len({m.request_id for m in messages}) == 1 and messages[0].request_id


def test_chat_messages_use_the_model_template(stub: pb_grpc.EngineStub, engine: Engine) -> None:
    msgs = [pb.ChatMessage(role="user", content="What is the capital of France?")]
    chat = pb.GenerateRequest(chat=pb.ChatMessages(messages=msgs), sampling=pb.SamplingParams(temperature=0))
    templated = engine.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    plain = pb.GenerateRequest(text=templated, sampling=pb.SamplingParams(temperature=0))
    a, b = collect(stub.Generate(chat)), collect(stub.Generate(plain))
    assert a[0] == b[0] and a[2].usage.prompt_tokens == b[2].usage.prompt_tokens
    assert "Paris" in a[1]
    # The second found the first's full blocks in the prefix cache: all but the last (partial) block's tokens.
    bs = engine.config.kv_block_size
    assert b[2].usage.cached_tokens == (b[2].usage.prompt_tokens - 1) // bs * bs > 0


def test_seeded_sampling_is_reproducible(stub: pb_grpc.EngineStub) -> None:
    def run(seed: int) -> str:
        req = pb.GenerateRequest(text="Tell me a story:", sampling=pb.SamplingParams(max_tokens=16, seed=seed))
        return collect(stub.Generate(req))[1]

    assert run(11) == run(11)
    assert len({run(11), run(12), run(13)}) > 1


def test_stop_string_is_honoured_over_grpc(stub: pb_grpc.EngineStub) -> None:
    _, text, final, _ = collect(stub.Generate(greedy_request("1, 2, 3, 4,", 40, stop=[" 7"])))
    assert final.finish_reason == pb.FINISH_REASON_STOP and final.stop == " 7"
    assert text.strip() == "5, 6,"


def test_client_cancel_frees_the_request_blocks(stub: pb_grpc.EngineStub) -> None:
    call = stub.Generate(greedy_request("Write a very long essay about rivers.", 2000, ignore_eos=True))
    got = 0
    for msg in call:
        got += len(msg.chunk.token_ids)
        if got >= 3:
            assert stub.GetLoad(pb.GetLoadRequest()).kv_blocks_used > 0
            call.cancel()
            break
    load = wait_idle(stub)
    assert load.finished_total["aborted"] >= 1


def test_deadline_aborts_and_frees_blocks(stub: pb_grpc.EngineStub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        collect(stub.Generate(greedy_request("A long story:", 4000, ignore_eos=True), timeout=1.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(stub)


def test_abort_rpc_ends_the_stream_with_aborted(stub: pb_grpc.EngineStub) -> None:
    req = greedy_request("Another long story:", 4000, ignore_eos=True)
    req.request_id = "to-abort"
    call = stub.Generate(req)
    first = next(call)
    assert first.request_id == "to-abort"
    assert list(stub.Abort(pb.AbortRequest(request_ids=["to-abort", "unknown"])).aborted) == ["to-abort"]
    _, _, final, _ = collect(call)
    assert final.finish_reason == pb.FINISH_REASON_ABORTED
    wait_idle(stub)


def _raw_generate(channel: grpc.Channel, payload: bytes) -> Any:
    method = channel.unary_stream("/optimist.v1.Engine/Generate", request_serializer=None)
    return list(method(payload))


BAD = [
    (pb.GenerateRequest(text=""), "prompt.text"),
    (pb.GenerateRequest(), "prompt"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])), "prompt.token_ids"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 9000)), "prompt.token_ids"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 10**6])), "prompt.token_ids"),
    (pb.GenerateRequest(chat=pb.ChatMessages()), "prompt.chat.messages"),
    (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=0)), "sampling.max_tokens"),
    (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=-5)), "sampling.max_tokens"),
    (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=100000)), "sampling.max_tokens"),
    (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(temperature=-0.5)), "sampling.temperature"),
    (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(temperature=float("nan"))), "sampling.temperature"),
    (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(top_p=0.0)), "sampling.top_p"),
    (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(top_p=1.5)), "sampling.top_p"),
    (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(top_k=-1)), "sampling.top_k"),
    (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(min_p=2.0)), "sampling.min_p"),
    (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(min_tokens=20, max_tokens=10)), "sampling.min_tokens"),
    (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(logprobs=100)), "sampling.logprobs"),
    (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(repetition_penalty=0)), "sampling.repetition_penalty"),
    (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(stop=["x"] * 1000)), "sampling.stop"),
    (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(stop=[""])), "sampling.stop"),
    (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(stop=["y" * 10000])), "sampling.stop"),
    (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(stop_token_ids=[10**7])), "sampling.stop_token_ids"),
    (pb.GenerateRequest(text="hi", output_length_hint=pb.OutputLengthHint(lower=50, upper=10)), "output_length_hint"),
]


def _invalid_utf8_stop_payload() -> bytes:
    marker = "\x01MARK\x01"
    payload = pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(stop=[marker])).SerializeToString()
    return payload.replace(marker.encode(), b"\xff\xfeMARK\xc3\x28")  # same length, not UTF-8


def test_bad_requests_get_invalid_argument_while_a_good_one_completes(
    server: ServerThread, stub: pb_grpc.EngineStub
) -> None:
    good: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: good.update(result=collect(stub.Generate(greedy_request("Good request:", 40, ignore_eos=True))))
    )
    worker.start()
    for request, field in BAD:
        with pytest.raises(grpc.RpcError) as err:
            collect(stub.Generate(request))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.value.details())
        assert (err.value.details() or "").startswith(field), (field, err.value.details())
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as err:
        _raw_generate(channel, _invalid_utf8_stop_payload())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("sampling.stop"), err.value.details()
    worker.join(timeout=120)
    ids, _, final, _ = good["result"]
    assert final.finish_reason == pb.FINISH_REASON_LENGTH and len(ids) == 40
    wait_idle(stub)


def test_duplicate_running_request_id_is_rejected(stub: pb_grpc.EngineStub) -> None:
    req = greedy_request("Long one:", 4000, ignore_eos=True)
    req.request_id = "dup"
    call = stub.Generate(req)
    next(call)
    with pytest.raises(grpc.RpcError) as err:
        collect(stub.Generate(req))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in (err.value.details() or "")
    call.cancel()
    wait_idle(stub)


def test_model_info_and_reflection(server: ServerThread, stub: pb_grpc.EngineStub) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.context_length, info.vocab_size, list(info.eos_token_ids)) == (8192, 49152, [2])
    assert info.has_chat_template and info.kv_block_size == 16
    assert info.kv_cache_dtype == info.dtype  # --kv-cache-dtype auto: the model's
    # the device the engine chose (device "auto": CUDA where present)
    assert torch.device(info.device).type == ("cuda" if torch.cuda.is_available() else "cpu")
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert {"optimist.v1.Engine", "grpc.health.v1.Health"} <= names


def _health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(reply.status)


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_is_not_serving_while_the_model_loads(loading_server: LoadingServer) -> None:
    address = loading_server.address
    assert _health(address, "") == SERVING  # the process is alive
    assert _health(address, "optimist.v1.Engine") == NOT_SERVING
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as err:
        collect(pb_grpc.EngineStub(channel).Generate(greedy_request("hi", 2)))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    loading_server.finish_loading()
    assert _health(address, "optimist.v1.Engine") == SERVING


@pytest.mark.parametrize("grace_s,expected", [(10.0, pb.FINISH_REASON_LENGTH), (0.0, pb.FINISH_REASON_ABORTED)])
def test_drain_reports_not_serving_refuses_new_work_and_settles_in_flight(
    tiny_gguf: Path, grace_s: float, expected: int
) -> None:
    config = EngineConfig(model=tiny_gguf, kv_cache_tokens=4096)
    srv = ServerThread(config)
    srv.server.grace_s = grace_s
    srv.call(srv.server.load())
    engine = srv.server.service.engine
    assert engine is not None
    gate = threading.Event()
    original = engine.runner.execute

    def slow_execute(*args: Any) -> Any:  # keep the in-flight request running until the drain has begun
        gate.wait(10)
        time.sleep(0.002)
        return original(*args)

    engine.runner.execute = slow_execute  # type: ignore[method-assign]
    try:
        channel = grpc.insecure_channel(srv.address)
        stub = pb_grpc.EngineStub(channel)
        in_flight = stub.Generate(greedy_request("the", 200, ignore_eos=True))
        time.sleep(0.2)
        draining = srv.submit(srv.server.drain_and_stop())
        time.sleep(0.2)
        assert _health(srv.address, "optimist.v1.Engine") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            collect(stub.Generate(greedy_request("new", 2)))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        gate.set()
        _, _, final, _ = collect(in_flight)
        assert final.finish_reason == expected
        draining.result(30)
        channel.close()
    finally:
        gate.set()
        srv.loop.call_soon_threadsafe(srv.loop.stop)


def test_served_name_and_max_model_len_as_clients_see_them(tiny_gguf: Path) -> None:
    """What the operator passes for spec.model.servedName and contextLength reaches GetModelInfo and validation."""
    srv = ServerThread(
        EngineConfig(model=tiny_gguf, kv_cache_tokens=4096, served_model_name="team/tiny", max_model_len=8)
    )
    srv.call(srv.server.load())
    try:
        stub = pb_grpc.EngineStub(grpc.insecure_channel(srv.address))
        info = stub.GetModelInfo(pb.GetModelInfoRequest())
        assert (info.model_name, info.context_length) == ("team/tiny", 8)
        assert stub.GetLoad(pb.GetLoadRequest()).model_name == "team/tiny"
        with pytest.raises(grpc.RpcError) as err:
            collect(stub.Generate(greedy_request("the", 7)))  # 2 prompt + 7 tokens > 8
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "exceeds the context (8)" in (err.value.details() or "")
        _, _, final, _ = collect(stub.Generate(greedy_request("the", 6)))
        assert final.usage.completion_tokens == 6
    finally:
        srv.stop()


def test_engine_options_that_cannot_work_fail_at_start(tiny_gguf: Path) -> None:
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        Engine(EngineConfig(model=tiny_gguf, kv_cache_tokens=4096, max_model_len=1 << 20))
    with pytest.raises(ConfigError, match="kv_cache_memory_fraction needs a CUDA device"):
        Engine(EngineConfig(model=tiny_gguf, device="cpu", kv_cache_memory_fraction=0.5))
    with pytest.raises(ConfigError, match="kv_cache_memory_fraction must be in"):
        EngineConfig(model=tiny_gguf, kv_cache_memory_fraction=1.5).validate()
