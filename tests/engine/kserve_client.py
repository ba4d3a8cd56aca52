"""NVIDIA's tritonclient against optimist's KServe v2 / Triton adapter, as a Triton user would call it. Runs in the
tritonclient environment (tritonclient_env.py), not the project's; prints one JSON object of what it saw.

usage: kserve_client.py ADDRESS MODEL_NAME PROMPT
"""

from __future__ import annotations

import json
import queue
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def text_input(prompt: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("text_input", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([prompt.encode("utf-8")], dtype=np.object_))
    return tensor


def flag(name: str, value: bool) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1], "BOOL")
    tensor.set_data_from_numpy(np.array([value], dtype=bool))
    return tensor


def sampling(params: dict[str, Any]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([json.dumps(params).encode("utf-8")], dtype=np.object_))
    return tensor


def scalar(name: str, datatype: str, value: Any, dtype: Any) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1, 1], datatype)  # TensorRT-LLM's ensemble shapes: [batch, 1]
    tensor.set_data_from_numpy(np.array([[value]], dtype=dtype))
    return tensor


def decode(result: Any, name: str) -> Any:
    array = result.as_numpy(name)
    if array is None:
        return None
    values = array.tolist()
    return [v.decode("utf-8") if isinstance(v, bytes) else v for v in values]


def main() -> None:
    address, model, prompt = sys.argv[1:4]
    seen: dict[str, Any] = {}
    client = grpcclient.InferenceServerClient(address)
    seen["live"] = client.is_server_live()
    seen["ready"] = client.is_server_ready()
    seen["model_ready"] = client.is_model_ready(model)
    seen["server_metadata"] = client.get_server_metadata(as_json=True)
    seen["model_metadata"] = client.get_model_metadata(model, as_json=True)
    seen["model_config"] = client.get_model_config(model, as_json=True)
    try:
        client.get_model_metadata("no-such-model")
    except InferenceServerException as exc:
        seen["unknown_model"] = {"status": exc.status(), "message": exc.message()}

    # ModelInfer, vLLM-backend style: numbers as strings in the JSON, as Triton's own sample client sends them
    inputs = [
        text_input(prompt),
        sampling({"max_tokens": "8", "temperature": "0"}),
        flag("exclude_input_in_output", True),
        flag("return_finish_reason", True),
        flag("return_num_input_tokens", True),
        flag("return_num_output_tokens", True),
    ]
    result = client.infer(model, inputs, request_id="unary-1")
    seen["infer"] = {
        "id": result.get_response().id,
        **{name: decode(result, name) for name in ("text_output", "finish_reason", "num_input_tokens")},
        "num_output_tokens": decode(result, "num_output_tokens"),
    }
    # the same with the prompt kept (the default without exclude_input_in_output)
    result = client.infer(model, [text_input(prompt), sampling({"max_tokens": 8, "temperature": 0})])
    seen["infer_with_prompt"] = decode(result, "text_output")
    # TensorRT-LLM style scalar inputs, [1, 1] shaped
    trt = [
        text_input(prompt),
        scalar("max_tokens", "INT32", 8, np.int32),
        scalar("temperature", "FP32", 0.0, np.float32),
        flag("exclude_input_in_output", True),
    ]
    seen["infer_trtllm"] = decode(client.infer(model, trt), "text_output")
    try:
        client.infer(model, [text_input(prompt), sampling({"top_p": 3})])
    except InferenceServerException as exc:
        seen["infer_bad"] = {"status": exc.status(), "message": exc.message()}

    # ModelStreamInfer: two streaming requests and one bad one on a stream, responses matched by id
    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    for rid, n in (("s-1", 8), ("s-2", 5)):
        client.async_stream_infer(
            model,
            [text_input(prompt), flag("stream", True), sampling({"max_tokens": n, "temperature": 0})],
            request_id=rid,
            enable_empty_final_response=True,
        )
    client.async_stream_infer(
        model, [text_input(prompt), flag("stream", True), sampling({"top_p": 3})], request_id="s-bad"
    )
    streams: dict[str, dict[str, Any]] = {}
    errors = []
    finals = 0
    while finals < 2 or not errors:
        result, error = responses.get(timeout=120)
        if error is not None:
            errors.append(str(error))
            continue
        response = result.get_response()
        entry = streams.setdefault(response.id, {"deltas": [], "final": 0})
        entry["deltas"].append(decode(result, "text_output")[0])
        if response.parameters["triton_final_response"].bool_param:
            entry["final"] += 1
            finals += 1
    client.stop_stream()
    seen["stream"] = streams
    seen["stream_errors"] = errors
    client.close()
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
