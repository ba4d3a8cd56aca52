"""Scheduling policies, shared by the engine (memory in KV blocks, time in engine steps) and the simulator
(memory in tokens, time in simulated steps). See ../shared/specs/scheduler.md.

A policy answers four questions about `Job`s (anything with the attributes below: the engine's `Request`, the
simulator's `SimJob`):
- in which order waiting jobs are considered (`waiting_key`);
- whether a candidate may join the running set (`admit`): the forward-looking test of MC-SF, where every member
  is assumed to produce `planned_output` tokens in total and the set's memory, which peaks at one of the members'
  planned end steps, must stay within capacity (FCFS instead checks only the next step);
- which running job to evict when memory really overflows (`victim`);
- how a job's pseudo lower bound moves (`on_bound_reached`, `on_evicted`): only A_min keeps one.

Policies are stateless apart from their parameters; per-job state (the bound) lives on the job.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

import numpy as np


class Job(Protocol):
    seq: int  # arrival order
    admitted_seq: int  # order of the latest admission
    bound: int  # A_min's pseudo lower bound on the total output length

    @property
    def prompt_len(self) -> int: ...

    @property
    def produced(self) -> int: ...  # output tokens produced so far (and held in memory while running)

    @property
    def lower(self) -> int: ...  # predicted interval of the total output length

    @property
    def upper(self) -> int: ...

    @property
    def true_output(self) -> int | None: ...  # known only to the hindsight policy's driver

    @property
    def informed(self) -> bool: ...  # whether [lower, upper] carries per-request information (a client hint)


J = TypeVar("J", bound=Job)


Cost = Callable[[int], int]  # tokens held -> memory units (KV blocks in the engine); None means tokens


def peak_fits(members: Sequence[tuple[int, int]], capacity: int, cost: Cost | None = None) -> bool:
    """Whether a set fits over its whole planned future.

    members: (tokens held now, steps still to run) per job; a job holding h with r steps left holds h + t tokens at
    step t <= r and nothing after. Memory peaks at some member's last step r_k, where every job with r_j >= r_k
    holds h_j + r_k. In tokens this is O(n log n); with a `cost` (block rounding) each end step is summed anew.
    """
    ordered = sorted(members, key=lambda m: m[1], reverse=True)
    held = count = 0
    i = 0
    while i < len(ordered):
        r = ordered[i][1]
        while i < len(ordered) and ordered[i][1] == r:  # all jobs ending at r are still there at r
            held += ordered[i][0]
            count += 1
            i += 1
        if cost is None:
            if held + count * r > capacity:
                return False
        elif sum(cost(h + r) for h, _ in ordered[:count]) > capacity:
            return False
    return True


class Policy(ABC):
    name: str
    evicts = True  # whether overflow can happen (policies with an exact admission test never overflow)
    eviction_loses_progress = False  # set by the driver: True in the simulator's "lost" model

    @abstractmethod
    def waiting_key(self, job: Job) -> tuple[int, ...]: ...

    def planned_output(self, job: Job) -> int:
        """The total output length the admission test assumes for `job`."""
        raise NotImplementedError

    def admit(self, running: Sequence[Job], candidate: Job, capacity: int, cost: Cost | None = None) -> bool:
        if not running:  # alone, a job runs whatever its plan says: a bound past capacity must not starve it
            return _cost(cost, candidate.prompt_len + candidate.produced + 1) <= capacity
        members = [
            (j.prompt_len + j.produced, max(1, self.planned_output(j) - j.produced)) for j in (*running, candidate)
        ]
        return peak_fits(members, capacity, cost)

    def victim(self, running: Sequence[J]) -> J:
        """The job to evict on overflow: least progress first, the latest arrival among equals."""
        return min(running, key=lambda j: (j.produced, -j.seq))

    def on_bound_reached(self, job: Job) -> None:  # noqa: B027 (a hook: only A_min keeps a bound)
        """Called when a running job has produced `bound` tokens without finishing."""

    def on_evicted(self, job: Job) -> None:  # noqa: B027
        """Called after `job` is evicted (with its produced count as it was before eviction)."""

    def on_finished(self, job: Job) -> None:  # noqa: B027
        """Called when a job finished with `produced` tokens: its true length, for policies that learn."""


class HindsightShortestFirst(Policy):
    """H-SF: knows the true output lengths; shortest first; never evicts. The yardstick."""

    name = "hsf"
    evicts = False

    def waiting_key(self, job: Job) -> tuple[int, ...]:
        return (self._true(job), job.seq, job.prompt_len)

    def planned_output(self, job: Job) -> int:
        return self._true(job)

    @staticmethod
    def _true(job: Job) -> int:
        if job.true_output is None:
            raise ValueError("the hindsight policy needs true output lengths (simulator only)")
        return job.true_output


class AMax(Policy):
    """Conservative: orders by and plans with the upper bound; never evicts."""

    name = "amax"
    evicts = False

    def waiting_key(self, job: Job) -> tuple[int, ...]:
        return (job.upper, job.seq, job.prompt_len)

    def planned_output(self, job: Job) -> int:
        return max(job.upper, job.produced + 1)


class AMin(Policy):
    """Optimistic (Chen, Ye, Zhou 2025): plans with a pseudo lower bound that rises as tokens are produced, and on
    real overflow evicts the jobs with the least progress first.

    growth: how the bound rises when reached without finishing: "increment" (to tokens so far + 1) or "double".
    """

    name = "amin"

    def __init__(self, growth: str = "increment") -> None:
        if growth not in ("increment", "double"):
            raise ValueError(f"growth must be increment or double, got {growth!r}")
        self.growth = growth

    def waiting_key(self, job: Job) -> tuple[int, ...]:
        return (job.bound, job.seq, job.prompt_len)

    def planned_output(self, job: Job) -> int:
        return max(job.bound, job.produced + 1)

    def on_bound_reached(self, job: Job) -> None:
        job.bound = job.produced + 1 if self.growth == "increment" else max(job.produced + 1, 2 * job.bound)

    def on_evicted(self, job: Job) -> None:
        job.bound = max(job.bound, job.produced)


class LengthDistribution:
    """Kaplan-Meier estimate of the output-length distribution, learned online with no per-request information:
    finished jobs are observed lengths, running jobs right-censored ones (their length exceeds what they produced
    so far), so early completions, which are the short ones, do not bias it."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.finished = np.zeros(cap + 2)

    def observe(self, length: int) -> None:
        self.finished[min(length, self.cap)] += 1

    def survival(self, censored: Sequence[int]) -> np.ndarray:
        """S[x] = P(length > x) for x in 0..cap+1, given lengths known to exceed each value in `censored`.

        A job that produced c tokens and runs on has length >= c + 1: it is at risk of ending at every x <= c + 1.
        """
        known = np.minimum(np.asarray(censored, dtype=np.int64) + 1, self.cap + 1)
        cens = np.bincount(known, minlength=self.cap + 2)
        at_risk = np.cumsum((self.finished + cens)[::-1])[::-1]
        hazard = np.divide(self.finished, at_risk, out=np.zeros_like(self.finished), where=at_risk > 0)
        return np.asarray(np.cumprod(1.0 - hazard))


class AMinLearned(AMin):
    """Ours: A_min, plus an eviction rule for requests that carry no length information.

    With naive intervals every request looks the same to A_min, which then evicts the least progress and lands
    near FCFS. Output lengths are heavy-tailed: the longer a request has run, the longer it is expected to go on
    (a decreasing hazard rate). So among uninformed requests this policy evicts the one with the largest expected
    remaining length, estimated from the lengths seen so far (`LengthDistribution`), less `penalty` per token the
    eviction would throw away when eviction loses progress. While most running requests carry a hint (an
    informative interval), it evicts exactly as A_min does, so its results there are A_min's.
    """

    name = "amin-learned"

    def __init__(self, growth: str = "increment", cap: int = 8192, penalty: float = 0.5) -> None:
        super().__init__(growth)
        self.lengths = LengthDistribution(cap)
        self.penalty = penalty

    def on_finished(self, job: Job) -> None:
        self.lengths.observe(job.produced)

    def victim(self, running: Sequence[J]) -> J:
        informed = sum(1 for j in running if j.informed)
        if informed * 2 > len(running) or not self.lengths.finished.any():
            return super().victim(running)
        cap = self.lengths.cap
        surv = self.lengths.survival([j.produced for j in running])
        prefix = np.concatenate([[0.0], np.cumsum(surv)])  # prefix[k] = sum of S[x] for x < k

        def score(j: J) -> float:
            a, u = j.produced, min(j.upper, cap)
            lo = min(max(a, j.lower - 1), u)
            mass = surv[lo] - surv[u]
            # E[length - a | lo < length <= u] from the survival curve; uniform where it has no mass left.
            if u <= lo:
                remaining = 1.0
            elif mass <= 1e-9:
                remaining = (u - lo) / 2 + (lo - a)
            else:
                remaining = float(prefix[u] - prefix[lo] - (u - lo) * surv[u]) / mass + (lo - a)
            return remaining - (self.penalty * a if self.eviction_loses_progress else 0.0)

        return max(running, key=lambda j: (score(j), j.seq))


class FCFS(Policy):
    """vLLM-like: arrival order; admits while the next step fits (no look-ahead); preempts the newest admission."""

    name = "fcfs"

    def waiting_key(self, job: Job) -> tuple[int, ...]:
        return (job.seq,)

    def admit(self, running: Sequence[Job], candidate: Job, capacity: int, cost: Cost | None = None) -> bool:
        return sum(_cost(cost, j.prompt_len + j.produced + 1) for j in (*running, candidate)) <= capacity

    def victim(self, running: Sequence[J]) -> J:
        return max(running, key=lambda j: j.admitted_seq)


def _cost(cost: Cost | None, tokens: int) -> int:
    return tokens if cost is None else cost(tokens)


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (HindsightShortestFirst, AMax, AMin, AMinLearned, FCFS)}


def make_policy(name: str, **params: object) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown scheduler {name!r} (choose from {', '.join(sorted(POLICIES))})")
    return POLICIES[name](**params)
