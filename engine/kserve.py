"""`inference.GRPCInferenceService`: the KServe Open Inference Protocol (v2) over gRPC, with Triton's streaming
extension, as an adapter in front of the engine on the engine's own port, so KServe and Triton clients
(tritonclient, perf_analyzer / genai-perf, KServe runtimes) work unchanged. Not a second engine: every request
becomes one engine request, scheduled, batched, cached and measured like any other.

The model looks like Triton's vLLM backend (decoupled, no batch dimension):

- inputs: `text_input` (BYTES, the prompt), `stream` (BOOL: a response per text delta on ModelStreamInfer),
  `sampling_parameters` (BYTES: a JSON object of vLLM's sampling parameter names), `exclude_input_in_output`
  (BOOL; without it a whole answer starts with the prompt, as the vLLM backend's does), `return_finish_reason`,
  `return_cumulative_logprob`, `return_logprobs`, `return_num_input_tokens`, `return_num_output_tokens` (BOOL);
  and TensorRT-LLM's scalar inputs (`max_tokens`, `temperature`, `top_k`, `top_p`, `random_seed`, `min_length`,
  `repetition_penalty`, `presence_penalty`, `frequency_penalty`, `stop_words`, `beam_width` = 1).
- outputs: `text_output`, `finish_reason` ("stop", "length" or "abort"; "" until the last response),
  `cumulative_logprob`, `logprobs` (JSON: per token, {token id: {logprob, rank, decoded_token}}),
  `num_input_tokens`, `num_output_tokens` (this response's).
- Sampling parameters may also come as request parameters (vLLM's names; a `sampling_parameters` input wins),
  plus `output_length_lower` / `output_length_upper`: the scheduler's output length hint.
- Structured outputs: `sampling_parameters` may hold vLLM's `structured_outputs` object (`json`, `json_object`,
  `regex`, `choice`, `grammar`; `guided_decoding`, its older name, too).

Every response carries Triton's `triton_final_response` parameter (true on a request's last one). Bad requests
get INVALID_ARGUMENT (on ModelStreamInfer: a response whose `error_message` names the field, and the stream goes
on), a full queue RESOURCE_EXHAUSTED, a loading or draining engine UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import struct
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import grpc
import numpy as np

from .api import grpc_service_pb2 as pb
from .engine import Engine, UnknownAdapter
from .outputs import Chunk, Finished
from .request import FinishReason, InvalidRequest, SamplingParams, StructuredOutput, structured_from_vllm
from .rpc import RequestFailed, bidi_stream, malformed, request_events, unary

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
VERSION = "1"  # the one version of the one model this server serves
PLATFORM = "optimist"

# name -> (datatype, shape, kind of value: "str", "bool", "int", "float" or "strs"); all optional but text_input
INPUTS: dict[str, tuple[str, list[int], str]] = {
    "text_input": ("BYTES", [1], "str"),
    "stream": ("BOOL", [1], "bool"),
    "sampling_parameters": ("BYTES", [1], "str"),
    "exclude_input_in_output": ("BOOL", [1], "bool"),
    "return_finish_reason": ("BOOL", [1], "bool"),
    "return_cumulative_logprob": ("BOOL", [1], "bool"),
    "return_logprobs": ("BOOL", [1], "bool"),
    "return_num_input_tokens": ("BOOL", [1], "bool"),
    "return_num_output_tokens": ("BOOL", [1], "bool"),
    # TensorRT-LLM's scalar inputs
    "max_tokens": ("INT32", [1], "int"),
    "min_length": ("INT32", [1], "int"),
    "temperature": ("FP32", [1], "float"),
    "top_k": ("INT32", [1], "int"),
    "top_p": ("FP32", [1], "float"),
    "random_seed": ("UINT64", [1], "int"),
    "repetition_penalty": ("FP32", [1], "float"),
    "presence_penalty": ("FP32", [1], "float"),
    "frequency_penalty": ("FP32", [1], "float"),
    "stop_words": ("BYTES", [-1], "strs"),
    "beam_width": ("INT32", [1], "int"),
}
OUTPUTS: dict[str, tuple[str, list[int]]] = {
    "text_output": ("BYTES", [-1]),
    "finish_reason": ("BYTES", [-1]),
    "cumulative_logprob": ("FP32", [-1]),
    "logprobs": ("BYTES", [-1]),
    "num_input_tokens": ("UINT32", [1]),
    "num_output_tokens": ("UINT32", [-1]),
}
_RETURN_FLAGS = {f"return_{name}": name for name in OUTPUTS if name != "text_output"}
# TensorRT-LLM's input names -> vLLM's sampling parameter names
_TRTLLM = {"random_seed": "seed", "min_length": "min_tokens", "stop_words": "stop"}
_TRTLLM_SCALARS = (
    set(INPUTS)
    - set(_RETURN_FLAGS)
    - {
        "text_input",
        "stream",
        "sampling_parameters",
        "exclude_input_in_output",
    }
)
# vLLM's sampling parameter names that map onto ours -> kind
SAMPLING: dict[str, str] = {
    "temperature": "float",
    "top_p": "float",
    "top_k": "int",
    "min_p": "float",
    "max_tokens": "int",
    "min_tokens": "int",
    "seed": "int",
    "stop": "strs",
    "stop_token_ids": "ints",
    "ignore_eos": "bool",
    "repetition_penalty": "float",
    "presence_penalty": "float",
    "frequency_penalty": "float",
    "logprobs": "int",
    "n": "int",
    "beam_width": "int",
    "output_length_lower": "int",
    "output_length_upper": "int",
}
STRUCTURED = ("structured_outputs", "guided_decoding")  # sampling_parameters keys holding a constraint object
# request parameters Triton's clients set for the server itself, not for the model
_RESERVED = {"triton_enable_empty_final_response", "sequence_id", "sequence_start", "sequence_end", "priority",
             "timeout", "headers"}  # fmt: skip
_DATATYPE_ENUM = {"BOOL": pb.TYPE_BOOL, "BYTES": pb.TYPE_STRING, "INT32": pb.TYPE_INT32, "UINT64": pb.TYPE_UINT64,
                  "FP32": pb.TYPE_FP32, "UINT32": pb.TYPE_UINT32}  # fmt: skip
_NUMPY = {"BOOL": "?", "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "UINT8": "<u1",
          "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}  # fmt: skip
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents", "BYTES": "bytes_contents"}  # fmt: skip
_FINISH = {FinishReason.EOS: "stop", FinishReason.STOP: "stop", FinishReason.LENGTH: "length",
           FinishReason.ABORTED: "abort"}  # fmt: skip


class BadRequest(Exception):
    """A request the adapter cannot take: the status code and a message that starts with the field it names."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ------------------------------------------------------------------------------------------- tensors in


def _decode_raw(name: str, datatype: str, raw: bytes) -> list[Any]:
    if datatype == "BYTES":
        values, pos = [], 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise BadRequest(f"inputs.{name}: raw BYTES contents end inside an element's 4-byte length")
            (size,) = struct.unpack_from("<I", raw, pos)
            pos += 4
            if pos + size > len(raw):
                raise BadRequest(f"inputs.{name}: raw BYTES element of {size} bytes runs past the contents' end")
            values.append(raw[pos : pos + size])
            pos += size
        return values
    if datatype == "BF16":
        if len(raw) % 2:
            raise BadRequest(f"inputs.{name}: {len(raw)} raw bytes are not whole BF16 elements")
        wide = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return [float(x) for x in wide.view(np.float32)]
    dtype = np.dtype(_NUMPY[datatype])
    if len(raw) % dtype.itemsize:
        raise BadRequest(f"inputs.{name}: {len(raw)} raw bytes are not whole {datatype} elements")
    return np.frombuffer(raw, dtype=dtype).tolist()


def read_inputs(request: pb.ModelInferRequest) -> dict[str, list[Any]]:
    """Every input tensor's elements, flattened, from `contents` or `raw_input_contents`, checked against its
    shape; names must be the model's."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(
            f"raw_input_contents: {len(raw)} entries for {len(request.inputs)} inputs (one per input, in order)"
        )
    tensors: dict[str, list[Any]] = {}
    for i, tensor in enumerate(request.inputs):
        name, datatype = tensor.name, tensor.datatype.upper()
        if name not in INPUTS:
            raise BadRequest(f"inputs.{name}: not an input of this model; its inputs: {', '.join(INPUTS)}")
        if name in tensors:
            raise BadRequest(f"inputs.{name}: given twice")
        if datatype not in _NUMPY and datatype not in ("BYTES", "BF16"):
            raise BadRequest(f"inputs.{name}: unknown datatype {tensor.datatype!r}")
        if any(d < 0 for d in tensor.shape):
            raise BadRequest(f"inputs.{name}: shape {list(tensor.shape)} has a negative dimension")
        if raw:
            if tensor.HasField("contents"):
                raise BadRequest(f"inputs.{name}: has contents although the request sends raw_input_contents")
            values = _decode_raw(name, datatype, raw[i])
        else:
            if datatype not in _CONTENTS:
                raise BadRequest(f"inputs.{name}: {datatype} tensors travel in raw_input_contents only")
            values = list(getattr(tensor.contents, _CONTENTS[datatype]))
        count = math.prod(tensor.shape)
        if len(values) != count:
            raise BadRequest(f"inputs.{name}: shape {list(tensor.shape)} holds {count} elements, got {len(values)}")
        tensors[name] = [_as_kind(f"inputs.{name}", v, INPUTS[name][2], datatype) for v in values]
    return tensors


def _as_kind(where: str, value: Any, kind: str, datatype: str) -> Any:
    """A tensor element as the kind its input wants (strings decode as UTF-8)."""
    if kind in ("str", "strs"):
        if datatype != "BYTES":
            raise BadRequest(f"{where}: must be BYTES, got {datatype}")
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRequest(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    if kind == "bool":
        if datatype != "BOOL":
            raise BadRequest(f"{where}: must be BOOL, got {datatype}")
        return bool(value)
    if datatype in ("BYTES", "BOOL"):
        raise BadRequest(f"{where}: must be a number, got {datatype}")
    if kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise BadRequest(f"{where}: must be a whole number, got {value}")
        return int(value)
    return float(value)


# ------------------------------------------------------------------------------------- sampling params


def _coerce(name: str, value: Any, where: str) -> Any:
    """A sampling parameter's value as its kind: JSON and request parameters may carry numbers as strings."""
    kind = SAMPLING[name]
    try:
        if kind == "bool":
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if isinstance(value, bool):
                return value
            raise ValueError
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, float) and not number.is_integer():
                raise ValueError
            return int(number)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind == "strs":
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise ValueError
            return values
        if kind == "ints":
            if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError
            return value
    except (ValueError, TypeError, OverflowError):
        pass
    wanted = {"bool": "true or false", "int": "a whole number", "float": "a number", "strs": "a string or a list "
              "of strings", "ints": "a list of whole numbers"}[kind]  # fmt: skip
    raise BadRequest(f"{where}.{name}: must be {wanted}, got {value!r}")


def _parameter(p: pb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


@dataclass
class Call:
    """One KServe request, read and checked: what to ask the engine for and which outputs to return."""

    prompt: str
    params: SamplingParams
    stream: bool
    prepend_prompt: bool
    outputs: list[str]
    lower_hint: int | None = None
    upper_hint: int | None = None
    want_logprobs: int | None = None  # the client's own logprobs count (None: `logprobs` answers null)
    structured_field: str = "sampling_parameters.structured_outputs"  # where its constraint came from


def read_call(request: pb.ModelInferRequest) -> Call:
    tensors = read_inputs(request)

    def scalar(name: str) -> Any:
        values = tensors.get(name)
        if values is None:
            return None
        if len(values) != 1:
            raise BadRequest(f"inputs.{name}: one element expected, got {len(values)}")
        return values[0]

    prompt = scalar("text_input")
    if prompt is None:
        raise BadRequest("inputs.text_input: required (the prompt, BYTES of shape [1])")
    stream = bool(scalar("stream"))
    exclude = scalar("exclude_input_in_output")
    if stream and exclude is False:
        raise BadRequest("inputs.exclude_input_in_output: must not be false when streaming (deltas carry no prompt)")

    # request parameters, then the sampling_parameters JSON, then TensorRT-LLM's scalar inputs: later ones win
    given: dict[str, tuple[Any, str]] = {}
    structured: list[tuple[str, StructuredOutput]] = []
    for key in request.parameters:
        if key in _RESERVED:
            continue
        if key not in SAMPLING:
            raise BadRequest(f"parameters.{key}: unknown parameter; sampling parameters: {', '.join(SAMPLING)}")
        given[key] = (_parameter(request.parameters[key]), "parameters")
    text = scalar("sampling_parameters")
    if text is not None and text.strip():
        try:
            body = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadRequest(f"inputs.sampling_parameters: not JSON ({exc.msg} at character {exc.pos})") from exc
        if not isinstance(body, dict):
            raise BadRequest("inputs.sampling_parameters: must be a JSON object")
        for key, value in body.items():
            if key in STRUCTURED:  # vLLM's structured_outputs (guided_decoding before v0.10): an object
                try:
                    structured.extend(structured_from_vllm(value, f"sampling_parameters.{key}") if value else [])
                except InvalidRequest as exc:
                    raise BadRequest(str(exc)) from exc
                continue
            if key not in SAMPLING:
                raise BadRequest(f"sampling_parameters.{key}: unknown sampling parameter; known: {', '.join(SAMPLING)}")
            if value is not None:
                given[key] = (value, "sampling_parameters")
    for name in _TRTLLM_SCALARS:
        if name in tensors:
            value = tensors[name] if INPUTS[name][2] == "strs" else scalar(name)
            given[_TRTLLM.get(name, name)] = (value, "inputs")
    values = {key: _coerce(key, value, where) for key, (value, where) in given.items()}

    for key in ("n", "beam_width"):
        if values.pop(key, 1) != 1:
            raise BadRequest(f"{given[key][1]}.{key}: only 1 is supported (one sequence per request)")
    if values.get("top_k") == -1:  # vLLM's "off"
        values["top_k"] = 0
    lower, upper = values.pop("output_length_lower", None), values.pop("output_length_upper", None)
    want_logprobs = values.get("logprobs")
    outputs = _requested_outputs(request, tensors)
    if {"cumulative_logprob", "logprobs"} & set(outputs):
        values["logprobs"] = want_logprobs or 0  # the sampled tokens' logprobs at least
    for key in ("stop", "stop_token_ids"):
        if key in values:
            values[key] = tuple(values[key])
    if len(structured) > 1:
        raise BadRequest(f"{structured[1][0]}: only one structured-output constraint (already {structured[0][0]})")
    if structured:
        values["structured_output"] = structured[0][1]
    return Call(
        prompt=prompt,
        params=SamplingParams(**values),
        stream=stream,
        prepend_prompt=not stream and exclude is not True,
        outputs=outputs,
        lower_hint=lower,
        upper_hint=upper,
        want_logprobs=want_logprobs,
        structured_field=structured[0][0] if structured else "sampling_parameters.structured_outputs",
    )


def _requested_outputs(request: pb.ModelInferRequest, tensors: dict[str, list[Any]]) -> list[str]:
    """Outputs named in the request, else text_output and those its return_* inputs switch on."""
    if request.outputs:
        names = [o.name for o in request.outputs]
        for name in names:
            if name not in OUTPUTS:
                raise BadRequest(f"outputs.{name}: not an output of this model; its outputs: {', '.join(OUTPUTS)}")
        return list(dict.fromkeys(names))
    return ["text_output"] + [out for flag, out in _RETURN_FLAGS.items() if tensors.get(flag) == [True]]


# ------------------------------------------------------------------------------------------ tensors out


def _raw(datatype: str, values: list[Any]) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in values)
    return np.asarray(values, dtype=_NUMPY[datatype]).tobytes()


class Answer:
    """Builds a request's responses from its engine events: per text delta when streaming, else once."""

    def __init__(self, call: Call, request: pb.ModelInferRequest, prompt_tokens: int, decode: Callable) -> None:
        self.call = call
        self.model_name = request.model_name
        self.id = request.id
        self.prompt_tokens = prompt_tokens
        self.decode = decode
        self.cumulative = 0.0
        self.first = True

    def response(self, chunks: list[Chunk], final: Finished | None) -> pb.ModelInferResponse:
        call = self.call
        text = "".join(c.text for c in chunks)
        if self.first and call.prepend_prompt:
            text = call.prompt + text
        self.first = False
        tokens = [t for c in chunks for t in c.token_ids]
        entries = [e for c in chunks for e in c.logprobs]
        self.cumulative += sum(lp for _, lp, _ in entries)
        values: dict[str, Callable[[], Any]] = {  # each output's one element, made only when it is asked for
            "text_output": lambda: text.encode("utf-8"),
            "finish_reason": lambda: (_FINISH[final.reason] if final else "").encode(),
            "cumulative_logprob": lambda: self.cumulative,
            "logprobs": lambda: self._logprobs(entries),
            "num_input_tokens": lambda: self.prompt_tokens,
            "num_output_tokens": lambda: len(tokens),
        }
        response = pb.ModelInferResponse(model_name=self.model_name, model_version=VERSION, id=self.id)
        for name in call.outputs:
            datatype = OUTPUTS[name][0]
            response.outputs.add(name=name, datatype=datatype, shape=[1])
            response.raw_output_contents.append(_raw(datatype, [values[name]()]))
        response.parameters["triton_final_response"].bool_param = final is not None
        return response

    def _logprobs(self, entries: list[tuple[int, float, list[tuple[int, float]]]]) -> bytes:
        """vLLM's form: per token {token id: {logprob, rank, decoded_token}} for the sampled and the top tokens."""
        if self.call.want_logprobs is None:
            return b"null"
        out = []
        for token, logprob, top in entries:
            ranks = {t: r for r, (t, _) in enumerate(top, start=1)}
            row = {str(token): {"logprob": logprob, "rank": ranks.get(token), "decoded_token": self.decode(token)}}
            for t, lp in top:
                row.setdefault(str(t), {"logprob": lp, "rank": ranks[t], "decoded_token": self.decode(t)})
            out.append(row)
        return json.dumps(out).encode("utf-8")


# ------------------------------------------------------------------------------------------------ service


class KServeService:
    """The adapter's handlers; `holder.engine` is the engine once it has loaded (None before)."""

    def __init__(self, holder: Any) -> None:
        self.holder = holder

    def _engine(self) -> Engine:
        engine: Engine | None = self.holder.engine
        if engine is None:
            raise BadRequest("the model is still loading", grpc.StatusCode.UNAVAILABLE)
        return engine

    def _model(self, request: Any) -> Engine:
        """The engine, if `request` (well formed) names its model: `name`/`version`, or `model_name`/`model_version`
        in inference requests."""
        if (reason := malformed(request)) is not None:
            raise BadRequest(reason)
        engine = self._engine()
        infer = isinstance(request, pb.ModelInferRequest)
        key = "model_name" if infer else "name"
        name, version = (request.model_name, request.model_version) if infer else (request.name, request.version)
        # the model, or one of its LoRA adapters as a model of its own
        if name != engine.model_name and not (name and name in {a.name for a in engine.loaded_adapters()}):
            raise BadRequest(
                f"{key}: this server serves {engine.model_name!r}, not {name!r}"
                if name
                else f"{key}: required; this server serves {engine.model_name!r}",
                grpc.StatusCode.NOT_FOUND if name else grpc.StatusCode.INVALID_ARGUMENT,
            )
        if version not in ("", VERSION):
            raise BadRequest(
                f"{key.replace('name', 'version')}: {name!r} has only version {VERSION}, not {version!r}",
                grpc.StatusCode.NOT_FOUND,
            )
        return engine

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        engine = self.holder.engine
        return pb.ServerReadyResponse(ready=engine is not None and engine.accepting)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        engine = self.holder.engine
        if engine is None:
            return pb.ModelReadyResponse(ready=False)
        engine = await self._call(context, lambda: self._model(request))
        return pb.ModelReadyResponse(ready=engine.accepting)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        try:
            version = metadata.version("optimist")
        except metadata.PackageNotFoundError:
            version = "unknown"
        return pb.ServerMetadataResponse(name="optimist", version=version, extensions=["parameters"])

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        await self._call(context, lambda: self._model(request))
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name,  # the model's, or one of its LoRA adapters' (_model checked it)
            versions=[VERSION],
            platform=PLATFORM,
            inputs=[tensor(name=n, datatype=d, shape=s) for n, (d, s, _) in INPUTS.items()],
            outputs=[tensor(name=n, datatype=d, shape=s) for n, (d, s) in OUTPUTS.items()],
        )

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        await self._call(context, lambda: self._model(request))
        config = pb.ModelConfig(
            name=request.name,
            platform=PLATFORM,
            backend=PLATFORM,
            max_batch_size=0,  # requests carry no batch dimension; the engine batches them itself
            model_transaction_policy=pb.ModelTransactionPolicy(decoupled=True),
        )
        for n, (d, s, _) in INPUTS.items():
            config.input.add(name=n, data_type=_DATATYPE_ENUM[d], dims=s, optional=n != "text_input")
        for n, (d, s) in OUTPUTS.items():
            config.output.add(name=n, data_type=_DATATYPE_ENUM[d], dims=s)
        return pb.ModelConfigResponse(config=config)

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        last: pb.ModelInferResponse | None = None
        try:
            async with contextlib.aclosing(self.answer(request, streaming=False)) as responses:
                async for response in responses:
                    last = response
        except BadRequest as exc:
            await context.abort(exc.code, exc.message)
        assert last is not None  # a whole answer is one response
        return last

    async def ModelStreamInfer(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests run concurrently as they arrive; their responses interleave, each naming its request's id.
        When the client has sent its last request the stream ends after their last responses; when it cancels,
        every request still running is aborted."""
        out: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def run(request: Any) -> None:
            try:
                async with contextlib.aclosing(self.answer(request, streaming=True)) as responses:
                    async for response in responses:
                        out.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
            except BadRequest as exc:
                out.put_nowait(_failed(request, exc.message))
            except Exception as exc:  # a bug: this request fails, the others on the stream go on
                log.exception("ModelStreamInfer request failed")
                out.put_nowait(_failed(request, f"internal error: {exc!r}"))

        async def read() -> None:
            try:
                async for request in requests:
                    task = asyncio.create_task(run(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                while running:
                    await asyncio.gather(*running)
            finally:
                out.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await out.get()) is not None:
                yield item
            await reader  # a failure reading the requests ends the call with it
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()
            await asyncio.gather(reader, *running, return_exceptions=True)

    async def _call(self, context: grpc.aio.ServicerContext, fn: Callable[[], Engine]) -> Engine:
        try:
            return fn()
        except BadRequest as exc:
            await context.abort(exc.code, exc.message)
            raise

    async def answer(self, request: Any, streaming: bool) -> AsyncGenerator[pb.ModelInferResponse]:
        """The responses to one request (raises BadRequest): per text delta when it streams, else one."""
        engine = self._model(request)
        call = read_call(request)
        if call.stream and not streaming:
            raise BadRequest("inputs.stream: ModelInfer answers once; stream with ModelStreamInfer")
        try:
            prompt_ids = engine.tokenizer.encode(call.prompt)
            adapter = None if request.model_name == engine.model_name else engine.adapter(request.model_name)
            req = engine.new_request(
                prompt_ids,
                call.params,
                request_id=f"kserve-{uuid.uuid4().hex[:16]}",  # client ids need not be unique; they return as sent
                lower_hint=call.lower_hint,
                upper_hint=call.upper_hint,
                prompt_field="text_input",
                adapter=adapter,
            )
        except UnknownAdapter as exc:  # unloaded since _model looked
            raise BadRequest(f"model_name: {exc}", grpc.StatusCode.NOT_FOUND) from exc
        except InvalidRequest as exc:
            if exc.field.startswith("sampling.structured_output"):
                raise BadRequest(f"{call.structured_field}: {str(exc).removeprefix(exc.field + ': ')}") from exc
            raise BadRequest(str(exc).removeprefix("sampling.")) from exc
        answer = Answer(call, request, len(prompt_ids), engine.tokenizer.token_text)
        held: list[Chunk] = []
        try:
            async with contextlib.aclosing(request_events(engine, req)) as batches:
                async for events in batches:
                    chunks = [e for e in events if isinstance(e, Chunk)]
                    final = events[-1] if isinstance(events[-1], Finished) else None
                    if final is not None and final.error is not None and final.invalid:
                        message = final.error.removeprefix("sampling.structured_output")
                        raise BadRequest(f"{call.structured_field}{message}")
                    if final is not None and final.error is not None:
                        raise BadRequest(f"engine error: {final.error}", grpc.StatusCode.INTERNAL)
                    if call.stream:
                        yield answer.response(chunks, final)
                    else:
                        held.extend(chunks)
                        if final is not None:
                            yield answer.response(held, final)
        except RequestFailed as exc:
            raise BadRequest(exc.message, exc.code) from exc


def _failed(request: Any, message: str) -> pb.ModelStreamInferResponse:
    failed = pb.ModelInferResponse()
    if isinstance(request, pb.ModelInferRequest):
        failed.id, failed.model_name = request.id, request.model_name
    failed.parameters["triton_final_response"].bool_param = True
    return pb.ModelStreamInferResponse(error_message=message, infer_response=failed)


def handlers(service: KServeService) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "ServerLive": unary(service.ServerLive, pb.ServerLiveRequest),
            "ServerReady": unary(service.ServerReady, pb.ServerReadyRequest),
            "ModelReady": unary(service.ModelReady, pb.ModelReadyRequest),
            "ServerMetadata": unary(service.ServerMetadata, pb.ServerMetadataRequest),
            "ModelMetadata": unary(service.ModelMetadata, pb.ModelMetadataRequest),
            "ModelConfig": unary(service.ModelConfig, pb.ModelConfigRequest),
            "ModelInfer": unary(service.ModelInfer, pb.ModelInferRequest),
            "ModelStreamInfer": bidi_stream(service.ModelStreamInfer, pb.ModelInferRequest),
        },
    )
