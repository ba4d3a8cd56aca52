"""`optimist bench routing`: how many replicas does each way of spreading requests need? The autoscaling benchmark's
traffic (engine/bench/autoscale.py) through static fleets of the A_min server (engine/scheduler/fleet.py), once per
router: round-robin (what gRPC clients do over the pool's headless Service), random, least-requests, least-kv (the
signals the Gateway API Inference Extension's endpoint picker reads from the sidecar) and least-demand (the
scheduler's demand ratio). For each router the fewest replicas that keep `--attainment` of the requests on time,
and the share on time at the fewest any router needed. Routers see each replica's state as it is (the endpoint
picker refreshes its metrics every few tens of milliseconds). Prints tables, writes JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from ..scheduler.fleet import ROUTERS
from .autoscale import STEP_S, _run, add_fleet_options, cheapest, name_list, positive_float, static_sweep
from .report import markdown_table, positive_int, write_report


def summarize(runs: list[dict[str, Any]], levels: list[float]) -> list[dict[str, Any]]:
    rows = []
    for scenario, intervals in sorted({(r["scenario"], r["intervals"]) for r in runs}):
        mine = [r for r in runs if r["scenario"] == scenario and r["intervals"] == intervals]
        for level in levels:
            fewest = {ro: cheapest([r for r in mine if r["router"] == ro], level) for ro in ROUTERS}
            sizes = [f["target"] for f in fewest.values() if f is not None]
            best = min(sizes) if sizes else None
            for router, f in fewest.items():
                if not any(r["router"] == router for r in mine):
                    continue
                at_best = next((r for r in mine if r["router"] == router and r["target"] == best), None)
                rows.append(
                    {
                        "scenario": scenario,
                        "intervals": intervals,
                        "attainment": level,
                        "router": router,
                        "replicas": f["target"] if f else None,
                        "replica_minutes": f["replica_seconds"] / 60 if f else None,
                        "fewest_any": best,
                        "on_time_at_fewest": at_best["on_time"] if at_best else None,
                    }
                )
    return rows


def format_table(rows: list[dict[str, Any]], level: float) -> str:
    table = []
    for r in (r for r in rows if r["attainment"] == level):
        need = "more than 16" if r["replicas"] is None else str(r["replicas"])
        at = "-" if r["on_time_at_fewest"] is None else f"{r['on_time_at_fewest']:.3f}"
        table.append([r["scenario"], r["intervals"], r["router"], need, at])
    headers = [
        "scenario",
        "intervals",
        "router",
        f"replicas for >= {level:.0%} on time",
        "on time at the fewest any needed",
    ]
    return markdown_table(headers, table)


def _at_fewest(
    pool: ProcessPoolExecutor, runs: list[dict[str, Any]], base: dict[str, Any], routers: list[str], levels: list[float]
) -> list[dict[str, Any]]:
    """Runs every router at the fewest replicas any router needed (per level), where its sweep did not."""
    mine = [r for r in runs if r["scenario"] == base["scenario"] and r["intervals"] == base["intervals"]]
    added: list[dict[str, Any]] = []
    for level in levels:
        found = [cheapest([r for r in mine if r["router"] == ro], level) for ro in routers]
        sizes = [f["target"] for f in found if f is not None]
        if not sizes:
            continue
        have = {r["router"] for r in mine + added if r["target"] == min(sizes)}
        fill = [{**base, "router": ro, "signal": "static", "target": min(sizes)} for ro in routers if ro not in have]
        added += pool.map(_run, fill)
    return added


def cmd_bench_routing(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for scenario in args.scenarios:
            for intervals in args.intervals:
                for router in args.routers:
                    base = {
                        "scenario": scenario,
                        "intervals": intervals,
                        "router": router,
                        "seed": args.seed,
                        "step_s": STEP_S,
                        "startup_s": 0.0,
                        "time_scale": args.time_scale,
                        "memory": args.memory,
                        "behavior": "-",
                    }
                    runs += static_sweep(pool, base, args.attainment)
                runs += _at_fewest(pool, runs, base, args.routers, args.attainment)
                print(f"bench: {scenario}/{intervals}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    for r in runs:
        r["timeline"] = None
    rows = summarize(runs, args.attainment)
    table = "\n\n".join(format_table(rows, level) for level in args.attainment)
    print(table)
    report = {
        "benchmark": "routing",
        "memory_tokens": args.memory,
        "step_s": STEP_S,
        "attainment": args.attainment,
        "wall_s": round(time.perf_counter() - start, 1),
        "summary": rows,
        "runs": runs,
    }
    write_report(args.out, report, table)
    return 0


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("routing", help="replicas each request router needs, on a simulated fleet")
    add_fleet_options(p)
    p.add_argument("--routers", type=name_list(ROUTERS, "router"), default=list(ROUTERS))
    p.add_argument("--time-scale", type=positive_float, default=1.0, help="stretch (>1) or shrink the scenarios")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--jobs", type=positive_int, default=2, help="worker processes")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/routing.json"))
    p.set_defaults(func=cmd_bench_routing)
