"""`optimist bench schedule`: the scheduling policies on the paper's workload, in the simulator.

2,000 requests at time 0 (outputs lognormal, median ~120, clipped to [1, 1000]; prompts lognormal, median ~40),
KV memory M in {8192, 16384, 32768}, intervals naive [1, 1000], width-100 bins, or relative noise ±x; three seeds
each. Reports each policy's mean latency and its ratio to the hindsight yardstick H-SF, evictions and wasted KV
tokens, for both eviction models. Prints a table, writes JSON, and plots the ratio against interval width.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from ..scheduler.policies import make_policy
from ..scheduler.simulator import simulate
from ..scheduler.workload import paper_workload
from .report import markdown_table, write_report

INTERVALS = ["bins", "noise:0.1", "noise:0.3", "noise:0.5", "noise:0.7", "noise:0.9", "naive"]


def _one(task: tuple[str, int, int, str, str, int]) -> dict[str, Any]:
    policy, memory, seed, intervals, evict_cost, n = task
    start = time.perf_counter()
    result = simulate(paper_workload(n, seed, intervals), make_policy(policy), memory, evict_cost=evict_cost)
    return {
        "policy": policy,
        "memory": memory,
        "seed": seed,
        "intervals": intervals,
        "evict_cost": evict_cost,
        "mean_latency": result.mean_latency,
        "evictions": result.evictions,
        "wasted_tokens": result.wasted_tokens,
        "seconds": time.perf_counter() - start,
    }


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean over seeds per (evict_cost, memory, intervals, policy), with the ratio to H-SF of the same seeds."""
    hsf = {
        (r["evict_cost"], r["memory"], r["intervals"], r["seed"]): r["mean_latency"]
        for r in runs
        if r["policy"] == "hsf"
    }
    groups: dict[tuple[str, int, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        groups[(r["evict_cost"], r["memory"], r["intervals"], r["policy"])].append(r)
    rows = []
    for (cost, memory, intervals, policy), rs in sorted(groups.items()):
        ratios = [r["mean_latency"] / hsf[(cost, memory, intervals, r["seed"])] for r in rs]
        rows.append(
            {
                "evict_cost": cost,
                "memory": memory,
                "intervals": intervals,
                "policy": policy,
                "seeds": len(rs),
                "mean_latency": sum(r["mean_latency"] for r in rs) / len(rs),
                "ratio_to_hsf": sum(ratios) / len(ratios),
                "evictions": sum(r["evictions"] for r in rs) / len(rs),
                "wasted_tokens": sum(r["wasted_tokens"] for r in rs) / len(rs),
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]], policies: list[str]) -> str:
    evicting = [p for p in policies if p not in ("hsf", "amax")]
    headers = ["evict", "M", "intervals", *(f"{p} latency (xH-SF)" for p in policies)]
    headers += [f"{p} evictions / wasted" for p in evicting]
    index = {(r["evict_cost"], r["memory"], r["intervals"], r["policy"]): r for r in rows}
    order = {iv: i for i, iv in enumerate(INTERVALS)}
    keys = sorted(
        {(r["evict_cost"], r["memory"], r["intervals"]) for r in rows}, key=lambda k: (k[0], k[1], order.get(k[2], 99))
    )
    table = []
    for cost, memory, intervals in keys:
        found = [index.get((cost, memory, intervals, p)) for p in policies]
        cells: list[object] = [cost, memory, intervals]
        cells += ["-" if r is None else f"{r['mean_latency']:.0f} ({r['ratio_to_hsf']:.2f})" for r in found]
        cells += [
            "-" if r is None else f"{r['evictions']:.0f} / {r['wasted_tokens'] / 1000:.0f}K"
            for p, r in zip(policies, found, strict=True)
            if p in evicting
        ]
        table.append(cells)
    return markdown_table(headers, table)


def plot(rows: list[dict[str, Any]], policies: list[str], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed (pip install '.[bench]'); no plot", file=sys.stderr)
        return False
    costs = sorted({r["evict_cost"] for r in rows})
    memories = sorted({r["memory"] for r in rows})
    fig, axes = plt.subplots(len(costs), len(memories), figsize=(4.5 * len(memories), 3.6 * len(costs)), squeeze=False)
    index = {(r["evict_cost"], r["memory"], r["intervals"], r["policy"]): r for r in rows}
    present = [iv for iv in INTERVALS if any(r["intervals"] == iv for r in rows)]
    labels = [iv.replace("noise:", "±") for iv in present]
    for i, cost in enumerate(costs):
        for j, memory in enumerate(memories):
            ax = axes[i][j]
            for p in policies:
                ys = [
                    index[(cost, memory, iv, p)]["ratio_to_hsf"] if (cost, memory, iv, p) in index else math.nan
                    for iv in present
                ]
                ax.plot(labels, ys, marker="o", label=p)
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
            ax.set_yscale("log")
            ax.set_title(f"M={memory}, eviction: {cost}", fontsize=10)
            ax.set_xlabel("interval (narrow → wide)")
            ax.set_ylabel("mean latency / H-SF")
            ax.tick_params(axis="x", labelrotation=30)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def cmd_bench_schedule(args: argparse.Namespace) -> int:
    tasks = [
        (p, m, s, iv, c, args.requests)
        for c in args.evict_cost
        for m in args.memory
        for iv in args.intervals
        for s in range(args.seeds)
        for p in sorted(set(args.policies) | {"hsf"})
    ]
    print(f"bench: {len(tasks)} simulations on {args.jobs} processes", file=sys.stderr)
    start = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(_one, tasks, chunksize=4))
    rows = aggregate(runs)
    table = format_table(rows, args.policies)
    print(table)
    report = {
        "benchmark": "schedule",
        "requests": args.requests,
        "seeds": args.seeds,
        "wall_s": round(time.perf_counter() - start, 1),
        "rows": rows,
        "runs": runs,
    }
    write_report(args.out, report, table)
    if args.plot and plot(rows, args.policies, args.plot):
        print(f"bench: wrote {args.plot}", file=sys.stderr)
    return 0


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("schedule", help="scheduling policies in the simulator (the paper's comparison)")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--memory", type=lambda s: [int(x) for x in s.split(",")], default=[8192, 16384, 32768])
    p.add_argument("--intervals", type=lambda s: s.split(","), default=INTERVALS)
    p.add_argument("--policies", type=lambda s: s.split(","), default=["hsf", "amax", "amin", "amin-learned", "fcfs"])
    p.add_argument("--evict-cost", type=lambda s: s.split(","), default=["lost", "recompute"])
    p.add_argument("--jobs", type=int, default=2, help="worker processes")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/scheduling.json"))
    p.add_argument("--plot", type=Path, default=Path("benchmarks/results/scheduling.png"))
    p.set_defaults(func=cmd_bench_schedule)
