"""The scheduling simulator and the shared policies: hand-checked tiny instances and property tests."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optimist.engine.scheduler.policies import FCFS, AMax, AMin, HindsightShortestFirst, make_policy, peak_fits
from optimist.engine.scheduler.simulator import SimulationError, simulate
from optimist.engine.scheduler.workload import WorkloadRequest


def req(i: int, prompt: int, out: int, lower: int | None = None, upper: int | None = None, arrival: int = 0):
    return WorkloadRequest(f"r{i}", arrival, prompt, out, lower, upper)


def test_peak_fits_checks_every_members_end() -> None:
    # (held, steps left): at step 2 both hold 10+2 and 5+2 = 19; at step 5 only the second: 5+5 = 10.
    assert peak_fits([(10, 2), (5, 5)], 19)
    assert not peak_fits([(10, 2), (5, 5)], 18)
    blocks = lambda tokens: -(-tokens // 4)  # noqa: E731 (blocks of 4 tokens)
    assert peak_fits([(10, 2), (5, 5)], 6, blocks)  # step 2: 3 + 2 blocks; step 5: 3 blocks
    assert not peak_fits([(10, 2), (5, 5)], 4, blocks)


def test_hindsight_runs_shortest_first_and_never_evicts() -> None:
    # Prompts 2, true outputs 5, 1, 3. Memory 12: all three fit over their whole future (the peak is at step 3,
    # where r0 and r2 hold 2 + 3 each), so each finishes after its own length.
    work = [req(0, 2, 5), req(1, 2, 1), req(2, 2, 3)]
    res = simulate(work, HindsightShortestFirst(), 12)
    assert (res.latencies, res.evictions, res.peak_memory) == ([5, 1, 3], 0, 10)
    # Memory 8, order r1, r2, r0. r0 with r1 and r2 would peak at step 3 (4 + 2*3 = 10 > 8); after step 1 r1 is
    # gone, but with r2 (3 held, 2 left) it would still peak at 9; after step 2 (r2: 4 held, 1 left) the peak is
    # 6 + 2 = 8: r0 starts at t=2 and ends at t=7.
    res = simulate(work, HindsightShortestFirst(), 8)
    assert (res.latencies, res.evictions, res.peak_memory) == ([7, 1, 3], 0, 8)


def test_amax_plans_with_the_upper_bound() -> None:
    # Upper bounds 10 make each job plan for 2 + 10 tokens: two would peak at 24, so in memory 20 they run one
    # after the other (latencies 3 and 6) though they would have fitted together; in memory 24 they run together.
    work = [req(0, 2, 3, upper=10), req(1, 2, 3, upper=10)]
    assert simulate(work, AMax(), 20).latencies == [3, 6]
    assert simulate(work, AMax(), 24).latencies == [3, 3]


def test_amin_admits_optimistically_and_evicts_the_least_progress() -> None:
    # Prompts 2, outputs 2, 4, 4, lower bounds 1: all three plan 1 token and are admitted in memory 10.
    # t=1: all produce (bounds rise to 2). Step 2 needs 3 x 4 = 12 > 10: evict the least progress, the latest
    # arrival among equals: r2 (loses its token; 3 KV tokens wasted). r0 finishes at t=2. Step 3: r2 returns
    # (r1 planning 3 with 4 held, r2 planning 2: peak 8). r1 finishes at t=4, r2 at t=6.
    work = [req(0, 2, 2), req(1, 2, 4), req(2, 2, 4)]
    res = simulate(work, AMin(), 10, evict_cost="lost")
    assert (res.latencies, res.evictions, res.wasted_tokens, res.peak_memory) == ([2, 4, 6], 1, 3, 10)


def test_fcfs_preempts_the_newest_and_recompute_keeps_its_tokens() -> None:
    # Three jobs of 2 + 4 in memory 12: FCFS admits all (it checks only the next step). Step 3 needs 15: the
    # newest admission, r2, is preempted with 2 tokens produced (4 KV tokens wasted). It cannot return while r0
    # and r1 run (17 > 12); at t=4 they finish, r2 re-enters with its 2 tokens kept and finishes at t=6.
    work = [req(0, 2, 4), req(1, 2, 4), req(2, 2, 4)]
    res = simulate(work, FCFS(), 12, evict_cost="recompute")
    assert (res.latencies, res.evictions, res.wasted_tokens) == ([4, 4, 6], 1, 4)
    lost = simulate(work, FCFS(), 12, evict_cost="lost")  # r2 starts over: 4 more steps from t=4
    assert (lost.latencies, lost.evictions) == ([4, 4, 8], 1)


def test_prefill_cost_lengthens_admission_steps() -> None:
    work = [req(0, 10, 2)]
    assert simulate(work, FCFS(), 100).latencies == [2]
    assert simulate(work, FCFS(), 100, prefill_tokens_per_step=4).latencies == [2 + math.ceil(10 / 4)]


def test_online_arrivals_wait_for_their_step() -> None:
    work = [req(0, 1, 2, arrival=0), req(1, 1, 2, arrival=10)]
    res = simulate(work, FCFS(), 100)
    assert res.latencies == [2, 2] and res.makespan == 12


def test_a_request_larger_than_memory_is_an_error() -> None:
    with pytest.raises(SimulationError, match="r0"):
        simulate([req(0, 50, 60)], FCFS(), 100)


def test_unknown_policy_is_named() -> None:
    with pytest.raises(ValueError, match="unknown scheduler 'nope'"):
        make_policy("nope")


# ------------------------------------------------------------------------------------------ properties

jobs = st.lists(
    st.tuples(st.integers(1, 20), st.integers(1, 30), st.integers(0, 15)), min_size=1, max_size=25
)  # (prompt, output, arrival)


def build(spec: list[tuple[int, int, int]], width: float | None) -> list[WorkloadRequest]:
    out = []
    for i, (p, o, a) in enumerate(spec):
        if width is None:
            lo = hi = o
        else:
            lo, hi = max(1, math.floor(o * (1 - width))), math.ceil(o * (1 + width))
        out.append(WorkloadRequest(f"r{i}", a, p, o, lo, hi))
    return out


@settings(max_examples=60, deadline=None)
@given(
    spec=jobs,
    extra=st.integers(0, 60),
    width=st.sampled_from([None, 0.3, 0.9]),
    policy=st.sampled_from(["hsf", "amax", "amin", "fcfs"]),
    cost=st.sampled_from(["lost", "recompute"]),
)
def test_every_request_finishes_within_memory(spec, extra, width, policy, cost) -> None:
    work = build(spec, width)
    memory = max(r.prompt_tokens + r.output_tokens for r in work) + extra
    res = simulate(work, make_policy(policy), memory, evict_cost=cost)
    assert len(res.latencies) == len(work)
    in_order = sorted(work, key=lambda r: r.arrival)
    assert all(lat >= r.output_tokens for lat, r in zip(res.latencies, in_order, strict=True))
    assert res.peak_memory <= memory
    if policy in ("hsf", "amax"):
        assert res.evictions == 0


@settings(max_examples=60, deadline=None)
@given(spec=jobs, extra=st.integers(0, 60), cost=st.sampled_from(["lost", "recompute"]))
def test_amin_with_exact_intervals_is_hindsight_shortest_first(spec, extra, cost) -> None:
    work = build(spec, None)
    memory = max(r.prompt_tokens + r.output_tokens for r in work) + extra
    amin = simulate(work, AMin(), memory, evict_cost=cost)
    hsf = simulate(work, HindsightShortestFirst(), memory, evict_cost=cost)
    assert amin.evictions == 0
    assert amin.latencies == hsf.latencies


def test_simulate_cli_prints_json_and_names_a_bad_line(tmp_path) -> None:
    import json
    import subprocess
    import sys

    from optimist.engine.scheduler.workload import write_workload

    good = tmp_path / "w.jsonl"
    write_workload(good, [req(0, 2, 5), req(1, 2, 1), req(2, 2, 3)])
    cmd = [sys.executable, "-m", "optimist.engine.cli", "simulate", "--workload", str(good), "--memory", "8"]
    out = subprocess.run([*cmd, "--policy", "hsf", "--json"], capture_output=True, text=True, check=True)
    summary = json.loads(out.stdout)
    assert summary["policy"] == "hsf" and summary["requests"] == 3 and summary["evictions"] == 0
    assert summary["mean_latency"] == pytest.approx(11 / 3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt_tokens": 3, "output_tokens": 4}\n{"id": "b", "prompt_tokens": "x"}\n')
    out = subprocess.run([*cmd[:-3], str(bad), "--memory", "8", "--policy", "amin"], capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip() == "optimist simulate: error: line 2: field 'prompt_tokens' must be an integer, got 'x'"


def test_evictions_rise_as_intervals_widen() -> None:
    from optimist.engine.scheduler.workload import paper_workload

    counts = [
        simulate(paper_workload(300, seed=1, intervals=f"noise:{x}"), AMin(), 4096).evictions
        for x in (0, 0.1, 0.3, 0.5, 0.9)
    ]
    assert counts[0] == 0
    assert all(a < b for a, b in itertools.pairwise(counts)), counts


def test_length_distribution_counts_running_jobs_as_censored() -> None:
    from optimist.engine.scheduler.policies import LengthDistribution

    dist = LengthDistribution(cap=10)
    for length in (2, 2, 4):
        dist.observe(length)
    assert dist.survival([])[[1, 2, 3, 4]].tolist() == pytest.approx([1, 1 / 3, 1 / 3, 0])
    # Two jobs still running after 3 tokens: of the 5 at risk at 2, two stop there; of the 3 left at 4, one stops.
    s = dist.survival([3, 3])
    assert s[[2, 4]].tolist() == pytest.approx([3 / 5, 3 / 5 * 2 / 3])


def test_gittins_index_is_the_chance_of_finishing_per_unit_of_memory_time() -> None:
    from optimist.engine.scheduler.policies import GittinsTable, LengthDistribution

    dist = LengthDistribution(cap=200)
    for _ in range(4):
        dist.observe(4)  # every request produces exactly 4 tokens
    table = GittinsTable(dist.survival([]))

    def index(age: int, prompt: int, known: int | None = None, upper: int = 1000) -> float:
        known = age if known is None else known
        return float(table.indices(*(np.array([v]) for v in (age, known, prompt, upper)))[0])

    # Fresh, prompt 0: it holds 1, 2, 3, 4 tokens while producing its 4 tokens and surely ends: 1 / 10.
    assert index(0, 0) == pytest.approx(1 / 10)
    assert index(0, 10) == pytest.approx(1 / (11 + 12 + 13 + 14))  # a longer prompt holds more memory
    assert index(2, 0) == pytest.approx(1 / (3 + 4))  # two tokens in, two to go
    assert index(0, 0, upper=2) == pytest.approx(1 / (1 + 2))  # an upper bound below the learned mass

    dist = LengthDistribution(cap=200)
    for length in (1, 100):  # half the requests stop at once, half run to 100
        dist.observe(length)
    table = GittinsTable(dist.survival([]))
    assert index(0, 0) == pytest.approx(0.5)  # one step of one token: done with probability 1/2
    # Past the first token only the long half is left: 99 more steps holding 2..100 tokens.
    assert index(1, 0) == pytest.approx(1 / sum(range(2, 101)))


def test_amin_learned_evicts_the_uninformed_job_with_the_lowest_index() -> None:
    from optimist.engine.scheduler.policies import AMinLearned
    from optimist.engine.scheduler.simulator import SimJob

    policy = AMinLearned(cap=1000)
    young = SimJob("young", 0, 5, 50, 1, 1000, seq=1, produced=1, informed=False)
    old = SimJob("old", 0, 5, 50, 1, 1000, seq=0, produced=10, informed=False)
    assert policy.victim([young, old]) is young  # nothing learned yet: A_min's least progress
    for length in (2, 2, 2, 2, 50, 50):  # most requests are short, a few go on to 50
        policy.lengths.observe(length)
    # "young" likely stops at its next token; "old" has passed 2 and needs 40 more steps holding ~30 tokens each.
    assert policy.index(young) > 100 * policy.index(old)
    assert policy.victim([young, old]) is old
    assert AMin().victim([young, old]) is young  # A_min spares the progress
    policy.eviction_loses_progress = True
    assert policy.victim([young, old]) is old  # weighting the 10 tokens it would lose does not save it
    hinted = SimJob("hinted", 0, 5, 50, 40, 60, seq=2, produced=10, informed=True)
    assert policy.victim([young, old, hinted]) is old  # a request with a hint is never the learned victim
    young.informed = old.informed = True
    assert policy.victim([young, old, hinted]) is young  # with hints it is A_min


def test_amin_learned_admits_short_prompts_and_hinted_requests_first() -> None:
    from optimist.engine.scheduler.policies import AMinLearned
    from optimist.engine.scheduler.simulator import SimJob

    policy = AMinLearned(cap=1000)
    long = SimJob("long", 0, 400, 50, 1, 1000, seq=0, informed=False)
    short = SimJob("short", 0, 20, 50, 1, 1000, seq=1, informed=False)
    hinted = SimJob("hinted", 0, 400, 50, 30, 40, seq=2, bound=30, informed=True)
    order = lambda: [j.id for j in sorted([long, short, hinted], key=policy.waiting_key)]  # noqa: E731
    assert order() == ["hinted", "short", "long"]  # before anything is learned: shortest prompt first
    for length in (3, 8, 20, 60, 600):
        policy.lengths.observe(length)
    policy.prepare([long, short, hinted])
    assert order() == ["hinted", "short", "long"]
    # An evicted request that had run 150 tokens (the lost model keeps that knowledge as its bound) is past most
    # of the learned mass: it ranks behind fresh ones, even with a short prompt.
    policy.eviction_loses_progress = True
    survivor = SimJob("survivor", 0, 20, 600, 1, 1000, seq=3, bound=151, informed=False)
    policy.prepare([survivor])
    assert [j.id for j in sorted([long, survivor], key=policy.waiting_key)] == ["long", "survivor"]


@settings(max_examples=40, deadline=None)
@given(
    spec=jobs, extra=st.integers(0, 60), width=st.sampled_from([0.0, 0.3]), cost=st.sampled_from(["lost", "recompute"])
)
def test_amin_learned_is_amin_when_requests_carry_intervals(spec, extra, width, cost) -> None:
    from optimist.engine.scheduler.policies import AMinLearned

    work = [
        WorkloadRequest(r.id, r.arrival, r.prompt_tokens, r.output_tokens, r.lower + 1, r.upper + 1)
        for r in build(spec, width)
    ]  # lower > 1: every request is informed
    work = [WorkloadRequest(r.id, r.arrival, r.prompt_tokens, r.output_tokens + 1, r.lower, r.upper) for r in work]
    memory = max(r.prompt_tokens + r.output_tokens for r in work) + extra
    a = simulate(work, AMin(), memory, evict_cost=cost)
    b = simulate(work, AMinLearned(cap=100), memory, evict_cost=cost)
    assert (a.latencies, a.evictions) == (b.latencies, b.evictions)


def test_lower_bound_predictor_prefers_the_hint_then_a_low_quantile_per_prompt_bucket() -> None:
    from optimist.engine.scheduler.predictor import LowerBoundPredictor

    p = LowerBoundPredictor(quantile=0.1, min_samples=10)
    assert p.predict(100, max_tokens=500) == 1  # nothing learned yet
    for length in range(1, 101):  # prompts of 65-128 tokens produced 1..100 tokens
        p.observe(100, length)
    assert p.predict(90, max_tokens=500) == 11  # the 10th percentile of 1..100, same bucket
    assert p.predict(90, max_tokens=5) == 5  # never above max_tokens
    assert p.predict(10, max_tokens=500) == 1  # another bucket: still unknown
    assert p.predict(90, max_tokens=500, hint=42) == 42  # a client hint wins


def test_lower_bound_predictor_learns_each_lora_adapters_lengths() -> None:
    """Fine-tunes differ most in how much they write: an adapter with enough finished requests of its own gets its
    own quantile; one without falls back to every request's."""
    from optimist.engine.scheduler.predictor import LowerBoundPredictor

    p = LowerBoundPredictor(quantile=0.1, min_samples=10)
    for length in range(1, 101):
        p.observe(100, 200 + length, group="chat")  # long answers
        p.observe(100, length % 10 + 5, group="sql")  # short ones
    assert p.predict(100, max_tokens=1000, group="chat") == 211
    assert p.predict(100, max_tokens=1000, group="sql") == 6  # the 10th percentile of 5..14, ten of each
    everyone = p.predict(100, max_tokens=1000, group="new")  # no samples of its own: all requests' quantile
    assert everyone == p.predict(100, max_tokens=1000) and 6 < everyone < 211
    for _ in range(5):
        p.observe(100, 1000, group="new")
    assert p.predict(100, max_tokens=1000, group="new") == everyone  # 5 < min_samples: still the fallback
