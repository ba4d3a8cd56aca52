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
    def waiting_key(self, job: Job) -> tuple[float, ...]: ...

    def prepare(self, jobs: Sequence[Job], running: Sequence[Job] = ()) -> None:  # noqa: B027 (a hook)
        """Called with the waiting jobs (and the running ones) before they are sorted by `waiting_key`."""

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

    def waiting_key(self, job: Job) -> tuple[float, ...]:
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

    def waiting_key(self, job: Job) -> tuple[float, ...]:
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

    def waiting_key(self, job: Job) -> tuple[float, ...]:
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


class GittinsTable:
    """Gittins indices of jobs under a learned output-length distribution, with memory as the cost.

    A job of prompt `p` that has produced `a` tokens and is known to end within (k, u] (k >= a: it ran k tokens
    before, u: its upper bound) holds p + x + 1 tokens while it produces token x + 1. Run for up to d more steps,
    it finishes with probability F(d) and uses E[memory-time](d). Its index is max over d of F(d) / E[cost](d):
    the chance of finishing per unit of KV memory-time spent, at the best horizon (Gittins 1979; the memory-time
    cost is ours: the server's scarce resource is KV memory, not time, and every running job advances one token a
    step). Serving the highest index first is what a non-clairvoyant scheduler can do best with a known length
    distribution when preemption is free; short prompts and jobs past the distribution's early deaths score high,
    jobs that survived into its long tail score low.
    """

    HORIZONS = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192])

    def __init__(self, survival: np.ndarray) -> None:
        self.limit = len(survival) - 1  # S[x] = 0 for x >= limit
        pad = np.concatenate([survival, np.zeros(int(self.HORIZONS[-1]) + 1)])
        x = np.arange(len(pad), dtype=np.float64)
        self.s = pad
        self.cum_s = np.concatenate([[0.0], np.cumsum(pad)])  # cum_s[i] = sum of S[x] for x < i
        self.cum_xs = np.concatenate([[0.0], np.cumsum(x * pad)])

    def indices(self, age: np.ndarray, known: np.ndarray, prompt: np.ndarray, upper: np.ndarray) -> np.ndarray:
        """Vectorised over jobs: age a, known k (length > k), prompt p, upper u (length <= u)."""
        a = age.astype(np.int64)[:, None]
        k = np.clip(np.maximum(known, age), 0, self.limit).astype(np.int64)[:, None]
        u = np.clip(np.maximum(upper, k[:, 0] + 1), 1, self.limit + 1).astype(np.int64)[:, None]
        p1 = prompt.astype(np.float64)[:, None] + 1.0
        e = a + self.HORIZONS[None, :]
        s_u = self.s[u]
        mass = self.s[k] - s_u
        flat = mass <= 1e-12  # no learned mass left in (k, u]: treat the job as ending at u
        mass = np.where(flat, 1.0, mass)

        def alive(x: np.ndarray) -> np.ndarray:  # P(length > x | k < length <= u)
            tail = np.where(flat, 1.0, (self.s[np.minimum(x, len(self.s) - 1)] - s_u) / mass)
            return np.where(x <= k, 1.0, np.where(x >= u, 0.0, tail))

        # Steps at ages [a, min(e, k + 1)): certainly alive.
        e1 = np.minimum(e, k + 1)
        n1 = np.maximum(e1 - a, 0)
        cost = n1 * p1 + (e1 * (e1 - 1) - a * (a - 1)) / 2 * (n1 > 0)
        # Ages [k + 1, min(e, u)): alive with the learned conditional survival (or surely, when it has no mass).
        lo, hi = np.maximum(a, k + 1), np.minimum(e, u)
        n2 = np.maximum(hi - lo, 0)
        hi = np.maximum(hi, lo)
        sum_x = (hi * (hi - 1) - lo * (lo - 1)) / 2
        learned = p1 * (self.cum_s[hi] - self.cum_s[lo]) + self.cum_xs[hi] - self.cum_xs[lo] - s_u * (n2 * p1 + sum_x)
        cost = cost + np.where(flat, n2 * p1 + sum_x, learned / mass)
        done = 1.0 - alive(e)
        return np.asarray(np.max(done / np.maximum(cost, 1e-12), axis=1))


class AMinLearned(AMin):
    """Ours: A_min for requests with length hints, Gittins-index scheduling for requests without.

    With naive intervals every request looks the same to A_min, which then evicts the least progress and lands
    near FCFS. This policy learns the output-length distribution online (`LengthDistribution`: finished requests
    observed, running ones censored) and, for requests without hints, admits in order of their Gittins index and
    evicts the lowest index (`GittinsTable`): output lengths are heavy-tailed, so a request that has run long is
    expected to run on and holds the most memory, while fresh requests with short prompts are the likeliest to
    finish per unit of memory. When eviction throws progress away, a victim's index is weighted up by
    `lost_weight` per token it would lose. Admission stays A_min's optimistic test. Requests with hints keep
    A_min's order (ahead of the uninformed) and, while most running requests carry hints, A_min's victim, so its
    results there are A_min's.
    """

    name = "amin-learned"

    def __init__(
        self, growth: str = "increment", cap: int = 8192, lost_weight: float = 0.05, refresh: float = 0.05
    ) -> None:
        super().__init__(growth)
        self.lengths = LengthDistribution(cap)
        self.lost_weight = lost_weight
        self.refresh = refresh  # rebuild the index table when the finished count grew by this fraction
        self._table: GittinsTable | None = None
        self._built_at = 0.0
        self._cache: dict[tuple[int, int, int, int], float] = {}

    def on_finished(self, job: Job) -> None:
        self.lengths.observe(job.produced)

    def _known(self, job: Job) -> int:
        # What a job is known to exceed: its progress; in the lost model also the progress an eviction erased
        # (A_min keeps it as the bound). In the engine the bound may be a prediction, not knowledge.
        return max(job.produced, job.bound - 1) if self.eviction_loses_progress else job.produced

    def _key(self, job: Job) -> tuple[int, int, int, int]:
        return (job.produced, self._known(job), job.prompt_len, job.upper)

    def prepare(self, jobs: Sequence[Job], running: Sequence[Job] = ()) -> None:
        """Rebuilds the table when enough has been learned and computes missing indices in one vectorised pass."""
        finished = float(self.lengths.finished.sum())
        if finished == 0:
            return
        if self._table is None or finished >= self._built_at * (1 + self.refresh) + 1:
            self._table = GittinsTable(self.lengths.survival([j.produced for j in running]))
            self._built_at = finished
            self._cache = {}
        keys = {self._key(j) for j in jobs if not j.informed} - self._cache.keys()
        if keys:
            arr = np.array(sorted(keys), dtype=np.int64).reshape(-1, 4)
            values = self._table.indices(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3])
            self._cache.update(zip(map(tuple, arr.tolist()), values.tolist(), strict=True))  # type: ignore[arg-type]

    def index(self, job: Job) -> float:
        key = self._key(job)
        if key not in self._cache:
            self.prepare([job])
        return self._cache.get(key, 0.0)

    def waiting_key(self, job: Job) -> tuple[float, ...]:
        if job.informed:
            return (0, job.bound, job.seq, job.prompt_len)
        if self._table is None:  # nothing learned yet: shortest prompt first
            return (1, 0.0, job.prompt_len, job.seq)
        return (1, -self.index(job), job.seq, job.prompt_len)

    def victim(self, running: Sequence[J]) -> J:
        uninformed = [j for j in running if not j.informed]
        if len(uninformed) * 2 < len(running) or not self.lengths.finished.any():
            return super().victim(running)
        self.prepare(uninformed, running)
        weight = self.lost_weight if self.eviction_loses_progress else 0.0

        def score(j: J) -> tuple[float, int]:
            return (self.index(j) * (1.0 + weight * j.produced), -j.seq)

        return min(uninformed, key=score)  # requests with hints are A_min's to judge, and kept


class FCFS(Policy):
    """vLLM-like: arrival order; admits while the next step fits (no look-ahead); preempts the newest admission."""

    name = "fcfs"

    def waiting_key(self, job: Job) -> tuple[float, ...]:
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
