"""The exact optimum (integer program): equal to a brute-force search on tiny instances, below every policy where
theory says so, and holding a request back when that is what pays."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optimist.engine.scheduler.optimum import exact_optimum
from optimist.engine.scheduler.policies import make_policy, peak_fits
from optimist.engine.scheduler.simulator import SimulationError, simulate
from optimist.engine.scheduler.workload import WorkloadRequest, write_workload


def brute_force(work: list[WorkloadRequest], memory: int) -> float:
    """Least mean latency over every non-preemptive schedule, step by step: any subset of the arrived requests
    may start in any step if the running set then fits over its whole future (requests only grow)."""
    reqs = sorted(work, key=lambda r: r.arrival)
    n = len(reqs)
    everyone = (1 << n) - 1

    @cache
    def best(t: int, running: tuple[tuple[int, int], ...], started: int) -> float:
        if started == everyone and not running:
            return 0.0
        waiting = [i for i in range(n) if not started >> i & 1 and reqs[i].arrival <= t]
        held = [(reqs[i].prompt_tokens + p, reqs[i].output_tokens - p) for i, p in running]
        result = math.inf
        for mask in range(1 << len(waiting)):
            chosen = [waiting[k] for k in range(len(waiting)) if mask >> k & 1]
            if not running and not chosen and all(started >> i & 1 or reqs[i].arrival <= t for i in range(n)):
                continue  # idle with nothing left to arrive: never better
            if not peak_fits(held + [(reqs[i].prompt_tokens, reqs[i].output_tokens) for i in chosen], memory):
                continue
            done, still = 0.0, []
            for i, p in [*running, *((i, 0) for i in chosen)]:
                if p + 1 == reqs[i].output_tokens:
                    done += t + 1 - reqs[i].arrival
                else:
                    still.append((i, p + 1))
            new = started | sum(1 << i for i in chosen)
            result = min(result, done + best(t + 1, tuple(sorted(still)), new))
        return result

    return best(0, (), 0) / n


def random_work(rng: np.random.Generator, n: int, max_out: int = 8) -> list[WorkloadRequest]:
    return [
        WorkloadRequest(
            f"r{i}", int(rng.integers(0, 5)), int(rng.integers(1, 6)), int(o := rng.integers(1, max_out)), 1, int(o)
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("seed", range(12))
def test_the_program_finds_what_brute_force_finds(seed: int) -> None:
    rng = np.random.default_rng(seed)
    work = random_work(rng, 4 if seed % 2 else 5)
    memory = max(r.prompt_tokens + r.output_tokens for r in work) + int(rng.integers(0, 8))
    opt = exact_optimum(work, memory)
    assert opt.mean_latency == pytest.approx(brute_force(work, memory))
    assert opt.peak_memory <= memory and opt.evictions == 0
    in_order = sorted(work, key=lambda r: r.arrival)
    assert all(lat >= r.output_tokens for lat, r in zip(opt.latencies, in_order, strict=True))


def test_holding_back_a_request_for_a_shorter_one_arriving_later() -> None:
    # A long request (prompt 1, 10 tokens) alone at step 0, memory 11: it fits, and every policy starts it. At
    # step 1 a one-token request with a 9-token prompt arrives: beside the long one (3 tokens at step 1) it needs
    # 10 more, too many, so it waits until step 10 and ends at 11: latencies 10 and 10. Holding the long one back
    # one step lets the short one run at step 1 (latency 1); the long one starts at 2 and ends at 12: 12 and 1.
    work = [WorkloadRequest("long", 0, 1, 10), WorkloadRequest("short", 1, 9, 1)]
    opt = exact_optimum(work, 11)
    assert opt.latencies == [12, 1] and opt.mean_latency == 6.5
    assert simulate(work, make_policy("hsf"), 11).latencies == [10, 10]


@settings(max_examples=25, deadline=None)
@given(
    spec=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 14), st.integers(0, 8)), min_size=1, max_size=7),
    extra=st.integers(0, 20),
)
def test_no_policy_beats_the_optimum_when_evictions_lose_progress(spec, extra) -> None:
    work = [WorkloadRequest(f"r{i}", a, p, o, max(1, o // 2), o * 2) for i, (p, o, a) in enumerate(spec)]
    memory = max(r.prompt_tokens + r.output_tokens for r in work) + extra
    opt = exact_optimum(work, memory).mean_latency
    for policy in ("hsf", "amax", "amin", "amin-learned", "fcfs"):
        assert simulate(work, make_policy(policy), memory, evict_cost="lost").mean_latency >= opt - 1e-9, policy


def test_bad_instances_are_named() -> None:
    with pytest.raises(SimulationError, match="request big needs 12 tokens; memory is 10"):
        exact_optimum([WorkloadRequest("big", 0, 4, 8)], 10)
    with pytest.raises(ValueError, match="at most 3 requests, got 4"):
        exact_optimum([WorkloadRequest(f"r{i}", 0, 1, 1) for i in range(4)], 10, max_requests=3)


def test_simulate_cli_opt(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    write_workload(path, [WorkloadRequest("long", 0, 1, 10), WorkloadRequest("short", 1, 9, 1)])
    cmd = [sys.executable, "-m", "optimist.engine.cli", "simulate", "--workload", str(path), "--memory", "11"]
    out = subprocess.run([*cmd, "--policy", "opt", "--json"], capture_output=True, text=True, check=True)
    summary = json.loads(out.stdout)  # the solver's banner stays off stdout
    assert summary["policy"] == "opt" and summary["mean_latency"] == 6.5 and summary["evictions"] == 0
    out = subprocess.run([*cmd[:-1], "5", "--policy", "opt"], capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip().endswith("request long needs 11 tokens; memory is 5")
