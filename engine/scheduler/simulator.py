"""Discrete-event simulator of one LLM server (memory in tokens, time in steps), driving the shared policies.

Each step: admit waiting jobs in the policy's order while its admission test passes (stopping at the first that
does not); make room for the step (every running job needs one more token) by evicting the policy's victims; run
the step (each running job produces a token); retire jobs that produced their true length. A step that admits
prompts of total length P lasts 1 + ceil(P / C) steps when prefill costs C tokens per step.

Time counts finished steps: a job that arrives at 0 and runs alone finishes at its output length, its latency.
An evicted job loses its produced tokens ("lost", the paper's model) or keeps them and is re-prefilled with its
prompt ("recompute", the engine's model); either way its KV memory is freed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from .policies import Policy
from .workload import WorkloadRequest


@dataclass(eq=False)  # identity: distinct requests are never equal, and list lookups compare pointers
class SimJob:
    id: str
    arrival: int
    prompt_len: int
    true_len: int
    lower: int
    upper: int
    seq: int
    bound: int = 0
    admitted_seq: int = -1
    produced: int = 0
    finished_at: int | None = None
    evictions: int = 0
    wasted_tokens: int = 0  # KV tokens (prompt + produced) thrown away by evictions
    needs_prefill: bool = True
    informed: bool = True

    @property
    def true_output(self) -> int:
        return self.true_len


@dataclass
class SimResult:
    policy: str
    requests: int
    memory: int
    evict_cost: str
    mean_latency: float
    p99_latency: float
    makespan: int
    evictions: int
    wasted_tokens: int
    peak_memory: int
    latencies: list[int] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "latencies"}


class SimulationError(RuntimeError):
    """The run cannot finish (a request larger than memory, or no progress)."""


def simulate(
    workload: Sequence[WorkloadRequest],
    policy: Policy,
    memory: int,
    evict_cost: str = "lost",
    prefill_tokens_per_step: float = math.inf,
    max_steps: int = 10_000_000,
) -> SimResult:
    if evict_cost not in ("lost", "recompute"):
        raise ValueError(f"evict_cost must be lost or recompute, got {evict_cost!r}")
    max_out = max(r.output_tokens for r in workload)
    jobs = [
        SimJob(r.id, r.arrival, r.prompt_tokens, r.output_tokens, r.lower or 1, r.upper or max_out, seq=i)
        for i, r in enumerate(sorted(workload, key=lambda r: r.arrival))
    ]
    for j in jobs:
        j.bound = j.lower
        j.informed = j.lower > 1 or j.upper < max_out  # naive intervals carry no per-request information
        if j.prompt_len + j.true_len > memory:
            raise SimulationError(f"request {j.id} needs {j.prompt_len + j.true_len} tokens; memory is {memory}")
    policy.eviction_loses_progress = evict_cost == "lost"
    pending = list(reversed(jobs))  # pop() yields the next arrival
    waiting: list[SimJob] = []
    running: list[SimJob] = []
    t = 0
    admissions = evictions = peak = 0
    idle_steps = 0
    while pending or waiting or running:
        while pending and pending[-1].arrival <= t:
            waiting.append(pending.pop())
        if not waiting and not running:
            t = pending[-1].arrival
            continue

        prefill = 0
        policy.prepare(waiting, running)
        waiting.sort(key=policy.waiting_key)
        while waiting and policy.admit(running, waiting[0], memory):
            job = waiting.pop(0)
            job.admitted_seq = admissions
            admissions += 1
            running.append(job)
            if job.needs_prefill:
                prefill += job.prompt_len + job.produced
                job.needs_prefill = False

        # Room for this step's tokens: evict until every running job can grow by one.
        while running and sum(j.prompt_len + j.produced + 1 for j in running) > memory:
            victim = policy.victim(running)
            running.remove(victim)
            victim.evictions += 1
            evictions += 1
            victim.wasted_tokens += victim.prompt_len + victim.produced
            policy.on_evicted(victim)
            if evict_cost == "lost":
                victim.produced = 0
            victim.needs_prefill = True
            waiting.append(victim)

        if not running:
            idle_steps += 1
            if idle_steps > 2 and not pending:
                raise SimulationError(f"no job can be admitted at step {t} ({policy.name})")
            t += 1
            continue
        idle_steps = 0
        duration = 1 + (
            math.ceil(prefill / prefill_tokens_per_step) if prefill and prefill_tokens_per_step < math.inf else 0
        )
        t += duration
        peak = max(peak, sum(j.prompt_len + j.produced + 1 for j in running))
        still: list[SimJob] = []
        for j in running:
            j.produced += 1
            if j.produced >= j.true_len:
                j.finished_at = t
                policy.on_finished(j)
            else:
                if j.produced >= j.bound:
                    policy.on_bound_reached(j)
                still.append(j)
        running = still
        if t > max_steps:
            raise SimulationError(f"no finish after {max_steps} steps ({policy.name})")

    latencies = [j.finished_at - j.arrival for j in jobs if j.finished_at is not None]
    ordered = sorted(latencies)
    return SimResult(
        policy=policy.name,
        requests=len(jobs),
        memory=memory,
        evict_cost=evict_cost,
        mean_latency=sum(latencies) / len(latencies),
        p99_latency=float(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]),
        makespan=t,
        evictions=evictions,
        wasted_tokens=sum(j.wasted_tokens for j in jobs),
        peak_memory=peak,
        latencies=latencies,
    )
