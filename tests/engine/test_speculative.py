"""Speculative decoding with n-gram drafts, on the real default model: the same greedy answers in fewer steps (the
exact float32 engine and the int4 one whose decode steps run in C), sampling law with penalties counted over the
drafts, limits (max_tokens, stop strings, EOS), logprobs, mixed batches, memory (drafts never preempt, spare blocks
are given back) and preemption, the counters in /metrics, the CLI and configuration errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from optimist.engine.config import ConfigError, EngineConfig
from optimist.engine.engine import Engine, _row_views
from optimist.engine.kv_cache import BlockAllocator
from optimist.engine.outputs import Chunk
from optimist.engine.request import FinishReason, Request, SamplingParams, StructuredOutput
from optimist.engine.sampler import sample
from optimist.engine.scheduler.policies import make_policy
from optimist.engine.scheduler.scheduler import ScheduledRequest, Scheduler
from optimist.engine.speculative import (
    NgramIndex,
    SpeculativeConfig,
    Speculator,
    StepCost,
    accepted,
    draft_room,
    propose,
)

from ..conftest import events_concurrently, events_of, run_concurrently

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump. Sphinx of black quartz, judge my vow."
)
REPEAT = "Repeat the following text exactly, word for word:\n\n" + TEXT
CODE = (
    "Rename the variable `total` to `result` in this Python function and show the whole function:\n\n"
    "def average(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n"
)
QUESTION = "What is the capital of France?"
ON = SpeculativeConfig(tokens=4)
OFF = SpeculativeConfig()


def chat(engine: Engine, question: str) -> list[int]:
    return engine.tokenizer.encode(engine.tokenizer.apply_chat_template([{"role": "user", "content": question}]))


class Run:
    def __init__(self, engine: Engine, spec: SpeculativeConfig, ids: list[int], **params: Any) -> None:
        """One request alone on `engine` with speculation set to `spec`: its tokens, text, final event, the steps
        it took and the drafts kept."""
        before = engine.speculative
        engine.speculative = spec
        steps, kept = engine.stats.steps, engine.stats.spec_accepted_tokens
        try:
            self.tokens, self.text, self.final = engine.generate(engine.new_request(ids, SamplingParams(**params)))
        finally:
            engine.speculative = before
        self.steps = engine.stats.steps - steps
        self.accepted = engine.stats.spec_accepted_tokens - kept


# ------------------------------------------------------------------------------------------------ drafts


def test_drafts_follow_the_latest_earlier_occurrence_of_the_longest_suffix() -> None:
    index = NgramIndex(1, 3)
    #           0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 5, 6, 7]
    # the suffix (5, 6, 7) occurred at 0..2 (followed by 8, 9), (6, 7) also at 6..7 (followed by 2): longest wins
    assert index.propose(tokens, 3) == [8, 9, 1]
    tokens += [4]  # (4,) never occurred before
    assert index.propose(tokens, 3) == []
    tokens += [6]  # (4, 6) did not occur, (6,) last at 11
    assert index.propose(tokens, 2) == [7, 4]
    # growing the sequence step by step finds what a fresh index finds
    assert NgramIndex(1, 3).propose(tokens, 2) == [7, 4]


def _brute_force(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    last = len(tokens) - 1
    for n in range(min(n_max, last), n_min - 1, -1):
        suffix = tokens[last - n + 1 :]
        for end in range(last - 1, n - 2, -1):
            if tokens[end - n + 1 : end + 1] == suffix:
                return tokens[end + 1 : end + 1 + k]
    return []


def test_lookups_equal_a_brute_force_search_as_the_sequence_grows() -> None:
    rng = torch.Generator().manual_seed(5)
    for n_min, n_max, vocab in ((1, 4, 6), (2, 3, 4), (1, 1, 20), (3, 5, 3)):
        tokens = torch.randint(0, vocab, (300,), generator=rng).tolist()
        index = NgramIndex(n_min, n_max)
        for length in range(1, 300, 7):
            grown = tokens[:length]
            assert index.propose(grown, 5) == _brute_force(grown, 5, n_min, n_max), (n_min, n_max, length)


def test_a_period_continues_into_the_suffix_itself() -> None:
    tokens = [1, 2, 3, 1, 2, 3, 1, 2]
    assert NgramIndex(1, 4).propose(tokens, 4) == [3, 1, 2]  # the occurrence at 3..4 is followed by 3, 1, 2


def test_ngram_min_bounds_the_matches() -> None:
    assert NgramIndex(2, 3).propose([4, 5, 9, 5], 2) == []  # only (5,) occurred before
    assert NgramIndex(1, 3).propose([4, 5, 9, 5], 2) == [9, 5]


def test_accepted_counts_the_confirmed_prefix() -> None:
    assert accepted([7, 8, 9], [7, 8, 9, 4]) == 3
    assert accepted([7, 8, 9], [7, 3, 9, 4]) == 1
    assert accepted([7, 8, 9], [1, 8, 9, 4]) == 0
    assert accepted([], [5]) == 0


def test_drafts_stay_within_max_tokens_and_the_context() -> None:
    req = Request("r", list(range(10)), SamplingParams(max_tokens=5))
    req.output_ids = [1, 2]
    assert draft_room(req, context_length=100) == 2  # 2 produced; 2 drafts + the step's own token make 5
    assert draft_room(req, context_length=14) == 1
    req.output_ids = [1, 2, 3, 4]
    assert draft_room(req, context_length=100) == 0
    assert propose(req, ON, 100) == []


def test_the_step_cost_model_recovers_its_line() -> None:
    cost = StepCost()
    assert cost.coefficients() is None
    for rows in [1, 2, 5, 3, 8, 1, 4] * 5:
        cost.observe(rows, 0.004 + 0.0025 * rows)
    a, b = cost.coefficients() or (0, 0)
    assert a == pytest.approx(0.004) and b == pytest.approx(0.0025)
    flat = StepCost(prior=0.25)
    for _ in range(10):
        flat.observe(2, 0.006)  # one batch size only: the mean step, split by the prior
    a, b = flat.coefficients() or (0, 0)
    assert a + 2 * b == pytest.approx(0.006) and b == pytest.approx(0.25 * a)


def _speculator(a: float, b: float) -> Speculator:
    spec = Speculator()
    for rows in (1, 2, 3, 4, 6, 8):
        spec.cost.observe(rows, a + b * rows)
    return spec


def _drafting(n: int, kept: float, tried: float) -> list[Request]:
    reqs = []
    for i in range(n):
        req = Request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=64))
        req.spec_kept, req.spec_tried, req.spec_explored = kept, tried, 100
        reqs.append(req)
    return reqs


def test_drafts_are_kept_only_where_they_are_expected_to_pay() -> None:
    def depths(spec: Speculator, reqs: list[Request], k: int = 4) -> list[int]:
        drafts = {r: [9] * k for r in reqs}
        spec.choose(drafts, len(reqs))
        return [len(d) for d in drafts.values()]

    # nearly free rows (a GPU step): every draft of a request that keeps most
    assert depths(_speculator(0.010, 0.00001), _drafting(4, kept=9, tried=10)) == [4] * 4
    # rows at 40% of a one-row step (this 2-core CPU): one request alone takes a few, a batch of 16 none
    cpu = _speculator(0.0043, 0.0029)
    alone = depths(cpu, _drafting(1, kept=9, tried=10))[0]
    assert 2 <= alone <= 4
    assert depths(cpu, _drafting(4, kept=9, tried=10)) == [1] * 4
    assert depths(cpu, _drafting(16, kept=9, tried=10)) == [0] * 16
    # a request whose drafts are rarely kept drafts nothing, even alone
    assert depths(cpu, _drafting(1, kept=1, tried=10)) == [0]
    # but one that has not tried yet tries its first draft
    (new,) = _drafting(1, kept=0, tried=0)
    new.spec_explored = 0
    assert depths(cpu, [new, *_drafting(15, kept=1, tried=10)]) == [1] + [0] * 15


def test_the_engine_wide_rate_is_where_a_request_starts() -> None:
    spec = Speculator()
    (req,) = _drafting(1, kept=0, tried=0)
    assert spec.rate(req) == pytest.approx(0.5)
    for _ in range(50):
        spec.record(req, 4, 4)
    (fresh,) = _drafting(1, kept=0, tried=0)
    assert spec.rate(fresh) > 0.9 and spec.rate(req) > 0.9
    for _ in range(30):
        spec.record(req, 4, 0)  # the request's text stopped repeating: its own rate falls fast
    assert spec.rate(req) < 0.3 < spec.engine_rate()


# --------------------------------------------------------------------------------------- the same answers


@pytest.mark.parametrize("which", ["float32", "int4"])
def test_greedy_answers_are_unchanged_and_copying_takes_fewer_steps(
    which: str, engine: Engine, int4_engine: Engine
) -> None:
    eng = engine if which == "float32" else int4_engine
    for prompt in (REPEAT, CODE, QUESTION):
        ids = chat(eng, prompt)
        off = Run(eng, OFF, ids, temperature=0, max_tokens=64)
        on = Run(eng, ON, ids, temperature=0, max_tokens=64)
        assert on.tokens == off.tokens, prompt
        assert on.final.reason == off.final.reason
        assert on.final.completion_tokens == off.final.completion_tokens
        assert off.steps == len(off.tokens)  # one token a step (the prefill step samples the first)
        if prompt == REPEAT:  # (the tiny model rewrites the code rather than copy it)
            assert on.accepted > len(on.tokens) / 2, prompt
            assert on.steps < 0.65 * off.steps, (prompt, on.steps, off.steps)


def test_penalties_and_min_tokens_count_the_drafts_before_each_row(engine: Engine) -> None:
    ids = chat(engine, REPEAT)
    for params in (
        {"repetition_penalty": 1.02},  # (a stronger one penalises every prompt token: the answer copies none)
        {"frequency_penalty": 0.8, "presence_penalty": 0.4},
        {"min_tokens": 50, "max_tokens": 56},
    ):
        args = {"temperature": 0, "max_tokens": 48, **params}
        off, on = Run(engine, OFF, ids, **args), Run(engine, ON, ids, **args)
        assert on.tokens == off.tokens, params
        assert on.accepted > 0, params


def test_speculative_sampling_keeps_the_distribution() -> None:
    """One step of a request with one draft, many times: the first token follows row 0's distribution and, when
    it is the draft, the second follows row 1's as the plain decode step would compute it after the draft, with the
    presence penalty now counting the draft (a second draw from the unpenalised row would be off by far)."""
    torch.manual_seed(0)
    vocab, draft, trials = 6, 2, 6000
    row0 = torch.tensor([0.5, 0.1, 1.2, -0.3, 0.0, 0.4])
    row1 = torch.tensor([0.2, 0.9, 1.5, 0.1, -1.0, 0.3])
    params = SamplingParams(temperature=1.0, presence_penalty=1.5, max_tokens=8)
    req = Request("r", [0, 1], params)
    req.output_ids = [5]
    req.draft = [draft]
    views = list(_row_views(ScheduledRequest(req, 2, drafts=1)))
    assert views[0] is req and views[1].output_ids == [5, draft] and req.output_ids == [5]
    firsts, seconds = torch.zeros(vocab), torch.zeros(vocab)
    for _ in range(trials):
        tokens = sample(torch.stack([row0, row1]), views, eos_ids=[]).token_ids
        firsts[tokens[0]] += 1
        if accepted([draft], tokens) == 1:
            seconds[tokens[1]] += 1

    def penalised(row: torch.Tensor, output: list[int]) -> torch.Tensor:
        seen = torch.zeros(vocab)
        seen[output] = 1.0
        return (row - 1.5 * seen).softmax(0)

    p0, p1 = penalised(row0, [5]), penalised(row1, [5, draft])
    assert (firsts / trials - p0).abs().max() < 0.025
    hits = seconds.sum()
    assert abs(hits / trials - p0[draft]) < 0.025
    assert (seconds / hits - p1).abs().max() < 0.04
    assert (p1 - penalised(row1, [5])).abs().max() > 0.1  # the check above tells the two apart


def test_seeded_sampled_answers_are_the_same_with_and_without_drafts(engine: Engine) -> None:
    """A seed's draw for output position n is fixed (sampler.position_seed), and every row's distribution is the
    plain step's: so a seeded answer does not depend on which drafts were tried or kept."""
    ids = chat(engine, REPEAT)
    for seed in (11, 12, 13):
        args = {"temperature": 0.8, "top_p": 0.95, "seed": seed, "max_tokens": 40}
        off, on = Run(engine, OFF, ids, **args), Run(engine, ON, ids, **args)
        assert on.tokens == off.tokens, seed
        assert on.accepted > 0 and on.steps < off.steps
    assert Run(engine, OFF, ids, **{**args, "seed": 14}).tokens != off.tokens


def test_structured_outputs_take_the_drafts_their_language_allows(engine: Engine) -> None:
    """Extraction into JSON copies values from the prompt: drafts the grammar allows are computed with their masks
    (each row's mask is the language's after the drafts before it), the same valid answer in fewer steps."""
    pytest.importorskip("llguidance")
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"full_name": {"type": "string"}, "employer": {"type": "string"}, "city": {"type": "string"}},
        "required": ["full_name", "employer", "city"],
        "additionalProperties": False,
    }
    text = (
        "Extract the person's full name, employer and city from this text as JSON.\n\n"
        "Dr. Margaret Hamilton-Whitfield works for the Northern Lighthouse Engineering Company in Aberdeen."
    )
    ids = chat(engine, text)
    constraint = StructuredOutput("json_schema", json.dumps(schema))
    args = {"temperature": 0, "max_tokens": 80, "structured_output": constraint}
    off, on = Run(engine, OFF, ids, **args), Run(engine, ON, ids, **args)
    assert on.tokens == off.tokens and on.final.reason is FinishReason.EOS
    jsonschema.validate(json.loads(on.text), schema)
    assert on.accepted > 0 and on.steps < off.steps


# ------------------------------------------------------------------------------------------------ limits


def test_max_tokens_stop_strings_and_eos_end_where_they_would(engine: Engine) -> None:
    ids = chat(engine, REPEAT)
    off = Run(engine, OFF, ids, temperature=0, max_tokens=200)
    assert off.final.reason is FinishReason.EOS
    on = Run(engine, ON, ids, temperature=0, max_tokens=200)
    assert (on.tokens, on.final.reason) == (off.tokens, FinishReason.EOS)
    for n in (1, 2, 7, 13):
        on = Run(engine, ON, ids, temperature=0, max_tokens=n)
        assert on.tokens == off.tokens[:n] and on.final.reason is FinishReason.LENGTH
    stop = "five dozen"
    off = Run(engine, OFF, ids, temperature=0, max_tokens=80, stop=[stop])
    on = Run(engine, ON, ids, temperature=0, max_tokens=80, stop=[stop])
    assert on.final.reason is FinishReason.STOP and on.final.stop == stop
    assert on.text == off.text and stop not in on.text and on.text.endswith("Pack my box with ")


def test_logprobs_are_each_rows_own(engine: Engine) -> None:
    def logprobs(spec: SpeculativeConfig) -> list[Any]:
        before = engine.speculative
        engine.speculative = spec
        try:
            req = engine.new_request(chat(engine, REPEAT), SamplingParams(temperature=0, max_tokens=30, logprobs=2))
            events = events_of(engine, req, timeout_s=120)
        finally:
            engine.speculative = before
        return [lp for ev in events if isinstance(ev, Chunk) for lp in ev.logprobs]

    off, on = logprobs(OFF), logprobs(ON)
    assert [t for t, _, _ in on] == [t for t, _, _ in off] and len(on) == 30
    for (_, a, top_a), (_, b, top_b) in zip(on, off, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
        assert [t for t, _ in top_a] == [t for t, _ in top_b]


# ------------------------------------------------------------------------------------------ batches, memory


def test_a_mixed_batch_gives_each_request_its_solo_answer(engine: Engine) -> None:
    pytest.importorskip("llguidance")
    prompts = [chat(engine, p) for p in (REPEAT, CODE, QUESTION, "Write a haiku about rain.")]
    params = [SamplingParams(temperature=0, max_tokens=48) for _ in prompts]
    # a structured output's drafts are those its language allows; its rows share the steps
    params[3] = SamplingParams(temperature=0, max_tokens=48, structured_output=StructuredOutput.choices(["yes", "no"]))
    solo = [Run(engine, OFF, p, **vars_of(sp)).tokens for p, sp in zip(prompts, params, strict=True)]
    before = engine.speculative
    engine.speculative = ON
    try:
        together = run_concurrently(engine, [engine.new_request(p, sp) for p, sp in zip(prompts, params, strict=True)])
    finally:
        engine.speculative = before
    assert together == solo


def vars_of(params: SamplingParams) -> dict[str, Any]:
    return {f: getattr(params, f) for f in params.__dataclass_fields__}


def _decoding(scheduler: Scheduler, prompt: int, draft: list[int], rid: str) -> Request:
    """A running request one token behind (its prompt computed, its first token sampled), holding its blocks."""
    req = Request(rid, list(range(prompt)), SamplingParams(max_tokens=64))
    req.output_ids = [1]
    req.block_table = scheduler.allocator.allocate(scheduler.allocator.blocks_for(prompt + 1))
    req.num_computed = prompt
    req.draft = list(draft)
    scheduler.running.append(req)
    return req


def test_drafts_use_spare_slots_and_never_preempt() -> None:
    sched = Scheduler(make_policy("fcfs"), BlockAllocator(5, 4, prefix_caching=False), 8, 64)
    a = _decoding(sched, 5, [7, 7, 7, 7], "a")  # 6 tokens in 2 blocks: 2 spare slots
    b = _decoding(sched, 9, [7, 7, 7, 7], "b")  # 10 tokens in 3 blocks: 2 spare slots, and no block left
    assert sched.allocator.num_free == 0
    plan = sched.schedule()
    assert not plan.preempted and sched.running == [a, b]
    assert [(s.num_new, s.drafts) for s in plan.scheduled] == [(3, 2), (3, 2)]
    assert (len(a.block_table), len(b.block_table)) == (2, 3)


def test_drafts_never_take_the_block_a_later_request_needs_for_its_own_token() -> None:
    sched = Scheduler(make_policy("fcfs"), BlockAllocator(6, 4, prefix_caching=False), 8, 64)
    a = _decoding(sched, 7, [3, 3, 3, 3], "a")  # 8 tokens in 2 full blocks; its drafts would need a new one
    b = Request("b", list(range(12)), SamplingParams(max_tokens=64))
    b.output_ids = [1]  # 13 tokens: its own next position (12) needs a fourth block
    b.block_table = sched.allocator.allocate(3)
    b.num_computed = 12
    sched.running.append(b)
    assert sched.allocator.num_free == 1
    plan = sched.schedule()
    assert not plan.preempted and sched.running == [a, b]
    assert [(s.request.id, s.num_new, s.drafts) for s in plan.scheduled] == [("a", 1, 0), ("b", 1, 0)]
    assert len(b.block_table) == 4


def test_drafts_take_new_blocks_only_while_nobody_waits() -> None:
    def scheduler_with(waiting: bool) -> tuple[Scheduler, Request]:
        sched = Scheduler(make_policy("fcfs"), BlockAllocator(8, 4, prefix_caching=False), 8, 64)
        req = _decoding(sched, 7, [3, 3, 3, 3], "a")  # 8 tokens: 2 full blocks, no spare slot
        if waiting:
            sched.add(Request("w", list(range(40)), SamplingParams(max_tokens=4)))  # cannot be admitted: too long
        return sched, req

    sched, req = scheduler_with(waiting=False)
    (s,) = sched.schedule().scheduled
    assert s.drafts == 4 and len(req.block_table) == 3  # a third block for the drafts' positions 8..11
    req.num_computed += s.num_new - (s.drafts - 1)  # one draft kept (as the engine counts after verifying)
    req.output_ids += [3, 9]
    sched.trim(req)
    assert len(req.block_table) == 3  # 10 tokens: the third block is in use
    req.output_ids = req.output_ids[:1]
    sched.trim(req)
    assert len(req.block_table) == 2 and sched.allocator.num_free == 6

    sched, req = scheduler_with(waiting=True)
    (s,) = [s for s in sched.schedule().scheduled if s.request is req]
    assert s.drafts == 0 and s.num_new == 1 and len(req.block_table) == 2


def test_preempted_requests_with_drafts_resume_with_their_solo_answers(tiny_gguf: Path) -> None:
    """The tiny model under memory pressure: requests lose their blocks and are re-prefilled, drafts or not."""
    config = EngineConfig(
        model=tiny_gguf, kv_cache_tokens=128, max_num_batched_tokens=32, max_num_seqs=4, speculative_tokens=4
    )
    eng = Engine(config)
    try:
        prompts = [eng.tokenizer.encode(t)[:30] for t in ("the cat sat on the mat " * 4, "a b c d e f g " * 5)]
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        eng.speculative = OFF
        alone = [eng.generate(eng.new_request(p, params))[0] for p in prompts]
        eng.speculative = ON
        events = events_concurrently(eng, [eng.new_request(p, params) for p in prompts], timeout_s=120)
        finals = [evs[-1] for evs in events]
        outputs = [[t for ev in evs[:-1] for t in ev.token_ids] for evs in events]
        assert sum(f.evictions for f in finals) > 0, "no preemption: the test needs a smaller cache"
        assert eng.stats.spec_accepted_tokens > 0, "no draft was kept: the test needs more repetitive prompts"
        assert outputs == alone
        assert eng.allocator.num_used == 0
    finally:
        eng.shutdown()


# ------------------------------------------------------------------------------------ counters, CLI, config


def test_the_counters_reach_metrics(engine: Engine) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from optimist.engine.server import load_to_proto
    from optimist.engine.sidecar import LoadCollector, SidecarConfig

    from .test_sidecar import samples

    before = load_to_proto(engine.load(), "m")
    run = Run(engine, ON, chat(engine, REPEAT), temperature=0, max_tokens=40)
    after = load_to_proto(engine.load(), "m")
    kept = after.spec_accepted_tokens_total - before.spec_accepted_tokens_total
    assert kept == run.accepted > 0
    assert after.spec_draft_tokens_total - before.spec_draft_tokens_total >= kept
    assert after.spec_drafts_total > before.spec_drafts_total

    class Latest:
        config = SidecarConfig(pool="p")
        fresh = True
        latest = after

    registry = CollectorRegistry(auto_describe=False)
    registry.register(LoadCollector(Latest()))
    values = samples(generate_latest(registry).decode())
    for name, value in (
        ("num_drafts", after.spec_drafts_total),
        ("num_draft_tokens", after.spec_draft_tokens_total),
        ("num_accepted_tokens", after.spec_accepted_tokens_total),
    ):
        assert values[f"optimist_spec_decode_{name}_total"] == values[f"vllm:spec_decode_{name}_total"] == value


def test_bad_speculative_settings_are_named() -> None:
    with pytest.raises(ConfigError, match="speculative_tokens"):
        EngineConfig(speculative_tokens=-1).validate()
    with pytest.raises(ConfigError, match="n-gram sizes"):
        EngineConfig(speculative_tokens=2, speculative_ngram_min=3, speculative_ngram_max=2).validate()


def test_the_cli_takes_vllms_speculative_config(capsys: pytest.CaptureFixture[str]) -> None:
    from optimist.engine.cli import build_parser, engine_config

    parser = build_parser()
    spec = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3, "prompt_lookup_min": 2}
    config = engine_config(parser.parse_args(["serve", "--speculative-config", json.dumps(spec)]))
    assert (config.speculative_tokens, config.speculative_ngram_min, config.speculative_ngram_max) == (5, 2, 3)
    config = engine_config(parser.parse_args(["serve", "--speculative-tokens", "3"]))
    assert config.speculative == SpeculativeConfig(3, 1, 4)
    for bad, words in (
        ({"method": "eagle", "num_speculative_tokens": 2}, "only ngram"),
        ({"num_speculative_tokens": "2"}, "must be an integer"),
        ({"draft_model": "x"}, "unknown key 'draft_model'"),
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", "--speculative-config", json.dumps(bad)])
        assert words in capsys.readouterr().err
