"""Structured outputs in the engine, on the real default model (and the tiny one where memory pressure is the point):
every kind of constraint yields a text of its language, jump-forward changes the steps and not the answer, other
requests in the batch are untouched, preemption, limits (max_tokens, stop strings, min_tokens, ignore_eos),
logprobs, bad constraints named, and a matcher failing mid-way ending only its own request."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from optimist.engine.config import EngineConfig
from optimist.engine.engine import Engine
from optimist.engine.outputs import Chunk, Event, Finished
from optimist.engine.request import FinishReason, InvalidRequest, SamplingParams, StructuredOutput
from optimist.engine.speculative import SpeculativeConfig
from optimist.engine.structured import blocked_tokens

from ..conftest import events_concurrently, events_of, run_concurrently

pytest.importorskip("llguidance")  # a dependency; the GPU machine's environment has it only when .whl carries it

PERSON = {
    "type": "object",
    "properties": {
        "full_name_of_the_person": {"type": "string", "maxLength": 40},
        "age_in_years": {"type": "integer", "minimum": 0, "maximum": 120},
        "city_of_residence": {"type": "string", "maxLength": 40},
        "is_married": {"type": "boolean"},
    },
    "required": ["full_name_of_the_person", "age_in_years", "city_of_residence", "is_married"],
    "additionalProperties": False,
}


CAPITAL_AS_JSON = 'Give the capital of France as a JSON object with the key "capital".'


def chat(engine: Engine, question: str) -> list[int]:
    return engine.tokenizer.encode(engine.tokenizer.apply_chat_template([{"role": "user", "content": question}]))


def run(engine: Engine, ids: list[int], **params: Any) -> tuple[list[int], str, Finished]:
    return engine.generate(engine.new_request(ids, SamplingParams(**params)))


def json_params(schema: dict[str, Any] = PERSON, **extra: Any) -> dict[str, Any]:
    return {
        "temperature": 0,
        "max_tokens": 120,
        "structured_output": StructuredOutput("json_schema", json.dumps(schema)),
        **extra,
    }


@pytest.fixture()
def jump_forward(engine: Engine) -> Any:
    """Switches jump-forward for one test and back (speculative drafts off meanwhile: they too save steps)."""
    before = engine.jump_forward, engine.speculative
    engine.speculative = SpeculativeConfig(tokens=0)

    def switch(on: bool) -> None:
        engine.jump_forward = on

    yield switch
    engine.jump_forward, engine.speculative = before


# ------------------------------------------------------------------------------------------- the languages


def test_a_json_schema_answer_is_valid_json_of_that_schema(engine: Engine) -> None:
    ids = chat(engine, "Describe a person living in France as JSON.")
    out, text, final = run(engine, ids, **json_params())
    jsonschema.validate(json.loads(text), PERSON)
    assert final.reason is FinishReason.EOS and final.completion_tokens == len(out)
    _, free_text, _ = run(engine, ids, temperature=0, max_tokens=120)
    with pytest.raises(ValueError):  # unconstrained, the model answers in prose: the constraint did the work
        json.loads(free_text)


def test_json_object_choice_regex_and_grammars(engine: Engine) -> None:
    _, text, final = run(engine, chat(engine, CAPITAL_AS_JSON), temperature=0, max_tokens=60,
                         structured_output=StructuredOutput("json_object"))  # fmt: skip
    assert json.loads(text) == {"capital": "Paris"} and final.reason is FinishReason.EOS
    ids = chat(engine, "What is the capital of France? Answer with a phone number too.")
    cases = [
        (StructuredOutput.choices(["Paris", "London", "Berlin"]), lambda t: t in ("Paris", "London", "Berlin")),
        (StructuredOutput("regex", r"\d{3}-\d{4}"), lambda t: re.fullmatch(r"\d{3}-\d{4}", t)),
        (StructuredOutput("grammar", 'start: "yes" | "no" | "maybe " NUMBER\nNUMBER: /[0-9]+/'),
         lambda t: re.fullmatch(r"yes|no|maybe [0-9]+", t)),
        (StructuredOutput("grammar", 'root ::= "The answer is " ("Paris" | "Lyon") "."'),  # GBNF, as llama.cpp's
         lambda t: t in ("The answer is Paris.", "The answer is Lyon.")),
    ]  # fmt: skip
    for constraint, holds in cases:
        _, text, final = run(engine, ids, temperature=0, max_tokens=60, structured_output=constraint)
        assert holds(text), (constraint.kind, text)
        assert final.reason is FinishReason.EOS, (constraint.kind, final.reason)
    one_word = chat(engine, "What is the capital of France? Answer in one word.")
    paris_london = StructuredOutput.choices(["London", "Paris"])
    _, text, _ = run(engine, one_word, temperature=0, max_tokens=8, structured_output=paris_london)
    assert text == "Paris"  # the model's own preference among the choices (as its free answer says)


def test_sampled_answers_stay_in_the_language(engine: Engine) -> None:
    ids = chat(engine, "Describe a person as JSON.")
    for seed in range(3):
        _, text, _ = run(engine, ids, **json_params(temperature=1.0, seed=seed, top_p=0.95))
        jsonschema.validate(json.loads(text), PERSON)


def test_jump_forward_takes_fewer_steps_for_the_same_answer(engine: Engine, jump_forward: Any) -> None:
    """The keys of the schema are forced: appended without a step each, computed together in the next one."""
    ids = chat(engine, "Describe a person living in France as JSON.")
    answers, steps = {}, {}
    for on in (False, True):
        jump_forward(on)
        before = engine.load().stats.steps
        answers[on] = run(engine, ids, **json_params())
        steps[on] = engine.load().stats.steps - before
    assert answers[True][1] == answers[False][1]
    assert answers[True][0] == answers[False][0]  # and the same tokens
    assert steps[True] < 0.75 * steps[False], steps
    assert steps[False] == len(answers[False][0])  # one step per token without it


def test_forced_tokens_run_as_decode_rows_in_c(int4_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU's int4 engine the forced tokens of a step are computed as decode rows of the all-C decoder (one
    row per position; before, the chunk took the per-layer prefill path), with the same answer as without."""
    decoder = int4_engine.model.native_decoder
    assert decoder is not None
    rows: list[int] = []  # rows of each C decode call
    real = decoder.run

    def run_counting(x: torch.Tensor, *rest: Any) -> torch.Tensor:
        rows.append(x.shape[0])
        return real(x, *rest)

    monkeypatch.setattr(decoder, "run", run_counting)
    ids = chat(int4_engine, "Describe a person living in France as JSON.")
    before = int4_engine.jump_forward, int4_engine.speculative
    int4_engine.speculative = SpeculativeConfig(tokens=0)  # (drafts would add rows of their own)
    try:
        int4_engine.jump_forward = False
        plain = run(int4_engine, ids, **json_params())
        calls = len(rows)
        int4_engine.jump_forward = True
        forced = run(int4_engine, ids, **json_params())
    finally:
        int4_engine.jump_forward, int4_engine.speculative = before
    assert forced[0] == plain[0]
    assert set(rows[:calls]) == {1}  # one request: one row a step
    assert max(rows[calls:]) > 3  # a key's forced tokens in one C call
    assert len(rows) - calls < 0.75 * calls  # and fewer steps, every one of them in C


def test_a_forced_completion_ends_the_request_without_another_step(engine: Engine) -> None:
    """Once the choice's first token is sampled, the rest is forced and the language complete: one step."""
    ids = chat(engine, "Say something.")
    before = engine.load().stats.steps
    out, text, final = run(
        engine, ids, temperature=0, max_tokens=20, structured_output=StructuredOutput.choices(["internationalization"])
    )
    assert text == "internationalization" and final.reason is FinishReason.EOS
    assert engine.load().stats.steps - before == 1 and len(out) > 1


# ------------------------------------------------------------------------------------------- with others


def test_constrained_and_free_requests_share_steps_without_leaking(engine: Engine) -> None:
    prompts = [chat(engine, q) for q in ("Describe a person as JSON.", "Name three rivers.", "Count to five.")]
    constraint = {"structured_output": StructuredOutput("json_schema", json.dumps(PERSON))}
    specs = [constraint, {}, {}, constraint, {"structured_output": StructuredOutput("regex", "[a-z ]{1,30}\\.")}, {}]
    alone = []
    for i, spec in enumerate(specs):
        alone.append(run(engine, prompts[i % 3], temperature=0, max_tokens=60, **spec)[0])
    reqs = [
        engine.new_request(prompts[i % 3], SamplingParams(temperature=0, max_tokens=60, **spec))
        for i, spec in enumerate(specs)
    ]
    together = run_concurrently(engine, reqs)
    assert together == alone
    text = engine.tokenizer.decode(together[0])
    jsonschema.validate(json.loads(text), PERSON)


def test_a_preempted_constrained_request_resumes_its_language(tiny_gguf: Path) -> None:
    """The tiny model's random answers under memory pressure: a request that loses its blocks is re-prefilled with
    its tokens so far, and its matcher goes on from where it was."""
    config = EngineConfig(model=tiny_gguf, kv_cache_tokens=112, max_num_batched_tokens=16, max_num_seqs=4)
    eng = Engine(config)
    try:
        pattern = r"([0-9]{3}-){9}[0-9]{3}"  # 39 characters (\d would take any Unicode digit)
        prompts = [
            eng.tokenizer.encode(t)[:24] for t in ("the cat sat on the mat " * 3, "in a hole in the ground " * 3)
        ]
        params = SamplingParams(temperature=0, max_tokens=60, structured_output=StructuredOutput("regex", pattern))
        alone = [eng.generate(eng.new_request(p, params))[1] for p in prompts]
        events = events_concurrently(eng, [eng.new_request(p, params) for p in prompts], timeout_s=120)
        finals = [evs[-1] for evs in events]
        texts = ["".join(ev.text for ev in evs[:-1]) for evs in events]
        assert sum(f.evictions for f in finals) > 0, "no preemption: the test needs a smaller cache"
        assert texts == alone
        assert all(re.fullmatch(pattern, t) for t in texts)
    finally:
        eng.shutdown()


def test_json_whitespace_is_bounded(tiny_gguf: Path) -> None:
    """The tiny model's random weights favour whitespace as much as anything: each gap holds at most one line break
    and an indentation, so the object ends long before max_tokens instead of in blank lines."""
    eng = Engine(EngineConfig(model=tiny_gguf, kv_cache_tokens=4096))
    try:
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
        ids = eng.tokenizer.encode("the")
        for seed in range(6):
            params = SamplingParams(temperature=1.0, seed=seed, max_tokens=250,
                                    structured_output=StructuredOutput("json_schema", json.dumps(schema)))  # fmt: skip
            _, text, final = eng.generate(eng.new_request(ids, params))
            assert final.reason is FinishReason.EOS, (seed, text)
            assert json.loads(text)["ok"] in (True, False)
            assert not re.search(r"\n[ \t]*\n|[ \t]{33}", text), repr(text)
    finally:
        eng.shutdown()


def test_compact_json_and_a_whitespace_pattern(engine: Engine) -> None:
    """whitespace "" makes compact JSON (no whitespace outside strings), a pattern allows exactly that whitespace;
    the default lets this model pretty-print."""
    ids = chat(engine, CAPITAL_AS_JSON)

    def answer(whitespace: str | None) -> str:
        constraint = StructuredOutput("json_object", whitespace=whitespace)
        _, text, final = run(engine, ids, temperature=0, max_tokens=60, structured_output=constraint)
        assert final.reason is FinishReason.EOS and json.loads(text) == {"capital": "Paris"}
        return text

    assert "\n" in answer(None)  # the model's own pretty-printing
    assert answer("") == '{"capital":"Paris"}'
    spaced = answer(" ")  # at most one space per gap
    assert "\n" not in spaced and "  " not in spaced
    with pytest.raises(InvalidRequest, match=r"^sampling.structured_output.whitespace_pattern: only for JSON"):
        engine.new_request(ids, SamplingParams(structured_output=StructuredOutput("regex", "a+", whitespace="")))


# ------------------------------------------------------------------------------------------- limits


def test_max_tokens_stop_strings_min_tokens_and_ignore_eos(engine: Engine) -> None:
    ids = chat(engine, "Describe a person living in France as JSON.")
    full = run(engine, ids, **json_params())[1]
    out, text, final = run(engine, ids, **json_params(max_tokens=5))
    assert final.reason is FinishReason.LENGTH and len(out) == 5 and full.startswith(text)
    _, text, final = run(engine, ids, **json_params(stop=['"age']))
    assert final.reason is FinishReason.STOP and final.stop == '"age' and full.startswith(text) and '"age' not in text
    # min_tokens beyond what the language allows: the language wins (the request ends when it is complete)
    yes_no = StructuredOutput.choices(["yes", "no"])
    _, text, final = run(engine, ids, temperature=0, max_tokens=20, min_tokens=10, structured_output=yes_no)
    assert text in ("yes", "no") and final.reason is FinishReason.EOS
    _, text, final = run(engine, ids, temperature=0, max_tokens=20, ignore_eos=True, structured_output=yes_no)
    assert text in ("yes", "no") and final.reason is FinishReason.EOS


def test_logprobs_describe_the_constrained_choice(engine: Engine) -> None:
    """With logprobs every token is sampled (none jumped over) and the alternatives are tokens of the language."""
    ids = chat(engine, "What is the capital of France?")
    choices = ["Paris", "Parma", "London"]
    req = engine.new_request(
        ids,
        SamplingParams(temperature=0, max_tokens=8, logprobs=5, structured_output=StructuredOutput.choices(choices)),
    )
    chunks = [e for e in events_of(engine, req) if isinstance(e, Chunk)]
    tokens = [t for c in chunks for t in c.token_ids]
    entries = [e for c in chunks for e in c.logprobs]
    assert len(entries) == len(tokens) >= 2 and "".join(c.text for c in chunks) in choices
    first = entries[0]
    alternatives = [engine.tokenizer.decode([t]) for t, lp in first[2] if lp > -1e30]
    assert alternatives and all(any(c.startswith(a) for c in choices) for a in alternatives), alternatives
    assert abs(sum(2.718281828**lp for _, lp in first[2]) - 1) < 1e-3  # the allowed tokens hold all the mass


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("constraint", "field", "words"),
    [
        (StructuredOutput("regex", "a(b"), "sampling.structured_output.regex", "unclosed group"),
        (StructuredOutput("json_schema", "{not json"), "sampling.structured_output.json_schema", "not valid JSON"),
        (StructuredOutput("json_schema", '{"type": "nonsense"}'), "sampling.structured_output.json_schema", "nonsense"),
        (
            StructuredOutput("json_schema", "[1, 2]"),
            "sampling.structured_output.json_schema",
            "JSON Schema is an object",
        ),
        (StructuredOutput("choice", "[]"), "sampling.structured_output.choice", "at least one"),
        (StructuredOutput("choice", '["a", ""]'), "sampling.structured_output.choice", "non-empty"),
        (StructuredOutput("grammar", "start: undefined_rule"), "sampling.structured_output.grammar", "undefined_rule"),
        (StructuredOutput("grammar", ""), "sampling.structured_output.grammar", "empty"),
        (StructuredOutput("yaml", "x"), "sampling.structured_output", "unknown kind"),
        (StructuredOutput("regex", "a" * 300_000), "sampling.structured_output.regex", "longer than"),
    ],
)
def test_bad_constraints_are_refused_naming_the_field(engine: Engine, constraint: Any, field: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        engine.new_request([1, 2, 3], SamplingParams(max_tokens=4, structured_output=constraint))
    assert info.value.field == field and words in str(info.value), str(info.value)


def test_a_matcher_failing_mid_way_ends_only_its_request(engine: Engine) -> None:
    """A matcher that breaks (a grammar past the parser's limits, here a token it cannot take fed by hand) ends its
    own request as invalid; the requests beside it finish as they would alone."""
    ids = chat(engine, "Count to five.")
    alone = run(engine, ids, temperature=0, max_tokens=20)[0]
    broken = engine.new_request(ids, SamplingParams(**json_params()))
    assert not broken.matcher.consume_token(engine.tokenizer.encode("x")[-1])  # JSON cannot start with x
    fine = engine.new_request(ids, SamplingParams(temperature=0, max_tokens=20))
    finals: dict[str, Finished] = {}
    outs: dict[str, list[int]] = {broken.id: [], fine.id: []}
    done = threading.Semaphore(0)

    def sink_for(rid: str) -> Any:
        def sink(ev: Event) -> None:
            if isinstance(ev, Finished):
                finals[rid] = ev
                done.release()
            else:
                outs[rid].extend(ev.token_ids)

        return sink

    engine.submit(broken, sink_for(broken.id))
    engine.submit(fine, sink_for(fine.id))
    assert done.acquire(timeout=120) and done.acquire(timeout=120)
    bad = finals[broken.id]
    assert bad.invalid and bad.error is not None and bad.error.startswith("sampling.structured_output: ")
    assert outs[broken.id] == [] and bad.reason is FinishReason.ABORTED
    assert outs[fine.id] == alone and finals[fine.id].error is None


def test_each_request_gets_its_own_matcher(engine: Engine) -> None:
    """Two requests with one constraint (compiled once, copied): advancing one leaves the other at the start."""
    constraint = StructuredOutput.choices(["alpha", "beta"])
    a, b = (engine.new_request([1, 2], SamplingParams(max_tokens=4, structured_output=constraint)) for _ in range(2))
    assert a.matcher is not b.matcher
    for t in engine.tokenizer.backend.encode("alpha", add_special_tokens=False).ids:
        assert a.matcher.consume_token(t)
    assert a.matcher.is_stopped() and not b.matcher.is_stopped()
    cpu = torch.device("cpu")
    masks = ~blocked_tokens(engine.grammars.start_masks([a, b]).result(), engine.grammars.vocab_size, cpu)
    assert masks[0].nonzero().flatten().tolist() == list(engine.tokenizer.eos_ids)  # complete: only the end
    starts = {engine.tokenizer.decode([t]) for t in masks[1].nonzero().flatten().tolist()}
    assert {"a", "b"} <= starts and all("alpha".startswith(x) or "beta".startswith(x) for x in starts), starts


# ------------------------------------------------------------------------------------------- over gRPC


def test_grpc_structured_output(server: Any, engine: Engine) -> None:
    import grpc

    from optimist.engine.api import engine_pb2 as pb
    from optimist.engine.api import engine_pb2_grpc as pb_grpc

    from .test_server import collect

    def generate(
        structured: pb.StructuredOutput, max_tokens: int = 120, question: str = "Describe a person as JSON."
    ) -> tuple[str, pb.Final]:
        sampling = pb.SamplingParams(temperature=0, max_tokens=max_tokens, structured_output=structured)
        chat_prompt = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=question)])
        with grpc.insecure_channel(server.address) as channel:
            request = pb.GenerateRequest(chat=chat_prompt, sampling=sampling)
            _, text, final, _ = collect(pb_grpc.EngineStub(channel).Generate(request))
        return text, final

    text, final = generate(pb.StructuredOutput(json_schema=json.dumps(PERSON)))
    jsonschema.validate(json.loads(text), PERSON)
    assert final.finish_reason == pb.FINISH_REASON_EOS
    text, _ = generate(pb.StructuredOutput(choice=pb.Choices(choices=["yes", "no"])))
    assert text in ("yes", "no")
    text, final = generate(pb.StructuredOutput(json_object=True), 60, CAPITAL_AS_JSON)
    assert isinstance(json.loads(text), dict) and final.finish_reason == pb.FINISH_REASON_EOS
    compact = pb.StructuredOutput(json_object=True, whitespace_pattern="")
    assert generate(compact, 60, CAPITAL_AS_JSON)[0] == '{"capital":"Paris"}'
    assert re.fullmatch("[A-Z][a-z]+", generate(pb.StructuredOutput(regex="[A-Z][a-z]+"), 12)[0])
    for structured, field in [
        (pb.StructuredOutput(regex="a(b"), "sampling.structured_output.regex"),
        (pb.StructuredOutput(), "sampling.structured_output"),
        (pb.StructuredOutput(json_object=False), "sampling.structured_output.json_object"),
        (pb.StructuredOutput(grammar="start: x"), "sampling.structured_output.grammar"),
        (pb.StructuredOutput(regex="a", whitespace_pattern=""), "sampling.structured_output.whitespace_pattern"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            generate(structured)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(field + ":"), info.value.details()


def test_the_c_mask_and_torchs_agree() -> None:
    """The CPU engine masks logits in C (native.c); elsewhere (a GPU, no compiler) torch does: the same tokens,
    including those past the bitmask's width (a model whose logits are wider than its tokenizer)."""
    from optimist.engine.model import native
    from optimist.engine.sampler import mask_grammars

    if native.unavailable_reason() is not None:
        pytest.skip(native.unavailable_reason() or "")
    gen = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 4), dtype=torch.int32, generator=gen)
    bitmask[1] = 0
    bitmask[1, 2] = 1 << 5  # one token allowed: 69
    logits = torch.randn(4, 140, generator=gen)  # 140 > 4 * 32: the last 12 have no bits
    by_c, by_torch = logits.clone(), logits.double()
    mask_grammars(by_c, [0, 1, 3], bitmask)  # float32 on a CPU: C
    mask_grammars(by_torch, [0, 1, 3], bitmask)  # float64: torch's path
    assert torch.equal(torch.isinf(by_c), torch.isinf(by_torch))
    assert torch.equal(by_c[torch.isfinite(by_c)], logits[torch.isfinite(by_c)])
    assert torch.isfinite(by_c[1]).nonzero().flatten().tolist() == [69]
    assert torch.isfinite(by_c[2]).all() and torch.isinf(by_c[[0, 1, 3], 128:]).all()
    bits = [(int(bitmask[0, t // 32]) >> (t % 32)) & 1 for t in range(128)]
    assert torch.isfinite(by_c[0, :128]).tolist() == [bool(b) for b in bits]
