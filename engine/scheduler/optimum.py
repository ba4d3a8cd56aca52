"""The exact optimum of a small instance: the second yardstick beside H-SF (specs/scheduler.md).

It knows every request's true output length and chooses every start step, minimizing the mean latency under the
simulator's model (memory in tokens; a running request holds its prompt and its tokens so far plus the one it is
producing; one token per running request per step; prefill free). It may hold a request back although it fits,
to leave room for a shorter one arriving later. No request is ever evicted: under the "lost" eviction model an
evicted run only held memory, so dropping it from a schedule changes no finish time, and this optimum is a lower
bound on every policy's mean latency there. Under "recompute" an eviction is a pause, which this model does not
have, so an evicting policy may come out slightly below it.

A time-indexed integer program solved exactly by HiGHS: x[i, s] = 1 when request i starts at step s; each starts
once, at or after its arrival; in every step the requests running then fit the memory; the objective is the sum of
latencies. An optimal schedule leaves no step idle after the last arrival while work remains (shifting the rest
earlier would be feasible and better), so start steps range up to last arrival + all outputs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from .simulator import SimResult, SimulationError
from .workload import WorkloadRequest

MAX_REQUESTS = 40  # the program grows as requests x steps x output length; beyond this it can take minutes


def _highs() -> Any:
    """A silent HiGHS instance (its banner, printed by the first one a process makes, goes to stderr)."""
    import highspy

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        solver = highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    solver.setOptionValue("output_flag", False)
    solver.setOptionValue("mip_rel_gap", 0.0)
    solver.setOptionValue("mip_abs_gap", 0.5)  # latencies are whole steps: within 1 of the best is the best
    return solver


def exact_optimum(
    workload: Sequence[WorkloadRequest], memory: int, max_requests: int = MAX_REQUESTS, time_limit_s: float = 300.0
) -> SimResult:
    """The schedule with the least mean latency, as a SimResult of policy "opt" (eviction model "none")."""
    import highspy

    if not workload:
        raise ValueError("the workload is empty")
    if len(workload) > max_requests:
        raise ValueError(f"the exact optimum takes at most {max_requests} requests, got {len(workload)}")
    reqs = sorted(workload, key=lambda r: r.arrival)
    for r in reqs:
        if r.prompt_tokens + r.output_tokens > memory:
            raise SimulationError(
                f"request {r.id} needs {r.prompt_tokens + r.output_tokens} tokens; memory is {memory}"
            )
    horizon = max(r.arrival for r in reqs) + sum(r.output_tokens for r in reqs)

    # columns: one per (request, start step)
    owner, start = [], []
    for i, r in enumerate(reqs):
        for s in range(r.arrival, horizon - r.output_tokens + 1):
            owner.append(i)
            start.append(s)
    owner_a, start_a = np.asarray(owner), np.asarray(start)
    out = np.asarray([r.output_tokens for r in reqs])[owner_a]
    prompt = np.asarray([r.prompt_tokens for r in reqs])[owner_a]
    arrival = np.asarray([r.arrival for r in reqs])[owner_a]
    cols = len(owner)

    # rows: "starts once" per request, then "fits" per step; built column by column (CSC)
    n = len(reqs)
    starts_at, rows, values = [0], [], []
    for c in range(cols):
        steps = np.arange(start_a[c], start_a[c] + out[c])
        rows.append(np.concatenate(([owner_a[c]], n + steps)))
        values.append(np.concatenate(([1.0], prompt[c] + (steps - start_a[c]) + 1.0)))
        starts_at.append(starts_at[-1] + len(steps) + 1)
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = cols, n + horizon
    lp.col_cost_ = (start_a + out - arrival).astype(np.float64)
    lp.col_lower_, lp.col_upper_ = np.zeros(cols), np.ones(cols)
    lp.row_lower_ = np.concatenate((np.ones(n), np.full(horizon, -highspy.kHighsInf)))
    lp.row_upper_ = np.concatenate((np.ones(n), np.full(horizon, float(memory))))
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.asarray(starts_at, dtype=np.int32)
    lp.a_matrix_.index_ = np.concatenate(rows).astype(np.int32)
    lp.a_matrix_.value_ = np.concatenate(values)
    lp.integrality_ = [highspy.HighsVarType.kInteger] * cols

    solver = _highs()
    solver.setOptionValue("time_limit", float(time_limit_s))
    solver.passModel(lp)
    solver.run()
    status = solver.getModelStatus()
    if status != highspy.HighsModelStatus.kOptimal:
        raise SimulationError(f"the exact optimum was not found: {solver.modelStatusToString(status)}")
    x = np.asarray(solver.getSolution().col_value)
    chosen = np.flatnonzero(x > 0.5)
    starts = {int(owner_a[c]): int(start_a[c]) for c in chosen}
    if sorted(starts) != list(range(n)):
        raise SimulationError("the solver's schedule does not start every request once")
    return _result(reqs, starts, memory)


def _result(reqs: Sequence[WorkloadRequest], starts: dict[int, int], memory: int) -> SimResult:
    """The schedule's numbers, checked: every step fits the memory."""
    finish = {i: starts[i] + r.output_tokens for i, r in enumerate(reqs)}
    peak = 0
    for t in range(max(finish.values())):
        held = sum(r.prompt_tokens + (t - starts[i]) + 1 for i, r in enumerate(reqs) if starts[i] <= t < finish[i])
        peak = max(peak, held)
    if peak > memory:
        raise SimulationError(f"the solver's schedule holds {peak} tokens; memory is {memory}")
    latencies = [finish[i] - r.arrival for i, r in enumerate(reqs)]
    ordered = sorted(latencies)
    return SimResult(
        policy="opt",
        requests=len(reqs),
        memory=memory,
        evict_cost="none",
        mean_latency=sum(latencies) / len(latencies),
        p99_latency=float(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]),
        makespan=max(finish.values()),
        evictions=0,
        wasted_tokens=0,
        peak_memory=peak,
        latencies=latencies,
    )
