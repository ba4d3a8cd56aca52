"""The KServe v2 / Triton adapter (inference.GRPCInferenceService) over real gRPC on the engine's port: NVIDIA's own
tritonclient in its own environment, then the protocol's corners with our generated stubs."""

from __future__ import annotations

import importlib.util
import json
import re
import struct
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from optimist.engine.api import engine_pb2 as epb
from optimist.engine.api import engine_pb2_grpc as epb_grpc
from optimist.engine.api import grpc_service_pb2 as pb
from optimist.engine.api import grpc_service_pb2_grpc as pb_grpc
from optimist.engine.engine import Engine

from ..conftest import LoadingServer, ServerThread
from . import tritonclient_env
from .test_server import collect, greedy_request, wait_idle

PROMPT = "The capital of France is"


@pytest.fixture()
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture()
def stub(channel: grpc.Channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture()
def engine_stub(channel: grpc.Channel) -> epb_grpc.EngineStub:
    return epb_grpc.EngineStub(channel)


def greedy_text(engine_stub: epb_grpc.EngineStub, prompt: str, n: int) -> str:
    return collect(engine_stub.Generate(greedy_request(prompt, n)))[1]


def infer_request(engine: Engine, prompt: str = PROMPT, raw: bool = False, **inputs: Any) -> pb.ModelInferRequest:
    """text_input plus the given inputs (bool -> BOOL, int -> INT32, float -> FP32, str/dict -> BYTES), in
    `contents` or as raw_input_contents."""
    request = pb.ModelInferRequest(model_name=engine.model_name)
    for name, value in {"text_input": prompt, **inputs}.items():
        if isinstance(value, dict):
            value = json.dumps(value)
        if isinstance(value, bool):
            datatype, field, packed = "BOOL", "bool_contents", struct.pack("<?", value)
        elif isinstance(value, int):
            datatype, field, packed = "INT32", "int_contents", struct.pack("<i", value)
        elif isinstance(value, float):
            datatype, field, packed = "FP32", "fp32_contents", struct.pack("<f", value)
        else:
            value = value.encode()
            datatype, field, packed = "BYTES", "bytes_contents", struct.pack("<I", len(value)) + value
        tensor = request.inputs.add(name=name, datatype=datatype, shape=[1])
        if raw:
            request.raw_input_contents.append(packed)
        else:
            getattr(tensor.contents, field).append(value)
    return request


def outputs(response: pb.ModelInferResponse) -> dict[str, list[Any]]:
    """Each output's elements, decoded from raw_output_contents."""
    decoded: dict[str, list[Any]] = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if tensor.datatype == "BYTES":
            values, pos = [], 0
            while pos < len(raw):
                (size,) = struct.unpack_from("<I", raw, pos)
                values.append(raw[pos + 4 : pos + 4 + size].decode())
                pos += 4 + size
        else:
            fmt = {"FP32": "f", "UINT32": "I"}[tensor.datatype]
            values = list(struct.unpack(f"<{len(raw) // 4}{fmt}", raw))
        assert list(tensor.shape) == [len(values)]
        decoded[tensor.name] = values
    return decoded


def invalid(call: Any, *args: Any, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call(*args)
    assert err.value.code() == code, err.value.details()
    return str(err.value.details())


# ------------------------------------------------------------------------------------- the real client


@pytest.fixture(scope="session")
def tritonclient_python() -> str:
    try:
        return str(tritonclient_env.python())
    except subprocess.CalledProcessError as exc:  # no package index here; .ci/run makes it beforehand
        pytest.skip(f"cannot install {tritonclient_env.REQUIREMENT}: {exc}")


@pytest.mark.slow
def test_tritonclient_infers_and_streams_through_the_adapter(
    server: ServerThread, engine: Engine, engine_stub: epb_grpc.EngineStub, tritonclient_python: str
) -> None:
    script = tritonclient_env.Path(__file__).with_name("kserve_client.py")
    run = subprocess.run(
        [tritonclient_python, str(script), server.address, engine.model_name, PROMPT],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout)
    eight, five = greedy_text(engine_stub, PROMPT, 8), greedy_text(engine_stub, PROMPT, 5)
    assert eight.startswith(five) and len(eight) > len(five)

    assert seen["live"] and seen["ready"] and seen["model_ready"]
    assert seen["server_metadata"]["name"] == "optimist"
    meta = seen["model_metadata"]
    assert meta["name"] == engine.model_name and meta["versions"] == ["1"]
    assert {"name": "text_input", "datatype": "BYTES", "shape": ["1"]} in meta["inputs"]
    assert "text_output" in [o["name"] for o in meta["outputs"]]
    assert seen["model_config"]["config"]["model_transaction_policy"]["decoupled"] is True
    assert seen["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert repr(engine.model_name) in seen["unknown_model"]["message"]

    n_prompt = len(engine.tokenizer.encode(PROMPT))
    assert seen["infer"] == {
        "id": "unary-1",
        "text_output": [eight],
        "finish_reason": ["length"],
        "num_input_tokens": [n_prompt],
        "num_output_tokens": [8],
    }
    assert seen["infer_with_prompt"] == [PROMPT + eight]  # the vLLM backend's default: the prompt, then the answer
    assert seen["infer_trtllm"] == [eight]
    assert seen["infer_bad"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert seen["infer_bad"]["message"].startswith("top_p:")

    streams = seen["stream"]
    assert set(streams) == {"s-1", "s-2"}
    for rid, text in (("s-1", eight), ("s-2", five)):
        assert "".join(streams[rid]["deltas"]) == text and streams[rid]["final"] == 1
        assert len(streams[rid]["deltas"]) > 2  # a response per delta, not one at the end
    assert len(seen["stream_errors"]) == 1 and "top_p" in seen["stream_errors"][0]
    wait_idle(engine_stub)


# ------------------------------------------------------------------------------------ protocol corners


def test_raw_and_typed_contents_give_the_same_answer(
    stub: pb_grpc.GRPCInferenceServiceStub, engine: Engine, engine_stub: epb_grpc.EngineStub
) -> None:
    params = {"max_tokens": 6, "temperature": 0}
    typed = stub.ModelInfer(infer_request(engine, sampling_parameters=params, exclude_input_in_output=True))
    raw = stub.ModelInfer(infer_request(engine, raw=True, sampling_parameters=params, exclude_input_in_output=True))
    assert outputs(typed) == outputs(raw) == {"text_output": [greedy_text(engine_stub, PROMPT, 6)]}
    assert typed.model_name == engine.model_name and typed.model_version == "1"
    assert typed.parameters["triton_final_response"].bool_param


def test_sampling_from_request_parameters_and_scalar_inputs(
    stub: pb_grpc.GRPCInferenceServiceStub, engine: Engine, engine_stub: epb_grpc.EngineStub
) -> None:
    request = infer_request(engine, exclude_input_in_output=True, return_num_output_tokens=True)
    request.parameters["max_tokens"].int64_param = 3
    request.parameters["temperature"].double_param = 0.0
    got = outputs(stub.ModelInfer(request))
    assert got == {"text_output": [greedy_text(engine_stub, PROMPT, 3)], "num_output_tokens": [3]}
    # a sampling_parameters input wins over request parameters
    request = infer_request(engine, sampling_parameters={"max_tokens": 2}, return_num_output_tokens=True)
    request.parameters["max_tokens"].int64_param = 5
    assert outputs(stub.ModelInfer(request))["num_output_tokens"] == [2]
    # seeded sampling is reproducible; TensorRT-LLM's random_seed is vLLM's seed
    seeded = [
        outputs(stub.ModelInfer(infer_request(engine, sampling_parameters={"max_tokens": 12, "seed": s})))
        for s in (7, 7)
    ]
    assert seeded[0] == seeded[1]
    trt = infer_request(engine, max_tokens=12, exclude_input_in_output=True)
    trt.inputs.add(name="random_seed", datatype="UINT64", shape=[1]).contents.uint64_contents.append(7)
    assert PROMPT + outputs(stub.ModelInfer(trt))["text_output"][0] == seeded[0]["text_output"][0]


def test_logprobs_and_counts_match_the_engine(
    stub: pb_grpc.GRPCInferenceServiceStub, engine: Engine, engine_stub: epb_grpc.EngineStub
) -> None:
    request = infer_request(
        engine,
        sampling_parameters={"max_tokens": 4, "temperature": 0, "logprobs": 2},
        return_logprobs=True,
        return_cumulative_logprob=True,
        return_num_input_tokens=True,
        return_finish_reason=True,
    )
    got = outputs(stub.ModelInfer(request))
    _, _, _, reference = collect(engine_stub.Generate(greedy_request(PROMPT, 4, logprobs=2)))
    rows = json.loads(got["logprobs"][0])
    assert len(rows) == 4
    for row, ref in zip(rows, reference, strict=True):
        chosen = row[str(ref.token_id)]
        assert chosen["logprob"] == pytest.approx(ref.logprob, abs=1e-4) and chosen["rank"] == 1  # greedy
        assert chosen["decoded_token"] == engine.tokenizer.token_text(ref.token_id)
        assert {int(t) for t in row} == {t.token_id for t in ref.top}
    assert got["cumulative_logprob"][0] == pytest.approx(sum(r.logprob for r in reference), abs=1e-3)
    assert got["num_input_tokens"] == [len(engine.tokenizer.encode(PROMPT))]
    assert got["finish_reason"] == ["length"]
    # without a logprobs count the logprobs output is null, as the vLLM backend's; requested outputs only
    request = infer_request(engine, sampling_parameters={"max_tokens": 2})
    request.outputs.add(name="logprobs")
    request.outputs.add(name="finish_reason")
    assert outputs(stub.ModelInfer(request)) == {"logprobs": ["null"], "finish_reason": ["length"]}


def _drop_prompt(r: pb.ModelInferRequest) -> None:
    r.inputs.pop(0)


def _unknown_input(r: pb.ModelInferRequest) -> None:
    r.inputs.add(name="prompt", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"hi")


def _prompt_as_int(r: pb.ModelInferRequest) -> None:
    r.inputs[0].datatype = "INT32"
    r.inputs[0].contents.int_contents.append(1)


def _shape_too_big(r: pb.ModelInferRequest) -> None:
    r.inputs[0].shape[0] = 2


def _invalid_utf8(r: pb.ModelInferRequest) -> None:
    r.inputs[0].contents.bytes_contents[0] = b"\xff\xfe"


def _misspelt_parameter(r: pb.ModelInferRequest) -> None:
    r.parameters["max_token"].int64_param = 4


def _word_for_number(r: pb.ModelInferRequest) -> None:
    r.parameters["top_k"].string_param = "two"


def _raw_and_contents(r: pb.ModelInferRequest) -> None:
    r.raw_input_contents.extend([b"\x02\x00\x00\x00hi", b"\x02\x00\x00\x00hi"])


def _version_two(r: pb.ModelInferRequest) -> None:
    r.model_version = "2"


@pytest.mark.parametrize(
    "mutate,message",
    [
        (_drop_prompt, "inputs.text_input: required"),
        (_unknown_input, "inputs.prompt: not an input of this model"),
        (_prompt_as_int, "inputs.text_input: must be BYTES, got INT32"),
        (_shape_too_big, "inputs.text_input: shape [2] holds 2 elements, got 1"),
        (_invalid_utf8, "inputs.text_input: not valid UTF-8"),
        (_misspelt_parameter, "parameters.max_token: unknown parameter"),
        (_word_for_number, "parameters.top_k: must be a whole number"),
        (_raw_and_contents, "raw_input_contents: 2 entries for 1 inputs"),
    ],
)
def test_bad_requests_get_invalid_argument_naming_the_field(
    stub: pb_grpc.GRPCInferenceServiceStub, engine: Engine, mutate: Any, message: str
) -> None:
    request = infer_request(engine)
    mutate(request)
    assert invalid(stub.ModelInfer, request).startswith(message)
    # the same on a stream: an error response, and the stream answers the next request
    request.id = "broken"
    good = infer_request(engine, sampling_parameters={"max_tokens": 1})
    good.id = "fine"
    replies = list(stub.ModelStreamInfer(iter([request, good]), timeout=60))
    errors = {m.infer_response.id: m.error_message for m in replies}
    assert errors["broken"].startswith(message) and errors["fine"] == ""


def test_unknown_model_and_version_are_not_found(stub: pb_grpc.GRPCInferenceServiceStub, engine: Engine) -> None:
    request = infer_request(engine)
    _version_two(request)
    assert invalid(stub.ModelInfer, request, code=grpc.StatusCode.NOT_FOUND).startswith("model_version: ")
    details = invalid(stub.ModelInfer, pb.ModelInferRequest(model_name="gpt-9"), code=grpc.StatusCode.NOT_FOUND)
    assert details == f"model_name: this server serves {engine.model_name!r}, not 'gpt-9'"
    assert invalid(stub.ModelMetadata, pb.ModelMetadataRequest()).startswith("name: required")
    assert invalid(stub.ModelReady, pb.ModelReadyRequest(name="gpt-9"), code=grpc.StatusCode.NOT_FOUND)


def test_bad_json_truncated_raw_and_bad_values(stub: pb_grpc.GRPCInferenceServiceStub, engine: Engine) -> None:
    details = invalid(stub.ModelInfer, infer_request(engine, sampling_parameters="{max_tokens: 2"))
    assert details.startswith("inputs.sampling_parameters: not JSON")
    request = infer_request(engine, raw=True)
    request.raw_input_contents[0] = b"\x09\x00\x00\x00The"  # says 9 bytes, holds 3
    assert invalid(stub.ModelInfer, request).startswith("inputs.text_input: raw BYTES element of 9 bytes")
    assert invalid(stub.ModelInfer, infer_request(engine, sampling_parameters={"n": 2})).startswith(
        "sampling_parameters.n: only 1"
    )
    assert invalid(stub.ModelInfer, infer_request(engine, sampling_parameters={"max_tokens": 10**6})).startswith(
        "max_tokens: prompt"
    )
    assert invalid(stub.ModelInfer, infer_request(engine, prompt="")).startswith("text_input: the prompt is empty")
    assert invalid(stub.ModelInfer, infer_request(engine, stream=True)).startswith("inputs.stream: ModelInfer")
    assert invalid(stub.ModelInfer, infer_request(engine, stream=True, exclude_input_in_output=False)).startswith(
        "inputs.exclude_input_in_output: must not be false when streaming"
    )
    assert invalid(
        stub.ModelInfer, infer_request(engine, sampling_parameters={"output_length_lower": 9, "output_length_upper": 3})
    ).startswith("output_length_hint: lower (9) is above upper (3)")


def test_stream_interleaves_requests_and_a_bad_one_does_not_end_it(
    stub: pb_grpc.GRPCInferenceServiceStub, engine: Engine, engine_stub: epb_grpc.EngineStub
) -> None:
    def request(rid: str, **inputs: Any) -> pb.ModelInferRequest:
        r = infer_request(engine, **inputs)
        r.id = rid
        return r

    sent = [
        request("a", stream=True, sampling_parameters={"max_tokens": 10, "temperature": 0}),
        request("bad", stream=True, sampling_parameters={"temperature": -1}),
        request("b", sampling_parameters={"max_tokens": 4, "temperature": 0}, exclude_input_in_output=True),
    ]
    by_id: dict[str, list[pb.ModelStreamInferResponse]] = {}
    for message in stub.ModelStreamInfer(iter(sent), timeout=120):
        by_id.setdefault(message.infer_response.id, []).append(message)
    assert set(by_id) == {"a", "bad", "b"}
    (bad,) = by_id["bad"]
    assert bad.error_message.startswith("temperature: must be >= 0")
    assert bad.infer_response.parameters["triton_final_response"].bool_param
    a = by_id["a"]
    assert all(not m.error_message for m in a) and len(a) > 2
    assert [m.infer_response.parameters["triton_final_response"].bool_param for m in a] == [False] * (len(a) - 1) + [
        True
    ]
    assert "".join(outputs(m.infer_response)["text_output"][0] for m in a) == greedy_text(engine_stub, PROMPT, 10)
    (b,) = by_id["b"]  # not streaming: one response with the whole answer
    assert outputs(b.infer_response)["text_output"] == [greedy_text(engine_stub, PROMPT, 4)]


def test_cancelling_the_stream_aborts_its_requests_and_frees_their_blocks(
    stub: pb_grpc.GRPCInferenceServiceStub, engine: Engine, engine_stub: epb_grpc.EngineStub
) -> None:
    finished = wait_idle(engine_stub).finished_total["aborted"]
    hold = threading.Event()

    def requests() -> Iterator[pb.ModelInferRequest]:
        for rid in ("long-1", "long-2"):
            r = infer_request(engine, stream=True, sampling_parameters={"max_tokens": 2000, "ignore_eos": True})
            r.id = rid
            yield r
        hold.wait(60)  # the client keeps its side open

    call = stub.ModelStreamInfer(requests())
    seen: set[str] = set()
    for message in call:
        seen.add(message.infer_response.id)
        if seen == {"long-1", "long-2"}:
            assert engine_stub.GetLoad(epb.GetLoadRequest()).kv_blocks_used > 0
            call.cancel()
            break
    hold.set()
    load = wait_idle(engine_stub)
    assert load.finished_total["aborted"] == finished + 2


def test_readiness_follows_loading(loading_server: LoadingServer, engine: Engine) -> None:
    with grpc.insecure_channel(loading_server.address) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        assert stub.ServerLive(pb.ServerLiveRequest()).live
        assert not stub.ServerReady(pb.ServerReadyRequest()).ready
        assert not stub.ModelReady(pb.ModelReadyRequest(name=engine.model_name)).ready
        assert invalid(stub.ModelInfer, infer_request(engine), code=grpc.StatusCode.UNAVAILABLE)
        loading_server.finish_loading()
        assert stub.ServerReady(pb.ServerReadyRequest()).ready
        assert stub.ModelReady(pb.ModelReadyRequest(name=engine.model_name, version="1")).ready


def test_reflection_lists_the_inference_service(server: ServerThread) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as ch:
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        ask = reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")
        reply = next(refl.ServerReflectionInfo(iter([ask])))
    assert reply.file_descriptor_response.file_descriptor_proto  # grpcurl can describe and call it


@pytest.mark.skipif(importlib.util.find_spec("llguidance") is None, reason="structured outputs need llguidance")
def test_structured_outputs_in_sampling_parameters(stub: pb_grpc.GRPCInferenceServiceStub, engine: Engine) -> None:
    """vLLM's `structured_outputs` object (and `guided_decoding`, its older name) in the sampling_parameters JSON."""

    def answer(structured: dict[str, Any], key: str = "structured_outputs") -> str:
        params = {"max_tokens": 80, "temperature": 0, key: structured}
        request = infer_request(engine, sampling_parameters=params, exclude_input_in_output=True)
        return str(outputs(stub.ModelInfer(request))["text_output"][0])

    assert answer({"choice": [" Paris", " Rome"]}) == " Paris"
    assert re.fullmatch(r" [A-Z][a-z]+", answer({"regex": r" [A-Z][a-z]+"}, "guided_decoding"))
    schema = {"type": "object", "properties": {"a": {"type": "integer", "maximum": 99}}, "required": ["a"],
              "additionalProperties": False}  # fmt: skip
    assert json.loads(answer({"json": schema})).keys() == {"a"}
    for structured, message in [
        ({"regex": "a(b"}, "sampling_parameters.structured_outputs.regex: "),
        ({"yaml": "x"}, "sampling_parameters.structured_outputs.yaml: unknown"),
        ({"regex": "a", "choice": ["b"]}, "sampling_parameters.structured_outputs.choice: only one"),
    ]:
        params = {"max_tokens": 4, "structured_outputs": structured}
        assert invalid(stub.ModelInfer, infer_request(engine, sampling_parameters=params)).startswith(message)
