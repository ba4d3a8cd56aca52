"""The OpenAI-compatible HTTP API over a real socket, driven by the real `openai` client (and raw HTTP where the
bytes matter), in front of the real default model: answers equal the gRPC API's, streaming, several prompts and
choices, logprobs, errors that name the field, disconnects that free KV blocks, loading and draining."""

from __future__ import annotations

import http.client
import importlib.util
import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlparse

import grpc
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from optimist.engine import openai_api as oa
from optimist.engine.api import engine_pb2 as pb
from optimist.engine.api import engine_pb2_grpc as pb_grpc
from optimist.engine.config import EngineConfig
from optimist.engine.engine import Engine
from optimist.engine.sampler import sample

from ..conftest import LoadingServer, ServerThread, serving

openai = pytest.importorskip("openai")  # a test extra (the GPU machine's environment may lack it)
FRANCE = "The capital of France is"
COUNT = "One, two, three, four,"
TEXT_PART = {"type": "text", "text": "of France?"}
USER_X = [{"role": "user", "content": "x"}]


@pytest.fixture(scope="module")
def api(engine: Engine) -> Iterator[ServerThread]:
    srv = serving(engine, http=True)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(api: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.http_url}/v1", api_key="unused", max_retries=0, timeout=300)


def grpc_answer(api: ServerThread, request: pb.GenerateRequest) -> tuple[str, pb.Final]:
    text, final = "", None
    with grpc.insecure_channel(api.address) as channel:
        for msg in pb_grpc.EngineStub(channel).Generate(request, timeout=300):
            if msg.HasField("chunk"):
                text += msg.chunk.text
            else:
                final = msg.final
    assert final is not None
    return text, final


def post(
    url: str, path: str, body: Any, method: str = "POST", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """Raw HTTP: (status, the body decoded when it is JSON, else {})."""
    parts = urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = {"Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body=data if method == "POST" else None, headers=sent)
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    is_json = resp.getheader("Content-Type", "").startswith("application/json")
    return resp.status, json.loads(payload) if is_json else {}


def wait_idle(engine: Engine, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        load = engine.load()
        if load.running == 0 and load.waiting == 0 and load.kv_blocks_used == 0:
            return
        assert time.monotonic() < deadline, f"engine still busy: {load.running} running, {load.kv_blocks_used} blocks"
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------ answers


def test_models_lists_the_served_model(client: openai.OpenAI, engine: Engine) -> None:
    assert [m.id for m in client.models.list()] == [engine.model_name]
    assert client.models.retrieve(engine.model_name).id == engine.model_name
    with pytest.raises(openai.NotFoundError, match="this server serves"):
        client.models.retrieve("gpt-4o")


def test_completion_equals_the_grpc_answer(client: openai.OpenAI, api: ServerThread, engine: Engine) -> None:
    out = client.completions.create(model=engine.model_name, prompt=FRANCE, max_tokens=8, temperature=0)
    greedy = pb.SamplingParams(temperature=0, max_tokens=8)
    text, final = grpc_answer(api, pb.GenerateRequest(text=FRANCE, sampling=greedy))
    assert out.choices[0].text == text and "Paris" in text
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (final.usage.prompt_tokens, 8)
    assert out.usage.total_tokens == final.usage.prompt_tokens + 8
    assert out.id.startswith("cmpl-") and out.object == "text_completion" and out.model == engine.model_name
    ids = engine.tokenizer.encode(FRANCE)
    by_ids = client.completions.create(model=engine.model_name, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == text
    echoed = client.completions.create(model=engine.model_name, prompt=FRANCE, max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == FRANCE + text


def test_chat_completion_equals_the_grpc_chat_answer(client: openai.OpenAI, api: ServerThread, engine: Engine) -> None:
    question = "What is the capital of France?"
    out = client.chat.completions.create(
        model=engine.model_name, messages=[{"role": "user", "content": question}], temperature=0
    )
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=question)])
    # no max_tokens: a chat answer runs to its end (up to the context), as OpenAI's does
    greedy = pb.SamplingParams(temperature=0, max_tokens=4000)
    text, final = grpc_answer(api, pb.GenerateRequest(chat=chat, sampling=greedy))
    message = out.choices[0].message
    assert message.role == "assistant" and message.content == text and "Paris" in text
    assert out.choices[0].finish_reason == "stop" and final.finish_reason == pb.FINISH_REASON_EOS
    assert out.usage is not None and out.usage.prompt_tokens == final.usage.prompt_tokens
    assert out.usage.completion_tokens == final.usage.completion_tokens
    # text parts and the newer "developer" role read as plain content and "system"
    parts = client.chat.completions.create(
        model=engine.model_name,
        messages=[
            {"role": "developer", "content": "You are a helpful assistant."},
            {"role": "user", "content": [{"type": "text", "text": "What is the capital "}, TEXT_PART]},
        ],
        temperature=0,
        max_completion_tokens=12,
    )
    plain = client.chat.completions.create(
        model=engine.model_name,
        messages=[{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": question}],
        temperature=0,
        max_tokens=12,
    )
    assert parts.choices[0].message.content == plain.choices[0].message.content


def test_chat_stream_adds_up_to_the_whole_answer(client: openai.OpenAI, engine: Engine) -> None:
    messages: Any = [{"role": "user", "content": "Name three rivers."}]
    whole = client.chat.completions.create(model=engine.model_name, messages=messages, temperature=0, max_tokens=24)
    chunks = list(
        client.chat.completions.create(
            model=engine.model_name,
            messages=messages,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    body = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in body) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason] == ["length"]
    assert body[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and whole.usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_several_prompts_and_n_give_prompt_major_choices(client: openai.OpenAI, engine: Engine) -> None:
    one = [
        client.completions.create(model=engine.model_name, prompt=p, max_tokens=6, temperature=0).choices[0].text
        for p in (FRANCE, COUNT)
    ]
    out = client.completions.create(model=engine.model_name, prompt=[FRANCE, COUNT], n=2, max_tokens=6, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [one[0], one[0], one[1], one[1]]
    assert out.usage is not None
    prompt_tokens = len(engine.tokenizer.encode(FRANCE)) + len(engine.tokenizer.encode(COUNT))
    assert out.usage.prompt_tokens == prompt_tokens  # each prompt counted once, not once per choice
    assert out.usage.completion_tokens == 4 * 6
    streamed: dict[int, str] = {}
    finished: dict[int, str] = {}
    for chunk in client.completions.create(
        model=engine.model_name, prompt=[FRANCE, COUNT], n=2, max_tokens=6, temperature=0, stream=True
    ):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
            if c.finish_reason:
                finished[c.index] = c.finish_reason
    assert streamed == {i: c.text for i, c in enumerate(out.choices)}
    assert finished == dict.fromkeys(range(4), "length")


def test_seeded_choices_are_reproducible_and_differ(client: openai.OpenAI, engine: Engine) -> None:
    def texts(n: int) -> list[str]:
        out = client.completions.create(
            model=engine.model_name, prompt="Once upon a time", n=n, max_tokens=12, temperature=1.0, seed=7
        )
        return [c.text for c in out.choices]

    first = texts(3)
    assert texts(3) == first
    assert first[0] == texts(1)[0]  # choice i samples with seed + i
    assert len(set(first)) > 1


def test_stop_strings_end_the_answer_and_are_reported(client: openai.OpenAI, engine: Engine) -> None:
    free = client.completions.create(model=engine.model_name, prompt=COUNT, max_tokens=8, temperature=0)
    assert "," in free.choices[0].text
    out = client.completions.create(model=engine.model_name, prompt=COUNT, max_tokens=8, temperature=0, stop=[","])
    choice = out.choices[0]
    assert choice.text == free.choices[0].text.split(",")[0]
    assert choice.finish_reason == "stop"
    assert choice.model_extra is not None and choice.model_extra.get("stop_reason") == ","


def test_logprobs_in_both_forms(client: openai.OpenAI, engine: Engine) -> None:
    out = client.completions.create(model=engine.model_name, prompt=FRANCE, max_tokens=5, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.tokens) == 5 and "".join(lp.tokens) == out.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 3 <= len(top) <= 4 and logprob <= 0
        assert top[token] == pytest.approx(max(top.values()))  # greedy: the chosen token is the most likely
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]

    chat = client.chat.completions.create(
        model=engine.model_name,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs
    assert content is not None and content.content is not None and len(content.content) == 6
    assert bytes(b for e in content.content for b in (e.bytes or [])).decode() == chat.choices[0].message.content
    for entry in content.content:
        assert len(entry.top_logprobs) == 2 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
    plain = client.chat.completions.create(
        model=engine.model_name, messages=[{"role": "user", "content": "Say hello."}], max_tokens=6, temperature=0
    )
    assert plain.choices[0].logprobs is None


# -------------------------------------------------------------------------------------- structured outputs

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
PERSON_QUESTION = [{"role": "user", "content": "Return a JSON object with a person's name and age."}]
needs_llguidance = pytest.mark.skipif(
    importlib.util.find_spec("llguidance") is None, reason="structured outputs need llguidance (a dependency)"
)


@needs_llguidance
def test_response_format_json_schema_and_json_object(client: openai.OpenAI, engine: Engine) -> None:
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    out = client.chat.completions.create(
        model=engine.model_name,
        messages=PERSON_QUESTION,
        temperature=0,
        max_tokens=60,
        response_format=fmt,  # type: ignore[arg-type]
    )
    text = out.choices[0].message.content
    assert text is not None and out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), PERSON)
    streamed = client.chat.completions.create(
        model=engine.model_name, messages=PERSON_QUESTION, temperature=0, max_tokens=60, response_format=fmt,  # type: ignore[arg-type]
        stream=True,
    )  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text
    obj = client.chat.completions.create(
        model=engine.model_name, messages=PERSON_QUESTION, temperature=0, max_tokens=60,
        response_format={"type": "json_object"},
    )  # fmt: skip
    assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)


@needs_llguidance
def test_the_openai_client_parses_a_pydantic_model(client: openai.OpenAI, engine: Engine) -> None:
    """`client.chat.completions.parse(response_format=Model)`: the client sends the model's strict JSON Schema and
    parses the answer back into the model."""
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    out = client.chat.completions.parse(
        model=engine.model_name,
        messages=PERSON_QUESTION,
        temperature=0,
        max_tokens=60,
        response_format=Person,  # type: ignore[arg-type]
    )
    person = out.choices[0].message.parsed
    assert isinstance(person, Person) and person.name and person.age >= 0


@needs_llguidance
def test_vllm_structured_outputs_and_guided_fields(client: openai.OpenAI, engine: Engine) -> None:
    def complete(extra: dict[str, Any], prompt: str = "The capital of France is") -> str:
        out = client.completions.create(
            model=engine.model_name, prompt=prompt, temperature=0, max_tokens=20, extra_body=extra
        )
        return out.choices[0].text

    assert complete({"structured_outputs": {"choice": [" Paris", " Lyon", " Rome"]}}) == " Paris"
    assert complete({"guided_choice": [" Lyon", " Rome"]}) in (" Lyon", " Rome")
    assert re.fullmatch(r" [A-Z][a-z]+\.", complete({"structured_outputs": {"regex": r" [A-Z][a-z]+\."}}))
    assert re.fullmatch(r"[0-9]+", complete({"guided_regex": "[0-9]+"}, "2 + 2 ="))
    grammar = 'start: " " ("yes" | "no")'
    assert complete({"structured_outputs": {"grammar": grammar}}, "Is Paris in France? Answer:") in (" yes", " no")
    text = complete({"guided_json": PERSON}, "A person as JSON:")
    assert set(json.loads(text)) == {"name", "age"}
    compact = complete({"structured_outputs": {"json": PERSON, "disable_any_whitespace": True}}, "A person as JSON:")
    assert json.loads(compact) and compact == json.dumps(json.loads(compact), separators=(",", ":"))


# ------------------------------------------------------------------------------------------------ tool calls

WEATHER_QUESTION = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@needs_llguidance
def test_a_named_tool_choice_returns_a_call_of_that_function(client: openai.OpenAI, engine: Engine) -> None:
    import jsonschema

    named = {"type": "function", "function": {"name": "get_weather"}}
    out = client.chat.completions.create(
        model=engine.model_name, messages=WEATHER_QUESTION, temperature=0, max_tokens=60,
        tools=[WEATHER, TIME], tool_choice=named,  # type: ignore[list-item,arg-type]
    )  # fmt: skip
    message = out.choices[0].message
    assert message.content is None and message.tool_calls is not None and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])  # type: ignore[index]
    assert out.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model=engine.model_name, messages=WEATHER_QUESTION, temperature=0, max_tokens=60,
        tools=[WEATHER, TIME], tool_choice=named, stream=True,  # type: ignore[list-item,arg-type]
    )  # fmt: skip
    chunks = list(streamed)
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, d.function.arguments) for d in deltas if d.function] == [
        ("get_weather", call.function.arguments)
    ]
    assert not any(c.choices[0].delta.content for c in chunks)


@needs_llguidance
def test_required_tool_choice_returns_calls_of_the_tools(client: openai.OpenAI, engine: Engine) -> None:
    import jsonschema

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}  # type: ignore[index]
    for parallel in (True, False):
        out = client.chat.completions.create(
            model=engine.model_name, messages=WEATHER_QUESTION, temperature=0, max_tokens=120,
            tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=parallel,  # type: ignore[list-item]
        )  # fmt: skip
        calls = out.choices[0].message.tool_calls
        assert calls and out.choices[0].finish_reason == "tool_calls"
        assert parallel or len(calls) == 1
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        assert len({c.id for c in calls}) == len(calls)


@needs_llguidance
def test_a_conversation_goes_on_after_a_tool_result(client: openai.OpenAI, engine: Engine) -> None:
    """The call and its result go back as the next turn's messages; with tool_choice none the answer is text."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = client.chat.completions.create(
        model=engine.model_name, messages=WEATHER_QUESTION, temperature=0, max_tokens=60,
        tools=[WEATHER], tool_choice=named,  # type: ignore[list-item,arg-type]
    )  # fmt: skip
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    messages = [
        *WEATHER_QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})},
    ]
    out = client.chat.completions.create(
        model=engine.model_name, messages=messages, temperature=0, max_tokens=30,  # type: ignore[arg-type]
        tools=[WEATHER], tool_choice="none",  # type: ignore[list-item]
    )  # fmt: skip
    assert out.choices[0].message.content and out.choices[0].message.tool_calls is None


def test_chat_templates_receive_the_tools(engine: Engine) -> None:
    """A template that shows tools to its model (as Qwen2.5's and Llama 3.1's do) gets OpenAI's tool objects."""
    import dataclasses

    template = (
        "{% if tools %}tools:{% for t in tools %} {{ t.function.name }}"
        "({{ t.function.parameters.required | join(',') }}){% endfor %}|{% endif %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}"
        "{% for c in m.tool_calls or [] %} -> {{ c.function.name }} {{ c.function.arguments.city }}{% endfor %}|"
        "{% endfor %}"
    )
    tok = dataclasses.replace(engine.tokenizer, chat_template=template, _template=None)
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    text = tok.apply_chat_template(
        [*WEATHER_QUESTION, {"role": "assistant", "content": "", "tool_calls": [call]}],
        add_generation_prompt=False,
        tools=[WEATHER, TIME],
    )
    assert text.startswith("tools: get_weather(city,unit) get_time(timezone)|user: ")
    assert "|assistant:  -> get_weather Paris|" in text
    assert "tools" not in tok.apply_chat_template(WEATHER_QUESTION, add_generation_prompt=False)


# ------------------------------------------------------------------------------------------------- errors


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 40}},
                       "required": ["timezone"], "additionalProperties": False},
    },
}  # fmt: skip
BAD = [
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "top_p": 2}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "seed": 2**70}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "n": 65}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "frobnicate": True}, 400, "frobnicate"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": "x", "stop": [1, 2]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "output_length_hint": {"lower": 9, "upper": 3}}, 400, "output_length_hint"),
    ("/v1/completions", {"prompt": "x", "output_length_hint": {"lower": 0}}, 400, "output_length_hint.lower"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 99999999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "word " * 9000}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4o"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages[0].content[0]",
    ),
    ("/v1/chat/completions", {"messages": USER_X, "tools": [{"type": "function"}]}, 400, "tools[0]"),
    ("/v1/chat/completions", {"messages": USER_X, "tools": [WEATHER]}, 400, "tool_choice"),  # auto: no parser
    ("/v1/chat/completions", {"messages": USER_X, "tool_choice": "required"}, 400, "tool_choice"),
    (
        "/v1/chat/completions",
        {"messages": USER_X, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
        400,
        "tool_choice.function.name",
    ),
    (
        "/v1/chat/completions",
        {"messages": USER_X, "tools": [WEATHER, WEATHER], "tool_choice": "required"},
        400,
        "tools[1].function.name",
    ),
    (
        "/v1/chat/completions",
        {"messages": USER_X, "tools": [{"type": "function", "function": {"name": "a b"}}], "tool_choice": "required"},
        400,
        "tools[0].function.name",
    ),
    (
        "/v1/chat/completions",
        {
            "messages": USER_X,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
            "tool_choice": "required",
        },
        400,
        "tools",
    ),
    (
        "/v1/chat/completions",
        {
            "messages": USER_X,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
        },
        400,
        "tools[0].function.parameters",
    ),
    (
        "/v1/chat/completions",
        {"messages": USER_X, "tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
        400,
        "response_format",
    ),
    ("/v1/chat/completions", {"messages": USER_X, "functions": [{"name": "f"}]}, 400, "functions"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x", "tool_calls": []}], "tools": [WEATHER], "tool_choice": "none"},
        200,
        "",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]}]},
        400,
        "messages[0].tool_calls[0]",
    ),
    ("/v1/chat/completions", {"messages": USER_X, "response_format": {"type": "xml"}}, 400, "response_format.type"),
    (
        "/v1/chat/completions",
        {"messages": USER_X, "response_format": {"type": "json_schema"}},
        400,
        "response_format.json_schema",
    ),
    (
        "/v1/chat/completions",
        {
            "messages": USER_X,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
        },
        400,
        "response_format.json_schema.schema",
    ),
    (
        "/v1/chat/completions",
        {"messages": USER_X, "response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a+"}},
        400,
        "structured_outputs.regex",
    ),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "a(b"}}, 400, "structured_outputs.regex"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"yaml": "a"}}, 400, "structured_outputs.yaml"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"choice": "a"}}, 400, "structured_outputs.choice"),
    ("/v1/completions", {"prompt": "x", "guided_json": "{oops"}, 400, "guided_json"),
    (
        "/v1/completions",
        {"prompt": "x", "structured_outputs": {"regex": "a", "disable_any_whitespace": True}},
        400,
        "structured_outputs.whitespace_pattern",
    ),
    (
        "/v1/completions",
        {"prompt": "x", "structured_outputs": {"json_object": True, "whitespace_pattern": 3}},
        400,
        "structured_outputs.whitespace_pattern",
    ),
    ("/v1/completions", {"prompt": "x", "guided_grammar": "start: missing"}, 400, "guided_grammar"),
    ("/v1/chat/completions", {"messages": USER_X, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": USER_X, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": USER_X, "echo": True}, 400, "echo"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD, ids=[f"{b[0]}:{b[3]}" for b in BAD])
def test_bad_requests_get_an_error_naming_the_field(
    api: ServerThread, path: str, body: dict[str, Any], status: int, param: str
) -> None:
    code, reply = post(api.http_url, path, {**body, "max_tokens": body.get("max_tokens", 4)})
    assert code == status, reply
    if status == 200:  # a near miss that is fine
        return
    error = reply["error"]
    assert error["message"].startswith(f"{param}: ") or error["message"].startswith(f"{param}["), error
    assert error["param"] == param.split("[")[0].split(".")[0] or error["param"] == param
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_malformed_http_gets_json_errors_and_good_requests_still_work(api: ServerThread, engine: Engine) -> None:
    code, reply = post(api.http_url, "/v1/completions", b"{not json")
    assert code == 400 and reply["error"]["message"].startswith("the request body is not JSON")
    code, reply = post(api.http_url, "/v1/completions", [1, 2])
    assert code == 400 and "JSON object" in reply["error"]["message"]
    code, reply = post(api.http_url, "/v1/completions", {}, method="GET")
    assert code == 405 and "GET is not allowed on /v1/completions" in reply["error"]["message"]
    code, reply = post(api.http_url, "/v2/everything", {})
    assert code == 404 and "/v1/chat/completions" in reply["error"]["message"]
    code, reply = post(api.http_url, "/v1/completions", {"prompt": FRANCE, "max_tokens": 3, "temperature": 0})
    assert code == 200 and reply["usage"]["completion_tokens"] == 3
    # JSON numbers have no bounds: a top_k past the vocabulary means all of it, not an overflow in the sampler
    code, reply = post(api.http_url, "/v1/completions", {"prompt": FRANCE, "max_tokens": 3, "top_k": 10**30})
    assert code == 200 and reply["usage"]["completion_tokens"] == 3
    wait_idle(engine)


# ------------------------------------------------------------------------------------ life cycle and load


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_frees_its_kv_blocks(api: ServerThread, engine: Engine, stream: bool) -> None:
    parts = urlparse(api.http_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    body = {"prompt": FRANCE, "max_tokens": 3000, "ignore_eos": True, "temperature": 0, "stream": stream}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    if stream:
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: {")
    else:
        deadline = time.monotonic() + 60
        while engine.load().running == 0:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.02)
    assert engine.load().kv_blocks_used > 0
    conn.sock.close()  # type: ignore[union-attr]
    conn.close()
    wait_idle(engine)  # aborted: 3,000 tokens would take minutes


def test_concurrent_streams_finish_while_another_client_drops(client: openai.OpenAI, api: ServerThread,
                                                              engine: Engine) -> None:  # fmt: skip
    prompts = [f"Write a list of {k} fruits:" for k in range(2, 10)]

    def stream(prompt: str) -> tuple[str, str | None, int]:
        text, reason, usage = "", None, 0
        for chunk in client.completions.create(
            model=engine.model_name, prompt=prompt, max_tokens=24, temperature=0.7, seed=1, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        ):  # fmt: skip
            for c in chunk.choices:
                text += c.text
                reason = c.finish_reason or reason
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
        return text, reason, usage

    parts = urlparse(api.http_url)
    dropper = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    body = {"prompt": FRANCE, "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(stream, p) for p in prompts]
        dropper.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = dropper.getresponse()
        assert resp.readline().startswith(b"data: {")
        resp.close()
        dropper.close()  # the client goes away mid-stream
        results = [f.result(timeout=300) for f in futures]
    assert all(reason == "length" and usage == 24 and text for text, reason, usage in results)
    wait_idle(engine)


def test_the_request_id_header_lets_grpc_abort_an_http_request(api: ServerThread, engine: Engine) -> None:
    parts = urlparse(api.http_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    body = {"prompt": FRANCE, "max_tokens": 3000, "ignore_eos": True, "stream": True}
    headers = {"Content-Type": "application/json", "X-Request-Id": "http-abort-1"}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers=headers)
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("X-Request-Id") == "http-abort-1"
    assert resp.readline().startswith(b"data: {")
    with grpc.insecure_channel(api.address) as channel:
        aborted = pb_grpc.EngineStub(channel).Abort(pb.AbortRequest(request_ids=["http-abort-1"]))
    assert list(aborted.aborted) == ["http-abort-1"]
    chunks = [json.loads(line[6:]) for line in resp if line.startswith(b"data: {")]
    assert chunks[-1]["choices"][0]["finish_reason"] == "abort"
    conn.close()
    wait_idle(engine)


def test_metrics_and_health_on_the_http_port(api: ServerThread, engine: Engine) -> None:
    parts = urlparse(api.http_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    text = resp.read().decode()
    assert resp.status == 200 and resp.getheader("Content-Type", "").startswith("text/plain")
    # the series the Gateway API Inference Extension's endpoint picker scrapes on the port it routes to
    wanted = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")
    for series in (*wanted, "optimist_lower_bound_kv_demand_ratio"):
        assert f"{series}{{" in text
    assert f'model_name="{engine.model_name}"' in text
    # the picker's model-server protocol also needs the LoRA info series (none here) and reads the cache layout
    lora = re.search(r"^vllm:lora_requests_info\{(.*)\} (\S+)$", text, re.M)
    assert lora is not None and 'max_lora="0"' in lora[1] and 'running_lora_adapters=""' in lora[1]
    assert abs(float(lora[2]) - time.time()) < 60  # a timestamp, as vLLM's
    cache = re.search(r"^vllm:cache_config_info\{(.*)\} 1.0$", text, re.M)
    blocks = engine.num_kv_blocks
    assert cache is not None and 'block_size="16"' in cache[1] and f'num_gpu_blocks="{blocks}"' in cache[1]
    conn.request("GET", "/health")
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200
    conn.request("GET", "/version")
    resp = conn.getresponse()
    assert resp.status == 200 and "version" in json.loads(resp.read())
    conn.close()


def test_loading_server_answers_503_until_ready(engine: Engine) -> None:
    srv = LoadingServer(engine, http=True)
    try:
        code, reply = post(srv.http_url, "/v1/completions", {"prompt": "x"})
        assert code == 503 and reply["error"]["message"] == "the model is still loading"
        assert post(srv.http_url, "/health", None, method="GET")[0] == 503
        srv.finish_loading()
        assert post(srv.http_url, "/health", None, method="GET")[0] == 200
    finally:
        srv.release.set()
        srv.thread.stop()


def test_a_draining_engine_refuses_new_work_with_503(tiny_gguf: Any) -> None:
    eng = Engine(EngineConfig(model=tiny_gguf, kv_cache_tokens=512))
    srv = ServerThread(eng.config, engine_factory=lambda: eng, http=True)
    try:
        srv.call(srv.server.load())
        code, reply = post(srv.http_url, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 3})
        assert code == 200 and reply["usage"]["completion_tokens"] == 3
        eng.drain(1.0)
        code, reply = post(srv.http_url, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 3})
        assert code == 503 and "draining" in reply["error"]["message"]
        assert post(srv.http_url, "/health", None, method="GET")[0] == 503
    finally:
        srv.stop()
        eng.shutdown()


def test_an_api_key_guards_the_v1_routes_only(tiny_gguf: Any) -> None:
    eng = Engine(EngineConfig(model=tiny_gguf, kv_cache_tokens=512))
    srv = ServerThread(eng.config, engine_factory=lambda: eng, http=True, api_key="s3cret-key")
    try:
        srv.call(srv.server.load())
        body = {"prompt": [5, 6, 7], "max_tokens": 3}
        code, reply = post(srv.http_url, "/v1/completions", body)
        assert code == 401 and reply["error"]["code"] == "invalid_api_key"
        assert reply["error"]["message"].startswith("Authorization: required")
        for wrong in ("Bearer nope", "Basic s3cret-key", "s3cret-key"):
            code, reply = post(srv.http_url, "/v1/completions", body, headers={"Authorization": wrong})
            assert code == 401 and reply["error"]["message"] == "Authorization: the API key is not valid", wrong
        assert post(srv.http_url, "/v1/models", None, method="GET")[0] == 401
        keyed = openai.OpenAI(base_url=f"{srv.http_url}/v1", api_key="s3cret-key", max_retries=0)
        assert (
            keyed.completions.create(model=eng.model_name, prompt=[5, 6, 7], max_tokens=3).usage.completion_tokens == 3
        )
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{srv.http_url}/v1", api_key="other", max_retries=0).models.list()
        for path in ("/health", "/metrics", "/version"):  # probes and scrapers carry no key
            assert post(srv.http_url, path, None, method="GET")[0] == 200, path
    finally:
        srv.stop()
        eng.shutdown()


# ------------------------------------------------------------------------------------------- fuzzing the reader

_EDGES = st.sampled_from([0, -1, 1, 20, 21, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30, 1e308, -1e308, 1e-300])
_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | _EDGES
    | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
_FIELDS = sorted(oa._CHAT_FIELDS | oa._COMPLETION_FIELDS | {"bogus"})


_SCALARS = (
    st.none() | st.booleans() | _EDGES | st.integers(-3, 40) | st.floats(-3, 3) | st.floats(allow_nan=True)
    | st.text(max_size=6) | st.lists(st.integers(-2, 60000), max_size=3) | st.lists(st.text(max_size=3), max_size=3)
)  # fmt: skip
_COMMON_TUNABLE = sorted(oa._COMMON - {"model", "stream", "logit_bias"})


def _good_with(base: dict[str, Any], fields: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """A good request with a few fields set to anything (mostly of the right kind, often at edges)."""
    return st.builds(lambda extra: {**base, **extra}, st.dictionaries(st.sampled_from(fields), _SCALARS, max_size=3))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.dictionaries(st.sampled_from(_FIELDS), _VALUES, max_size=6)  # anything at all
    | _good_with({"prompt": "Hello"}, [*_COMMON_TUNABLE, "echo", "best_of"])
    | _good_with({"prompt": [[1, 2], [3]]}, [*_COMMON_TUNABLE, "echo"])
    | _good_with(
        {"messages": [{"role": "user", "content": "Hi"}]}, [*_COMMON_TUNABLE, "top_logprobs", "max_completion_tokens"]
    ),
)
def test_any_json_body_is_answered_or_refused_by_name(engine: Engine, body: dict[str, Any]) -> None:
    """Whatever JSON arrives, reading it either makes engine requests that the sampler takes, or raises ApiError (a
    4xx naming a field): never another exception, which would be a 500 or, in the sampler, a failed engine step."""
    chat = "messages" in body
    try:
        call = oa.read_call(engine, body, chat)
        reqs = oa.make_requests(engine, call, "fuzz")
    except oa.ApiError as exc:
        assert 400 <= exc.status < 500 and exc.message
        event(f"refused: {exc.param}")
        return
    event("accepted")
    assert len(reqs) == len(call.prompts) * call.n >= 1
    logits = torch.randn(len(reqs), engine.model_config.vocab_size)
    result = sample(logits, reqs, engine.tokenizer.eos_ids)
    assert all(0 <= t < engine.model_config.vocab_size for t in result.token_ids)


def test_tokenize_and_detokenize_round_trip(api: ServerThread, engine: Engine) -> None:
    code, reply = post(api.http_url, "/tokenize", {"prompt": FRANCE})
    ids = engine.tokenizer.encode(FRANCE)
    assert code == 200 and reply == {"count": len(ids), "max_model_len": 8192, "tokens": ids}
    code, back = post(api.http_url, "/detokenize", {"tokens": reply["tokens"], "model": engine.model_name})
    assert code == 200 and back == {"prompt": FRANCE}
    messages = [{"role": "user", "content": "Hi"}]
    code, chat = post(api.http_url, "/tokenize", {"messages": messages})
    templated = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert code == 200 and chat["tokens"] == engine.tokenizer.encode(templated)
    for path, body, param in [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "x", "messages": messages}, "prompt"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"prompt": "x", "model": "gpt-4o"}, "model"),
        ("/tokenize", {"text": "x"}, "text"),
        ("/detokenize", {"tokens": [1, 10**9]}, "tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
    ]:
        code, reply = post(api.http_url, path, body)
        assert 400 <= code < 500 and reply["error"]["message"].startswith(f"{param}:"), (path, body, reply)
