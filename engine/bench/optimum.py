"""`optimist bench optimum`: the policies against the exact optimum on small instances (the second yardstick).

H-SF is a yardstick, not an optimum; on instances small enough for the integer program (engine/scheduler/
optimum.py) the true optimum in hindsight is known, so each policy's mean latency has an exact ratio to it. The
instances are the paper's workload shrunk to a few requests and a memory a few of them share: outputs lognormal
(median 12, clipped to [1, 60]), prompts lognormal (median 4, clipped to [1, 40]), all at step 0 ("batch", the
paper's setting) or one every ~2 steps ("poisson"); intervals around the truth (±50%) or naive ([1, 60]). Under
the "lost" eviction model the optimum bounds every policy from below; under "recompute" an evicting policy can
dip under it (an eviction there is a free pause, which the optimum's model does not have). Prints a table, writes
JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..scheduler.optimum import exact_optimum
from ..scheduler.policies import make_policy
from ..scheduler.simulator import SimulationError, simulate
from ..scheduler.workload import WorkloadRequest, interval, lognormal_lengths
from .report import markdown_table, write_report

POLICIES = ["hsf", "amax", "amin", "amin-learned", "fcfs"]
MAX_OUTPUT = 60


def small_workload(n: int, seed: int, arrivals: str, intervals: str) -> list[WorkloadRequest]:
    rng = np.random.default_rng(seed)
    outputs = lognormal_lengths(rng, n, 12, 1.0, 1, MAX_OUTPUT).tolist()
    prompts = lognormal_lengths(rng, n, 4, 1.0, 1, 40).tolist()
    if arrivals == "batch":
        steps = [0] * n
    elif arrivals == "poisson":
        steps = np.cumsum(rng.poisson(2.0, n)).tolist()
        steps = [s - steps[0] for s in steps]
    else:
        raise ValueError(f"arrivals must be batch or poisson, got {arrivals!r}")
    requests = []
    for i, (o, p, a) in enumerate(zip(outputs, prompts, steps, strict=True)):
        if intervals not in ("noise", "naive"):
            raise ValueError(f"intervals must be noise or naive, got {intervals!r}")
        lo, hi = interval("noise:0.5" if intervals == "noise" else "naive", o, MAX_OUTPUT)
        requests.append(WorkloadRequest(f"r{i}", int(a), int(p), int(o), lo, hi))
    return requests


def _instance(task: tuple[int, int, int, str, str, list[str], float]) -> list[dict[str, Any]]:
    n, memory, seed, arrivals, intervals, policies, time_limit_s = task
    workload = small_workload(n, seed, arrivals, intervals)
    memory = max(memory, max(r.prompt_tokens + r.output_tokens for r in workload))  # every request fits alone
    start = time.perf_counter()
    try:
        opt = exact_optimum(workload, memory, time_limit_s=time_limit_s).mean_latency
    except SimulationError as exc:  # the solver's time ran out: the instance is left out, and counted
        print(f"bench: {arrivals}/{intervals} seed {seed}: {exc}", file=sys.stderr)
        return [{"memory": memory, "seed": seed, "arrivals": arrivals, "intervals": intervals, "unsolved": True}]
    solve_s = time.perf_counter() - start
    runs = []
    for cost in ("lost", "recompute"):
        for policy in policies:
            result = simulate(workload, make_policy(policy), memory, evict_cost=cost)
            runs.append(
                {
                    "memory": memory,
                    "seed": seed,
                    "arrivals": arrivals,
                    "intervals": intervals,
                    "evict_cost": cost,
                    "policy": policy,
                    "mean_latency": result.mean_latency,
                    "opt": opt,
                    "ratio": result.mean_latency / opt,
                    "solve_s": solve_s,
                }
            )
    return runs


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        if r.get("unsolved"):
            continue
        groups[(r["evict_cost"], r["arrivals"], r["intervals"], r["policy"])].append(r)
    rows = []
    for (cost, arrivals, intervals, policy), rs in sorted(groups.items()):
        ratios = [r["ratio"] for r in rs]
        rows.append(
            {
                "evict_cost": cost,
                "arrivals": arrivals,
                "intervals": intervals,
                "policy": policy,
                "instances": len(rs),
                "mean_ratio": sum(ratios) / len(ratios),
                "worst_ratio": max(ratios),
                "best_ratio": min(ratios),
                "at_optimum": sum(abs(x - 1.0) < 1e-9 for x in ratios) / len(ratios),
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]], policies: list[str]) -> str:
    index = {(r["evict_cost"], r["arrivals"], r["intervals"], r["policy"]): r for r in rows}
    keys = sorted({(r["evict_cost"], r["arrivals"], r["intervals"]) for r in rows})
    table = []
    for key in keys:
        cells: list[object] = list(key)
        for p in policies:
            r = index.get((*key, p))
            cells.append(
                "-" if r is None else f"{r['mean_ratio']:.3f} / {r['worst_ratio']:.2f} / {r['at_optimum']:.0%}"
            )
        table.append(cells)
    headers = ["evict", "arrivals", "intervals", *(f"{p}: mean / worst ratio, at opt" for p in policies)]
    return markdown_table(headers, table)


def cmd_bench_optimum(args: argparse.Namespace) -> int:
    tasks = [
        (args.requests, m, s, a, iv, args.policies, args.time_limit)
        for m in args.memory
        for a in args.arrivals
        for iv in args.intervals
        for s in range(args.instances)
    ]
    print(f"bench: {len(tasks)} instances of {args.requests} requests on {args.jobs} processes", file=sys.stderr)
    start = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        runs = [r for batch in pool.map(_instance, tasks) for r in batch]
    print(f"bench: solved in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    rows = aggregate(runs)
    table = format_table(rows, args.policies)
    unsolved = sum(1 for r in runs if r.get("unsolved"))
    if unsolved:
        table += f"\n\n{unsolved} of {len(tasks)} instances left out: the solver did not finish in {args.time_limit} s"
    print(table)
    report = {
        "benchmark": "optimum",
        "unsolved": unsolved,
        "requests": args.requests,
        "instances": args.instances,
        "memory": args.memory,
        "wall_s": round(time.perf_counter() - start, 1),
        "rows": rows,
        "runs": runs,
    }
    write_report(args.out, report, table)
    return 0


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("optimum", help="scheduling policies against the exact optimum on small instances")
    p.add_argument("--requests", type=int, default=8, help="requests per instance (the program grows fast)")
    p.add_argument("--instances", type=int, default=25, help="instances per setting (seeds 0..N-1)")
    p.add_argument("--memory", type=lambda s: [int(x) for x in s.split(",")], default=[64])
    p.add_argument("--arrivals", type=lambda s: s.split(","), default=["batch", "poisson"])
    p.add_argument("--intervals", type=lambda s: s.split(","), default=["noise", "naive"])
    p.add_argument("--policies", type=lambda s: s.split(","), default=POLICIES)
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds the solver may spend on one instance")
    p.add_argument("--jobs", type=int, default=2, help="worker processes")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/optimum.json"))
    p.set_defaults(func=cmd_bench_optimum)
