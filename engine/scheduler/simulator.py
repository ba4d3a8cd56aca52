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
    first_admitted: int | None = None

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


class SimServer:
    """One server's queue and running set; `step(t)` runs the step that starts at time t (the simulator's loop
    body, shared by `simulate` and the fleet simulator)."""

    def __init__(
        self,
        policy: Policy,
        memory: int,
        evict_cost: str = "lost",
        prefill_tokens_per_step: float = math.inf,
    ) -> None:
        if evict_cost not in ("lost", "recompute"):
            raise ValueError(f"evict_cost must be lost or recompute, got {evict_cost!r}")
        self.policy = policy
        self.memory = memory
        self.evict_cost = evict_cost
        self.prefill_tokens_per_step = prefill_tokens_per_step
        policy.eviction_loses_progress = evict_cost == "lost"
        self.waiting: list[SimJob] = []
        self.running: list[SimJob] = []
        self.admissions = self.evictions = self.peak = 0

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def held(self) -> int:
        """KV tokens the running jobs hold."""
        return sum(j.prompt_len + j.produced for j in self.running)

    def step(self, t: int) -> tuple[int, bool]:
        """Admits, evicts, runs one step from t; returns (its duration, whether any job ran). Jobs that finish get
        `finished_at` = t + duration and leave the server."""
        policy, memory, waiting = self.policy, self.memory, self.waiting
        prefill = 0
        policy.prepare(waiting, self.running)
        waiting.sort(key=policy.waiting_key)
        while waiting and policy.admit(self.running, waiting[0], memory):
            job = waiting.pop(0)
            job.admitted_seq = self.admissions
            if job.first_admitted is None:
                job.first_admitted = t
            self.admissions += 1
            self.running.append(job)
            if job.needs_prefill:
                prefill += job.prompt_len + job.produced
                job.needs_prefill = False

        # Room for this step's tokens: evict until every running job can grow by one.
        running = self.running
        while running and sum(j.prompt_len + j.produced + 1 for j in running) > memory:
            victim = policy.victim(running)
            running.remove(victim)
            victim.evictions += 1
            self.evictions += 1
            victim.wasted_tokens += victim.prompt_len + victim.produced
            policy.on_evicted(victim)
            if self.evict_cost == "lost":
                victim.produced = 0
            victim.needs_prefill = True
            waiting.append(victim)

        if not running:
            return 1, False
        per_step = self.prefill_tokens_per_step
        duration = 1 + (math.ceil(prefill / per_step) if prefill and per_step < math.inf else 0)
        end = t + duration
        self.peak = max(self.peak, sum(j.prompt_len + j.produced + 1 for j in running))
        still: list[SimJob] = []
        for j in running:
            j.produced += 1
            if j.produced >= j.true_len:
                j.finished_at = end
                policy.on_finished(j)
            else:
                if j.produced >= j.bound:
                    policy.on_bound_reached(j)
                still.append(j)
        self.running = still
        return duration, True


def make_jobs(workload: Sequence[WorkloadRequest], memory: int) -> list[SimJob]:
    """The workload's requests as jobs in arrival order (naive intervals default to [1, longest output])."""
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
    return jobs


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile by rank (the simulator's p99: no interpolation)."""
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


def simulate(
    workload: Sequence[WorkloadRequest],
    policy: Policy,
    memory: int,
    evict_cost: str = "lost",
    prefill_tokens_per_step: float = math.inf,
    max_steps: int = 10_000_000,
) -> SimResult:
    server = SimServer(policy, memory, evict_cost, prefill_tokens_per_step)
    jobs = make_jobs(workload, memory)
    pending = list(reversed(jobs))  # pop() yields the next arrival
    t = 0
    idle_steps = 0
    while pending or server.busy:
        while pending and pending[-1].arrival <= t:
            server.waiting.append(pending.pop())
        if not server.busy:
            t = pending[-1].arrival
            continue
        duration, ran = server.step(t)
        t += duration
        if not ran:
            idle_steps += 1
            if idle_steps > 2 and not pending:
                raise SimulationError(f"no job can be admitted at step {t - 1} ({policy.name})")
            continue
        idle_steps = 0
        if t > max_steps:
            raise SimulationError(f"no finish after {max_steps} steps ({policy.name})")

    latencies = [j.finished_at - j.arrival for j in jobs if j.finished_at is not None]
    return SimResult(
        policy=policy.name,
        requests=len(jobs),
        memory=memory,
        evict_cost=evict_cost,
        mean_latency=sum(latencies) / len(latencies),
        p99_latency=percentile(latencies, 0.99),
        makespan=t,
        evictions=server.evictions,
        wasted_tokens=sum(j.wasted_tokens for j in jobs),
        peak_memory=server.peak,
        latencies=latencies,
    )
