"""The OpenAI-compatible HTTP API (`/v1/completions`, `/v1/chat/completions`, `/v1/models`), as an adapter in front
of the engine, on its own port (`--http-port`, 8000 as vLLM), so OpenAI clients, LangChain-style tools, benchmark
harnesses and the Gateway API Inference Extension's endpoint picker (which parses OpenAI request bodies, and scrapes
`/metrics` on the port it routes to) work unchanged. Not a second engine: every choice becomes one engine request,
scheduled, batched, cached and measured like any other.

- Requests: OpenAI's fields (`model`, `prompt` as a string, a list of strings, a list of token ids or a list of
  those; `messages` with string or text-part content; `max_tokens` / `max_completion_tokens`, `temperature`,
  `top_p`, `n`, `stream`, `stream_options.include_usage`, `stop`, `seed`, `presence_penalty`,
  `frequency_penalty`, `logprobs` / `top_logprobs`, `echo`, `user`), vLLM's extra sampling fields (`top_k`,
  `min_p`, `min_tokens`, `repetition_penalty`, `ignore_eos`, `stop_token_ids`) and ours (`output_length_hint:
  {"lower", "upper"}`, the scheduler's hint, as in the gRPC API). A field this server does not know, or a feature
  it does not have (images, logit_bias, suffix, best_of > n, tool_choice "auto"), gets a 400 naming it rather
  than being silently ignored. The `X-Request-Id` header names the engine request (its choices `ID-0`, `ID-1`,
  ... when there are several), so the gRPC `Abort` can cancel it.
- Tool calling (engine/tool_calls.py): `tools` with `tool_choice` "required" or a named function, answered as
  `tool_calls` whose arguments are valid JSON of their function's parameters (structured outputs); "none" answers
  in text; assistant `tool_calls` and `tool` messages of earlier turns reach the chat template.
- Structured outputs (engine/structured.py): OpenAI's `response_format` (`text`, `json_object`, `json_schema` with
  its `schema`), on both endpoints as vLLM, and vLLM's `structured_outputs` (`json`, `json_object`, `regex`,
  `choice`, `grammar`; `disable_any_whitespace`, `whitespace_pattern`) with its older spellings `guided_json`,
  `guided_regex`, `guided_choice`, `guided_grammar`. One constraint per request; a schema, regex or grammar that
  does not compile is a 400 naming the field it came in.
- Defaults as OpenAI's: completions 16 tokens, chat completions up to the context; `n` choices of one prompt
  are sampled independently (with a `seed`, choice i uses seed + i: reproducible, not identical). `echo` with
  `logprobs` also scores the prompt (its tokens lead the logprobs, the first with null values).
- Errors have OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) and the message starts with the
  field: 400 bad request, 404 unknown model or route, 413 body too large, 429 waiting queue full, 503 loading or
  draining, 500 engine failure. A client that disconnects aborts its requests, which frees their KV blocks.
- `POST /tokenize` and `/detokenize` (vLLM's), `GET /health` (200 when the engine takes requests, else 503),
  `GET /version`, and `GET /metrics`: the sidecar's series (native names and the `vllm:` ones the endpoint picker
  reads) from the engine in process.
- With an API key (`--api-key-file`), the /v1 routes need `Authorization: Bearer KEY` (401 otherwise); the rest
  stay open for probes and scrapers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, replace
from importlib import metadata
from typing import Any

import grpc
from aiohttp import web

from .engine import Engine, EngineUnavailable, UnknownAdapter
from .model.lora import AdapterError, LoraAdapter
from .model.tokenizer import TokenizerError
from .outputs import Chunk, Event, Finished
from .request import (
    FinishReason,
    InvalidRequest,
    Request,
    SamplingParams,
    StructuredOutput,
    structured_from_vllm,
    structured_value,
)
from .rpc import RequestFailed, open_events
from .tool_calls import Tools, message_tool_calls, read_tools

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 2**20  # a 128K-token prompt is ~0.5 MB of text, ~1 MB as token ids
MAX_CHOICES = 64  # prompts x n in one request
_FINISH = {FinishReason.EOS: "stop", FinishReason.STOP: "stop", FinishReason.LENGTH: "length",
           FinishReason.ABORTED: "abort"}  # fmt: skip
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
}
_ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "service_unavailable"}  # fmt: skip
_MIN_LOGPROB = -9999.0  # JSON has no -Infinity; vLLM reports impossible tokens with this value too

# Fields each endpoint reads; anything else is refused by name. `user`, `metadata`, `store` and `service_tier` are
# accepted and have no effect here.
_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
           "presence_penalty", "frequency_penalty", "logprobs", "user", "logit_bias", "top_k", "min_p", "min_tokens",
           "repetition_penalty", "ignore_eos", "stop_token_ids", "output_length_hint", "metadata", "store",
           "service_tier", "response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
           "guided_grammar"}  # fmt: skip
_COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "suffix", "best_of"}
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions",
                          "function_call", "parallel_tool_calls"}  # fmt: skip
# vLLM's older top-level fields, each with the constraint kind it names
_GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}  # fmt: skip
_ROLES = {"system", "user", "assistant", "tool"}


class ApiError(Exception):
    """A request this server answers with an OpenAI-shaped error; the message names the field first."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.param, self.code)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> web.Response:
    kind = _ERROR_TYPE.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status)


def _unknown_model(engine: Engine, name: str) -> ApiError:
    served = ", ".join(repr(n) for n in [engine.model_name, *(a.name for a in engine.loaded_adapters())])
    return ApiError(404, f"model: this server serves {served}, not {name!r}", "model", "model_not_found")


def _adapter(engine: Engine, name: str | None) -> LoraAdapter | None:
    """The LoRA adapter a request's `model` names: None for the served model itself (or no `model`)."""
    if name is None or name == engine.model_name:
        return None
    try:
        return engine.adapter(name)
    except UnknownAdapter:
        raise _unknown_model(engine, name) from None


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param)


def _bad_field(exc: InvalidRequest) -> ApiError:
    """A 400 for a request check that names the OpenAI field itself."""
    return _bad(exc.field, str(exc).removeprefix(f"{exc.field}: "))


def _check_body(engine: Engine, body: dict[str, Any], known: set[str], where: str) -> LoraAdapter | None:
    """No field outside `known`, and `model` (when given) names the served model or a loaded LoRA adapter
    (returned)."""
    unknown = sorted(set(body) - known)
    if unknown:
        raise _bad(unknown[0], f"unknown field; {where} takes {', '.join(sorted(known))}")
    return _adapter(engine, _typed(body, "model", "str"))


def _check_ids(engine: Engine, ids: list[int], param: str) -> None:
    vocab = engine.model_config.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise _bad(param, f"token id {bad} is outside the vocabulary (size {vocab})")


# ------------------------------------------------------------------------------------------- reading requests


def _typed(body: dict[str, Any], name: str, kind: str) -> Any:
    """body[name] checked as `kind` (None when absent or null)."""
    value = body.get(name)
    if value is None:
        return None
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "object": isinstance(value, dict),
        "list": isinstance(value, list),
    }[kind]
    if kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)  # 16.0 from a JSON library that writes every number as a float
    if not ok:
        wanted = {"bool": "true or false", "int": "a whole number", "number": "a number", "str": "a string",
                  "object": "an object", "list": "a list"}[kind]  # fmt: skip
        raise _bad(name, f"must be {wanted}, got {json.dumps(value)[:80]}")
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", "must be a string or a list of strings")
    return tuple(stops)


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


@dataclass
class Call:
    """One OpenAI request, read and checked: the engine requests to make and how to answer."""

    chat: bool
    model: str
    prompts: list[list[int]]  # token ids of each prompt
    texts: list[str]  # each prompt as text (for `echo`)
    params: SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None  # top alternatives per token when the client asked for logprobs
    lower_hint: int | None = None
    upper_hint: int | None = None
    max_tokens_param: str = "max_tokens"
    max_tokens_given: bool = False
    structured_param: str = "response_format"  # where the client put its structured-output constraint
    tools: Tools | None = None  # tool_choice required or a named function: the answers are tool calls
    adapter: LoraAdapter | None = None  # the LoRA adapter `model` named (None: the base model)


def _sampling(body: dict[str, Any], chat: bool) -> tuple[dict[str, Any], str]:
    values: dict[str, Any] = {}
    max_param = "max_tokens"
    if chat and body.get("max_completion_tokens") is not None:
        max_param = "max_completion_tokens"
    if (max_tokens := _typed(body, max_param, "int")) is not None:
        values["max_tokens"] = max_tokens
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p", "repetition_penalty"):
        if (value := _typed(body, name, "number")) is not None:
            values[name] = float(value)
    for name in ("seed", "min_tokens"):
        if (value := _typed(body, name, "int")) is not None:
            values[name] = value
    if (top_k := _typed(body, "top_k", "int")) is not None:
        values["top_k"] = 0 if top_k == -1 else top_k  # vLLM's "off"
    if (ignore_eos := _typed(body, "ignore_eos", "bool")) is not None:
        values["ignore_eos"] = ignore_eos
    values["stop"] = _stop(body)
    ids = _typed(body, "stop_token_ids", "list")
    if ids is not None:
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise _bad("stop_token_ids", "must be a list of whole numbers")
        values["stop_token_ids"] = tuple(ids)
    return values, max_param


def _refuse_unsupported(body: dict[str, Any], chat: bool) -> None:
    if body.get("logit_bias"):
        raise _bad("logit_bias", "not supported by this server")
    if chat:
        if body.get("functions"):
            raise _bad("functions", "the legacy function calling is not supported; send tools and tool_choice")
        if body.get("function_call") not in (None, "none"):
            raise _bad("function_call", "the legacy function calling is not supported; send tools and tool_choice")
    else:
        if body.get("suffix"):
            raise _bad("suffix", "not supported by this server (no fill-in-the-middle)")


def _structured(body: dict[str, Any]) -> tuple[StructuredOutput | None, str]:
    """The request's structured-output constraint, if any, and the field it came in."""
    found: list[tuple[str, StructuredOutput]] = []
    try:
        fmt = _typed(body, "response_format", "object")
        if fmt is not None:
            found.extend(_response_format(fmt))
        if body.get("structured_outputs") is not None:
            found.extend(structured_from_vllm(body["structured_outputs"], "structured_outputs"))
        found.extend(
            (name, structured_value(kind, body[name], name))
            for name, kind in _GUIDED.items()
            if body.get(name) is not None
        )
    except InvalidRequest as exc:
        raise _bad_field(exc) from exc
    if not found:
        return None, "response_format"
    if len(found) > 1:
        raise _bad(found[1][0], f"only one structured-output constraint per request (already {found[0][0]})")
    return found[0][1], found[0][0]


def _response_format(fmt: dict[str, Any]) -> list[tuple[str, StructuredOutput]]:
    """OpenAI's response_format: text (nothing), json_object, or json_schema with its schema."""
    extra = sorted(set(fmt) - {"type", "json_schema"})
    if extra:
        raise _bad(f"response_format.{extra[0]}", "unknown; response_format takes type and json_schema")
    kind = fmt.get("type")
    if kind == "json_object":
        return [("response_format", StructuredOutput("json_object"))]
    if kind == "json_schema":
        spec = _typed(fmt, "json_schema", "object")
        if spec is None:
            raise _bad("response_format.json_schema", 'required when type is "json_schema"')
        unknown = sorted(set(spec) - {"name", "schema", "strict", "description"})
        if unknown:
            raise _bad(f"response_format.json_schema.{unknown[0]}", "unknown; takes name, schema, strict, description")
        if not isinstance(spec.get("schema"), dict | bool):
            raise _bad("response_format.json_schema.schema", "must be a JSON Schema object")
        field = "response_format.json_schema.schema"
        return [(field, structured_value("json_schema", spec["schema"], field))]
    if kind != "text":
        raise _bad("response_format.type", f'must be "text", "json_object" or "json_schema", got {json.dumps(kind)}')
    return []


def _n(body: dict[str, Any], chat: bool) -> int:
    n = _typed(body, "n", "int")
    n = 1 if n is None else n
    if n < 1:
        raise _bad("n", f"must be >= 1, got {n}")
    if not chat:
        best_of = _typed(body, "best_of", "int")
        if best_of is not None and best_of != n:
            raise _bad("best_of", f"only best_of == n is supported (no server-side ranking), got {best_of} with n={n}")
    return n


def _hint(body: dict[str, Any]) -> tuple[int | None, int | None]:
    hint = _typed(body, "output_length_hint", "object")
    if hint is None:
        return None, None
    unknown = set(hint) - {"lower", "upper"}
    if unknown:
        raise _bad(f"output_length_hint.{sorted(unknown)[0]}", "unknown field; the hint has lower and upper")
    bounds = []
    for key in ("lower", "upper"):
        value = hint.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise _bad(f"output_length_hint.{key}", f"must be a whole number >= 1, got {json.dumps(value)[:40]}")
        bounds.append(value)
    return bounds[0], bounds[1]


def _messages(engine: Engine, body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "required: a non-empty list of {role, content} messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, "must be an object with role and content")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for system instructions
            role = "system"
        if role not in _ROLES:
            raise _bad(f"{where}.role", f"must be one of system, developer, user, assistant, tool; got {role!r}")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else None
                    raise _bad(f"{where}.content[{j}]", f"only text parts are supported, got type {kind!r}")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None and role == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise _bad(f"{where}.content", "must be a string or a list of text parts")
        message: dict[str, Any] = {"role": role, "content": content}
        if m.get("tool_calls"):
            if role != "assistant":
                raise _bad(f"{where}.tool_calls", "only assistant messages make tool calls")
            try:
                message["tool_calls"] = message_tool_calls(m["tool_calls"], f"{where}.tool_calls")
            except InvalidRequest as exc:
                raise _bad_field(exc) from exc
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            message["tool_call_id"] = m["tool_call_id"]
        out.append(message)
    if engine.tokenizer.chat_template is None:
        raise _bad("messages", f"the model {engine.model_name!r} has no chat template; use /v1/completions")
    return out


def _prompts(engine: Engine, body: dict[str, Any]) -> tuple[list[list[int]], list[str]]:
    prompt = body.get("prompt")
    items: list[Any]
    if isinstance(prompt, str) or _token_ids(prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _token_ids(p) for p in prompt):
        items = prompt
    else:
        raise _bad("prompt", "required: a string, a list of strings, a list of token ids, or a list of those")
    ids, texts = [], []
    for item in items:
        if isinstance(item, str):
            ids.append(engine.tokenizer.encode(item))
            texts.append(item)
        else:
            _check_ids(engine, item, "prompt")  # before decoding them for `echo`
            ids.append(list(item))
            texts.append(engine.tokenizer.decode(item))
    return ids, texts


def read_call(engine: Engine, body: Any, chat: bool) -> Call:
    """Checks an OpenAI request body against the model; raises ApiError naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    adapter = _check_body(engine, body, _CHAT_FIELDS if chat else _COMPLETION_FIELDS, "this endpoint")
    _refuse_unsupported(body, chat)
    values, max_param = _sampling(body, chat)
    n = _n(body, chat)
    stream = bool(_typed(body, "stream", "bool"))
    options = _typed(body, "stream_options", "object") or {}
    if options and not stream:
        raise _bad("stream_options", "only allowed when stream is true")
    if set(options) - {"include_usage"}:
        raise _bad(
            f"stream_options.{sorted(set(options) - {'include_usage'})[0]}",
            "unknown; stream_options takes include_usage",
        )
    include_usage = bool(options.get("include_usage"))
    if chat:
        want = _typed(body, "logprobs", "bool")
        top = _typed(body, "top_logprobs", "int")
        if top is not None and not want:
            raise _bad("top_logprobs", "needs logprobs: true")
        logprobs = (top or 0) if want else None
        echo = False
        try:
            tools = read_tools(body)
        except InvalidRequest as exc:
            raise _bad_field(exc) from exc
        try:
            text = engine.tokenizer.apply_chat_template(
                _messages(engine, body), add_generation_prompt=True, tools=tools.specs if tools else None
            )
        except TokenizerError as exc:
            raise _bad("messages", str(exc)) from exc
        prompts, texts = [engine.tokenizer.encode(text)], [text]
    else:
        tools = None
        logprobs = _typed(body, "logprobs", "int")
        echo = bool(_typed(body, "echo", "bool"))
        prompts, texts = _prompts(engine, body)
    if len(prompts) * n > MAX_CHOICES:
        raise _bad("n", f"prompts x n must be at most {MAX_CHOICES}, got {len(prompts)} x {n}")
    if logprobs is not None:
        values["logprobs"] = logprobs
        if echo:  # the echoed prompt's tokens come with their logprobs too (scoring a text, as evaluation harnesses do)
            values["prompt_logprobs"] = logprobs
    values["structured_output"], structured_param = _structured(body)
    if tools is not None and (constraint := tools.constraint()) is not None:
        if values["structured_output"] is not None:
            raise _bad(structured_param, f"cannot be combined with tool_choice {json.dumps(body['tool_choice'])}")
        values["structured_output"], structured_param = constraint, tools.param
    lower, upper = _hint(body)
    given = "max_tokens" in values
    if not given and not chat:
        values["max_tokens"] = 16  # OpenAI's and vLLM's default for completions
    return Call(
        chat=chat,
        model=adapter.name if adapter is not None else engine.model_name,
        adapter=adapter,
        prompts=prompts,
        texts=texts,
        params=SamplingParams(**values),
        n=n,
        stream=stream,
        include_usage=include_usage,
        echo=echo,
        logprobs=logprobs,
        lower_hint=lower,
        upper_hint=upper,
        max_tokens_param=max_param,
        max_tokens_given=given,
        structured_param=structured_param,
        tools=tools if tools is not None and tools.mode != "none" else None,
    )


def _param_of(exc: InvalidRequest, call: Call) -> str:
    """The OpenAI field an engine validation error is about."""
    name = exc.field.removeprefix("sampling.")
    if name.startswith("prompt"):
        return "messages" if call.chat else "prompt"
    if name == "max_tokens":
        return call.max_tokens_param
    if name == "request_id":
        return "X-Request-Id"
    if name.startswith("structured_output"):
        return call.structured_param
    return name


def make_requests(engine: Engine, call: Call, request_id: str) -> list[Request]:
    """One engine request per choice (prompt-major, as OpenAI numbers choices); raises ApiError naming the field."""
    reqs = []
    capacity = engine.num_kv_blocks * engine.config.kv_block_size
    single = len(call.prompts) * call.n == 1
    for p, prompt in enumerate(call.prompts):
        params = call.params
        if not call.max_tokens_given and call.chat:  # up to the context (and what the cache can hold)
            room = min(engine.model_config.context_length, capacity) - len(prompt)
            params = replace(params, max_tokens=max(1, room))
        for j in range(call.n):
            choice_params = params
            if params.seed is not None and j:
                choice_params = replace(params, seed=params.seed + j)
            index = p * call.n + j
            try:
                reqs.append(
                    engine.new_request(
                        prompt,
                        choice_params,
                        request_id=request_id if single else f"{request_id}-{index}",
                        lower_hint=call.lower_hint,
                        upper_hint=call.upper_hint,
                        prompt_field="prompt",
                        adapter=call.adapter,
                    )
                )
            except InvalidRequest as exc:
                param = _param_of(exc, call)
                message = str(exc).removeprefix(f"{exc.field}: ")
                where = f"{param}[{p}]" if len(call.prompts) > 1 and param == "prompt" else param
                raise ApiError(400, f"{where}: {message}", param) from exc
    return reqs


# ------------------------------------------------------------------------------------------ building answers


class Choice:
    """One choice's answer so far, from its engine events."""

    def __init__(self, index: int, call: Call, engine: Engine, prompt_text: str, prompt_ids: list[int]) -> None:
        self.index = index
        self.call = call
        self.tokenizer = engine.tokenizer
        self.text = prompt_text if call.echo else ""
        self.entries: list[tuple[int, float, list[tuple[int, float]]]] = []
        # echo with logprobs: the prompt's tokens lead the logprobs, the first one without a value (nothing before
        # it to condition on), as OpenAI's; the rest arrive from the engine (prompt_entries) before any new token
        self.scored_prompt = call.echo and call.logprobs is not None
        self.first_prompt_id = prompt_ids[0]
        self.prompt_len = len(prompt_ids)
        self.prompt_entries: list[tuple[int, float, list[tuple[int, float]]]] = []
        self.echoed = False
        self.offset = 0 if self.scored_prompt else len(self.text)  # text offset of the next logprob entry
        self.final: Finished | None = None
        self.role_sent = False
        self._calls: list[dict[str, Any]] | None = None

    @property
    def prompt_scored(self) -> bool:
        return len(self.prompt_entries) >= self.prompt_len - 1

    def prompt_scores(self) -> list[Any]:
        """The echoed prompt's logprob entries: its first token without values, then the engine's."""
        return [(self.first_prompt_id, None, None), *self.prompt_entries]

    def _token(self, token_id: int) -> str:
        raw = self.tokenizer.token_bytes[token_id]
        return raw.decode("utf-8", errors="replace") if raw else self.tokenizer.token_text(token_id)

    def _bytes(self, token_id: int) -> list[int]:
        raw = self.tokenizer.token_bytes[token_id] or self.tokenizer.token_text(token_id).encode("utf-8")
        return list(raw)

    def logprobs(self, entries: list[Any]) -> dict[str, Any] | None:
        """OpenAI's logprobs block for `entries` ((token, logprob, top alternatives); completions also take a
        logprob and alternatives of None: the echoed prompt's first token)."""
        if self.call.logprobs is None:
            return None
        if self.call.chat:
            return {
                "content": [
                    {
                        "token": self._token(tok),
                        "logprob": max(lp, _MIN_LOGPROB),
                        "bytes": self._bytes(tok),
                        "top_logprobs": [
                            {"token": self._token(t), "logprob": max(v, _MIN_LOGPROB), "bytes": self._bytes(t)}
                            for t, v in top
                        ],
                    }
                    for tok, lp, top in entries
                ]
            }
        tokens: list[str] = []
        offsets: list[int] = []
        tops: list[dict[str, float] | None] = []
        for tok, lp, top in entries:
            text = self._token(tok)
            tokens.append(text)
            offsets.append(self.offset)
            self.offset += len(text)
            if lp is None:
                tops.append(None)
                continue
            alternatives = {self._token(t): max(v, _MIN_LOGPROB) for t, v in top}
            alternatives.setdefault(text, max(lp, _MIN_LOGPROB))
            tops.append(alternatives)
        return {
            "tokens": tokens,
            "token_logprobs": [None if lp is None else max(lp, _MIN_LOGPROB) for _, lp, _ in entries],
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def tool_calls(self) -> list[dict[str, Any]] | None:
        """With tool_choice required or named, the finished answer's calls (None before the end, without tools, or
        when it was cut short: then the text is the answer)."""
        tools, f = self.call.tools, self.final
        if tools is None or f is None or f.reason is not FinishReason.EOS:
            return None
        if self._calls is None:
            self._calls = tools.calls(self.text)
        return self._calls

    def message(self) -> dict[str, Any]:
        calls = self.tool_calls()
        if calls is not None:
            return {"role": "assistant", "content": None, "tool_calls": calls}
        return {"role": "assistant", "content": self.text}

    def finish_fields(self) -> dict[str, Any]:
        f = self.final
        if f is None:
            return {"finish_reason": None}
        if self.tool_calls() is not None and self.call.tools is not None:
            return {
                "finish_reason": "tool_calls" if self.call.tools.mode == "required" else "stop",
                "stop_reason": None,
            }
        return {"finish_reason": _FINISH[f.reason], "stop_reason": f.stop or None}


def _usage(choices: list[Choice], n: int) -> dict[str, Any]:
    finals = [c.final for c in choices if c.final is not None]
    firsts = [c.final for c in choices[::n] if c.final is not None]  # one choice per prompt counts its prompt
    prompt = sum(f.prompt_tokens for f in firsts)
    completion = sum(f.completion_tokens for f in finals)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(f.cached_tokens for f in firsts)},
    }


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


async def _merged(
    engine: Engine, streams: list[AsyncGenerator[list[Event]]]
) -> AsyncGenerator[tuple[int, list[Event]]]:
    """Every choice's event batches as they come, tagged with the choice's index; closing this stops (and so
    aborts) the unfinished ones."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for batch in only:
                yield 0, batch
        return
    queue: asyncio.Queue[tuple[int, list[Event]] | None] = asyncio.Queue()

    async def pump(i: int, stream: AsyncGenerator[list[Event]]) -> None:
        async with contextlib.aclosing(stream):
            async for batch in stream:
                await queue.put((i, batch))
        await queue.put(None)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --------------------------------------------------------------------------------------------------- the app


class OpenAIService:
    """The handlers; `holder.engine` is the engine once it has loaded (None before)."""

    def __init__(self, holder: Any, metrics: Callable[[], bytes] | None = None, api_key: str | None = None) -> None:
        self.holder = holder
        self.metrics = metrics
        self.api_key = api_key

    def _engine(self) -> Engine:
        engine: Engine | None = self.holder.engine
        if engine is None:
            raise ApiError(503, "the model is still loading")
        return engine

    async def models(self, request: web.Request) -> web.Response:
        engine = self._engine()
        cards = [self._model_card(engine, None)] + [self._model_card(engine, a) for a in engine.loaded_adapters()]
        return web.json_response({"object": "list", "data": cards})

    async def model(self, request: web.Request) -> web.Response:
        engine = self._engine()
        return web.json_response(self._model_card(engine, _adapter(engine, request.match_info["name"])))

    def _model_card(self, engine: Engine, adapter: LoraAdapter | None) -> dict[str, Any]:
        """The model, or one of its LoRA adapters (with vLLM's `parent`: the base model, and `root`: its files)."""
        card = {"id": engine.model_name, "object": "model", "created": 0, "owned_by": "optimist",
                "max_model_len": engine.model_config.context_length}  # fmt: skip
        if adapter is not None:
            card.update(id=adapter.name, root=str(adapter.path), parent=engine.model_name)
        return card

    async def load_lora_adapter(self, request: web.Request) -> web.Response:
        """vLLM's runtime adapter loading: {"lora_name", "lora_path"} (with --allow-runtime-lora-updating)."""
        engine = self._runtime_lora()
        body = await _json_body(request)
        _check_body(engine, body, {"lora_name", "lora_path", "load_inplace"}, "/v1/load_lora_adapter")
        name, path = _typed(body, "lora_name", "str"), _typed(body, "lora_path", "str")
        if not name:
            raise _bad("lora_name", "required")
        if not path:
            raise _bad("lora_path", "required")
        replace = bool(_typed(body, "load_inplace", "bool"))  # vLLM's: new files for a loaded name
        if not replace and name in {a.name for a in engine.loaded_adapters()}:
            raise _bad("lora_name", f"an adapter named {name!r} is already loaded (unload it first, or load_inplace)")
        try:
            await asyncio.get_running_loop().run_in_executor(None, engine.load_adapter, name, path, replace)
        except AdapterError as exc:
            raise ApiError(400, f"lora_path: {exc}", "lora_path") from exc
        except EngineUnavailable as exc:
            raise ApiError(503, str(exc)) from exc
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora_adapter(self, request: web.Request) -> web.Response:
        """vLLM's runtime adapter unloading: {"lora_name"}; requests already running with it finish with it."""
        engine = self._runtime_lora()
        body = await _json_body(request)
        _check_body(engine, body, {"lora_name", "lora_int_id"}, "/v1/unload_lora_adapter")
        name = _typed(body, "lora_name", "str")
        if not name:
            raise _bad("lora_name", "required")
        try:
            engine.unload_adapter(name)
        except UnknownAdapter as exc:
            raise ApiError(404, f"lora_name: {exc}", "lora_name", "model_not_found") from exc
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    def _runtime_lora(self) -> Engine:
        engine = self._engine()
        if not engine.config.lora_enabled or not engine.config.runtime_lora_updating:
            raise ApiError(
                403,
                "loading and unloading LoRA adapters while serving is off: start the server with --enable-lora "
                "--allow-runtime-lora-updating (or VLLM_ALLOW_RUNTIME_LORA_UPDATING=true)",
            )
        return engine

    async def health(self, request: web.Request) -> web.Response:
        engine = self.holder.engine
        ready = engine is not None and engine.load().ready
        return web.Response(status=200 if ready else 503, text="" if ready else "not ready\n")

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's /tokenize: `prompt` (text) or `messages` (through the chat template) -> the token ids."""
        engine = self._engine()
        body = await _json_body(request)
        _check_body(engine, body, {"model", "prompt", "messages", "add_generation_prompt"}, "/tokenize")
        if ("prompt" in body) == ("messages" in body):
            raise ApiError(400, "prompt: give either prompt (text) or messages", "prompt")
        if "messages" in body:
            add = _typed(body, "add_generation_prompt", "bool")
            try:
                text = engine.tokenizer.apply_chat_template(
                    _messages(engine, body), add_generation_prompt=True if add is None else add
                )
            except TokenizerError as exc:
                raise _bad("messages", str(exc)) from exc
        else:
            text = _typed(body, "prompt", "str")
        ids = engine.tokenizer.encode(text or "")
        return web.json_response(
            {"count": len(ids), "max_model_len": engine.model_config.context_length, "tokens": ids}
        )

    async def detokenize(self, request: web.Request) -> web.Response:
        """vLLM's /detokenize: `tokens` (ids) -> their text."""
        engine = self._engine()
        body = await _json_body(request)
        _check_body(engine, body, {"model", "tokens"}, "/detokenize")
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
            raise _bad("tokens", "required: a list of token ids")
        _check_ids(engine, tokens, "tokens")
        return web.json_response({"prompt": engine.tokenizer.decode(tokens)})

    async def version(self, request: web.Request) -> web.Response:
        try:
            version = metadata.version("optimist")
        except metadata.PackageNotFoundError:
            version = "unknown"
        return web.json_response({"version": version})

    async def prometheus(self, request: web.Request) -> web.Response:
        if self.metrics is None:
            raise web.HTTPNotFound()
        return web.Response(body=self.metrics(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        engine = self._engine()
        call = read_call(engine, await _json_body(request, object_only=False), chat)
        response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        request_id = request.headers.get("X-Request-Id") or response_id
        reqs = make_requests(engine, call, request_id)
        streams: list[AsyncGenerator[list[Event]]] = []
        try:
            for req in reqs:
                streams.append(open_events(engine, req))
        except RequestFailed as exc:
            engine.abort([r.id for r in reqs[: len(streams)]])
            raise ApiError(_HTTP_STATUS.get(exc.code, 500), exc.message) from exc
        choices = [
            Choice(i, call, engine, call.texts[i // call.n], call.prompts[i // call.n]) for i in range(len(reqs))
        ]
        head = {"id": response_id, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": call.model}  # fmt: skip
        events = _merged(engine, streams)
        headers = {"X-Request-Id": request_id}  # what the gRPC Abort takes (with -i per choice when several)
        if call.stream:
            return await self._stream(request, call, choices, head, events, headers)
        async with contextlib.aclosing(events):
            async for i, batch in events:
                choice = choices[i]
                for ev in batch:
                    if isinstance(ev, Chunk):
                        choice.text += ev.text
                        choice.entries.extend(ev.logprobs)
                        choice.prompt_entries.extend(ev.prompt_logprobs)
                    else:
                        choice.final = ev
                        if ev.error is not None:
                            raise _failed(call, ev)
        out = []
        for c in choices:
            item: dict[str, Any] = {"index": c.index}
            if chat:
                item["message"] = c.message()
            else:
                item["text"] = c.text
            item["logprobs"] = c.logprobs([*c.prompt_scores(), *c.entries] if c.scored_prompt else c.entries)
            item.update(c.finish_fields())
            out.append(item)
        body = {**head, "choices": out, "usage": _usage(choices, call.n)}
        return web.json_response(body, dumps=_dumps, headers=headers)

    async def _stream(
        self,
        request: web.Request,
        call: Call,
        choices: list[Choice],
        head: dict[str, Any],
        events: AsyncGenerator[tuple[int, list[Event]]],
        headers: dict[str, str],
    ) -> web.StreamResponse:
        head = {**head, "object": "chat.completion.chunk" if call.chat else "text_completion"}
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                               "Cache-Control": "no-cache", **headers})  # fmt: skip
        await response.prepare(request)

        async def send(choice_items: list[dict[str, Any]], usage: Any = None) -> None:
            chunk = {**head, "choices": choice_items}
            if call.include_usage:
                chunk["usage"] = usage
            await response.write(b"data: " + _json_bytes(chunk) + b"\n\n")

        def item(c: Choice, text: str, entries: list[Any], done: bool) -> dict[str, Any]:
            out: dict[str, Any] = {"index": c.index}
            if call.chat:
                delta: dict[str, Any] = {}
                if not c.role_sent:
                    delta["role"] = "assistant"
                    c.role_sent = True
                if call.tools is not None:  # tool calls arrive whole, in the choice's last chunk
                    calls = c.tool_calls() if done else None
                    if calls is not None:
                        delta["tool_calls"] = [{"index": k, **tc} for k, tc in enumerate(calls)]
                    elif done:
                        delta["content"] = c.text  # cut short: the text is the answer
                elif text or not done:
                    delta["content"] = text
                out["delta"] = delta
            else:
                out["text"] = text
            out["logprobs"] = c.logprobs(entries)
            out.update(c.finish_fields() if done else {"finish_reason": None})
            return out

        try:
            if call.chat:  # OpenAI opens every chat choice with the role and empty content
                await send([item(c, "", [], False) for c in choices])
            elif call.echo and call.logprobs is None:
                await send([item(c, c.text, [], False) for c in choices])
            async with contextlib.aclosing(events):
                async for i, batch in events:
                    c = choices[i]
                    c.prompt_entries.extend(e for ev in batch if isinstance(ev, Chunk) for e in ev.prompt_logprobs)
                    if c.scored_prompt and not c.echoed and c.prompt_scored:  # the prompt, with its logprobs
                        c.echoed = True
                        await send([{"index": c.index, "text": c.text, "logprobs": c.logprobs(c.prompt_scores()),
                                     "finish_reason": None}])  # fmt: skip
                    text = "".join(ev.text for ev in batch if isinstance(ev, Chunk))
                    entries = [e for ev in batch if isinstance(ev, Chunk) for e in ev.logprobs]
                    final = next((ev for ev in batch if isinstance(ev, Finished)), None)
                    if final is not None and final.error is not None:
                        failed = _failed(call, final)
                        error = {"message": failed.message, "type": _ERROR_TYPE[failed.status],
                                 "param": failed.param, "code": None}  # fmt: skip
                        await response.write(b"data: " + _json_bytes({"error": error}) + b"\n\n")
                        break
                    c.final = final
                    if call.tools is not None:  # held until the calls are complete
                        c.text += text
                        c.entries.extend(entries)
                        if final is None:
                            continue
                        entries = c.entries
                    if text or entries or final is not None:
                        await send([item(c, text, entries, final is not None)])
            if call.include_usage and all(c.final is not None for c in choices):
                chunk = {**head, "choices": [], "usage": _usage(choices, call.n)}
                await response.write(b"data: " + _json_bytes(chunk) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionResetError, ConnectionError):
            log.debug("client went away during %s", head["id"])  # its requests were aborted as events closed
        return response


def _failed(call: Call, final: Finished) -> ApiError:
    """The error for a request the engine failed: its own input (400, naming the field) or a bug (500)."""
    if final.invalid:
        message = str(final.error).removeprefix("sampling.structured_output")
        return ApiError(400, f"{call.structured_param}{message}", call.structured_param)
    return ApiError(500, f"engine error: {final.error}")


async def _json_body(request: web.Request, object_only: bool = True) -> Any:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not JSON: {exc}") from exc
    if object_only and not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _authorize(request: web.Request, api_key: str | None) -> None:
    """With an API key set, the /v1 routes need `Authorization: Bearer KEY` (the probes, /metrics and /version
    stay open: kubelet, Prometheus and the endpoint picker carry no key)."""
    if api_key is None or not request.path.startswith("/v1/"):
        return
    given = request.headers.get("Authorization", "")
    scheme, _, token = given.partition(" ")
    if not given:
        raise ApiError(401, "Authorization: required (Bearer API key)", None, "invalid_api_key")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "Authorization: the API key is not valid", None, "invalid_api_key")


def _middleware(api_key: str | None) -> Any:
    @web.middleware
    async def errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
        try:
            _authorize(request, api_key)
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if exc.status == 413:
                message = f"the request body is larger than {MAX_BODY_BYTES} bytes"
            elif exc.status == 405:
                message = f"{request.method} is not allowed on {request.path}"
            elif exc.status == 404:
                message = f"no route {request.path}; routes: /v1/completions, /v1/chat/completions, /v1/models"
            else:
                message = exc.reason
            return error_response(exc.status, message)

    return errors


def make_app(service: OpenAIService) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_middleware(service.api_key)])
    app.router.add_post("/v1/completions", service.completions)
    app.router.add_post("/v1/chat/completions", service.chat_completions)
    app.router.add_get("/v1/models", service.models)
    app.router.add_get("/v1/models/{name}", service.model)
    app.router.add_post("/v1/load_lora_adapter", service.load_lora_adapter)
    app.router.add_post("/v1/unload_lora_adapter", service.unload_lora_adapter)
    app.router.add_post("/tokenize", service.tokenize)
    app.router.add_post("/detokenize", service.detokenize)
    app.router.add_get("/health", service.health)
    app.router.add_get("/version", service.version)
    app.router.add_get("/metrics", service.prometheus)
    return app


class HttpServer:
    """The app on host:port in the caller's event loop (port 0: a free one, see `.port` after start)."""

    def __init__(self, service: OpenAIService, host: str, port: int) -> None:
        self.service = service
        self.host = host
        self.requested_port = port
        self.port = 0
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        # handler_cancellation: a client that disconnects cancels its handler, whose streams abort its requests
        self.runner = web.AppRunner(make_app(self.service), handler_cancellation=True, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.requested_port)
        try:
            await site.start()
        except OSError as exc:
            await self.runner.cleanup()
            raise OSError(f"cannot listen on {self.host}:{self.requested_port} (HTTP): {exc.strerror}") from exc
        self.port = int(self.runner.addresses[0][1])

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
