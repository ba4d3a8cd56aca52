"""`optimist bench autoscale`: which signal should an InferencePool scale on? The fleet simulator
(engine/scheduler/fleet.py) plays traffic that changes over time through replicas of the A_min server, scaled
by a model of the HPA on each signal the sidecar exports, at several targets each, and through static fleets.

Cost is replica-seconds (starting and draining replicas included); service is the share of requests on time (first
token within 2 s, last within 2 s + 0.1 s per output token: twice the 50 ms decode step). A summary per
`--attainment` level names, per scenario, the cheapest setting of each signal that keeps at least that share of the
requests on time, and its cost against the cheapest static fleet that does (which needs the peak known in
advance). Behaviours: the operator's (the HPA's own default) and the gentler one it wrote before. Autoscaled fleets
start at the static size that serves the first phase. Prints tables, writes JSON.

Scenarios (one replica of `--memory` 8,192 KV tokens serves about 3 requests per second of the default lengths):
- burst: 8 requests/s for 5 minutes, 24/s for 10, 8/s for 10;
- longer: 8 requests/s throughout, but for 10 minutes in the middle the outputs are three times longer (median
  360 tokens instead of 120): the memory needed triples while the request rate stays flat;
- diurnal: 40 minutes of a day's shape compressed, 4 to 24 requests/s and back, changing every minute.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..scheduler.fleet import (
    GENTLE,
    ROUTERS,
    SIGNALS,
    Autoscaler,
    FleetConfig,
    Phase,
    ScalingBehavior,
    phased_workload,
    simulate_fleet,
)
from ..scheduler.workload import WorkloadError, WorkloadRequest, read_workload
from .report import markdown_table, positive_int, write_report

SCENARIOS: dict[str, list[Phase]] = {
    "burst": [Phase(300, 8), Phase(600, 24), Phase(600, 8)],
    "longer": [Phase(300, 8), Phase(600, 8, output_median=360), Phase(600, 8)],
    "diurnal": [Phase(60, 4 + 20 * math.sin(math.pi * (m + 0.5) / 40) ** 2) for m in range(40)],
}
TARGETS: dict[str, list[float]] = {
    "lowerBoundDemand": [0.5, 0.7, 0.9, 1.1, 1.3],
    "queueDepth": [1, 2, 4, 8, 16],
    "concurrency": [10, 15, 20, 30, 40],
    "kvUsage": [0.4, 0.5, 0.6, 0.7, 0.8],
}
BEHAVIORS: dict[str, ScalingBehavior] = {"operator": ScalingBehavior(), "gentle": GENTLE}
# The operator's default target per signal (operator/builders.py DEFAULT_TARGETS; concurrency is not one of its
# metrics: 20 is about where it matches the demand ratio's 0.9 on 8,192-token replicas).
DEFAULT_TARGETS = {"lowerBoundDemand": 0.9, "queueDepth": 4.0, "kvUsage": 0.6, "concurrency": 20.0}
MEMORY = 8192
STEP_S = 0.05
MAX_REPLICAS = 16


def _config(task: dict[str, Any]) -> FleetConfig:
    base = {
        "memory": task["memory"],
        "step_s": task["step_s"],
        "startup_s": task["startup_s"],
        "slo_tpot_s": 2 * task["step_s"],  # twice the decode step per output token
    }
    if task["signal"] == "static":
        return FleetConfig(replicas=int(task["target"]), router=task.get("router", "least-requests"), **base)
    scaler = Autoscaler(
        task["signal"],
        float(task["target"]),
        min_replicas=1,
        max_replicas=MAX_REPLICAS,
        behavior=BEHAVIORS[task["behavior"]],
    )
    return FleetConfig(replicas=task["start"], autoscaler=scaler, router=task.get("router", "least-requests"), **base)


FIRST_PHASE_S = 300.0  # of a trace: its first five minutes stand for the first phase


def _workload(task: dict[str, Any]) -> list[WorkloadRequest]:
    if task.get("workload"):
        requests = read_workload(Path(task["workload"]))
        if task.get("first_phase_only"):
            first = min(r.arrival for r in requests)
            requests = [r for r in requests if (r.arrival - first) * task["step_s"] < FIRST_PHASE_S]
        return requests
    scale = task.get("time_scale", 1.0)
    phases = [replace(p, seconds=p.seconds * scale) for p in SCENARIOS[task["scenario"]]]
    phases = phases[:1] if task.get("first_phase_only") else phases
    return phased_workload(phases, task["seed"], task["step_s"], task["intervals"])


def _run(task: dict[str, Any]) -> dict[str, Any]:
    result = simulate_fleet(_workload(task), _config(task))
    return {**task, **result.summary(), "timeline": result.timeline}


def fluid_estimate(workload: Sequence[WorkloadRequest], memory: int, step_s: float) -> int:
    """Replicas the busiest minute needs on average (KV token-steps of the requests arriving in it, Little's law),
    about a lower bound on what a fleet needs to keep nearly every request on time: where the static sweep
    starts."""
    minute = max(1, round(60 / step_s))
    load: dict[int, float] = {}
    for r in workload:
        held = r.output_tokens * (r.prompt_tokens + r.output_tokens / 2)  # token-steps while it runs
        load[r.arrival // minute] = load.get(r.arrival // minute, 0.0) + held
    return max(1, math.ceil(max(load.values()) / minute / memory))


def static_sweep(pool: ProcessPoolExecutor, base: dict[str, Any], levels: list[float]) -> list[dict[str, Any]]:
    """Static fleets around the fluid estimate, two at a time: up until one meets the highest attainment level,
    down until one misses the lowest, so the cheapest that meets each level is among the runs."""
    runs: list[dict[str, Any]] = []

    def batch(sizes: list[int]) -> bool:
        sizes = [k for k in sizes if 1 <= k <= MAX_REPLICAS and k not in {r["target"] for r in runs}]
        runs.extend(pool.map(_run, [{**base, "signal": "static", "target": k} for k in sizes]))
        return bool(sizes)

    n = fluid_estimate(_workload(base), base["memory"], base["step_s"])
    while batch([n, n + 1]) and not any(r["on_time"] >= max(levels) for r in runs):
        n += 2
    low = min(r["target"] for r in runs)
    while low > 1 and min(runs, key=lambda r: r["target"])["on_time"] >= min(levels):
        batch([low - 1, low - 2])
        low = min(r["target"] for r in runs)
    return runs


def summarize(runs: list[dict[str, Any]], levels: list[float]) -> list[dict[str, Any]]:
    """Per attainment level and (scenario, intervals, behavior): the cheapest run of each signal that meets it."""
    rows = []
    keys = sorted({(r["scenario"], r["intervals"]) for r in runs})
    for attainment, (scenario, intervals) in ((a, k) for a in levels for k in keys):
        mine = [r for r in runs if r["scenario"] == scenario and r["intervals"] == intervals]
        static = cheapest([r for r in mine if r["signal"] == "static"], attainment)
        for behavior in sorted({r["behavior"] for r in mine if r["signal"] != "static"}):
            for signal in SIGNALS:
                group = [r for r in mine if r["signal"] == signal and r["behavior"] == behavior]
                if not group:
                    continue
                best = cheapest(group, attainment)
                rows.append(
                    {
                        "attainment": attainment,
                        "scenario": scenario,
                        "intervals": intervals,
                        "behavior": behavior,
                        "signal": signal,
                        "target": best["target"] if best else None,
                        "replica_seconds": best["replica_seconds"] if best else None,
                        "on_time": best["on_time"] if best else max(r["on_time"] for r in group),
                        "static_replicas": static["target"] if static else None,
                        "static_replica_seconds": static["replica_seconds"] if static else None,
                        "cost_vs_static": (
                            best["replica_seconds"] / static["replica_seconds"] if best and static else None
                        ),
                    }
                )
    return rows


def _columns(timeline: list[dict[str, float]]) -> dict[str, list[float]]:
    """The HPA's view at each sync, as columns (t_s, replicas, ready, metric summed over pods, waiting)."""
    names = ("t_s", "replicas", "ready", "metric", "waiting")
    return {n: [round(p[n], 3) for p in timeline] for n in names}


def cheapest(runs: list[dict[str, Any]], attainment: float) -> dict[str, Any] | None:
    meeting = [r for r in runs if r["on_time"] >= attainment]
    return min(meeting, key=lambda r: r["replica_seconds"]) if meeting else None


def format_summary(rows: list[dict[str, Any]], attainment: float) -> str:
    table = []
    for r in (r for r in rows if r["attainment"] == attainment):
        if r["target"] is None:
            met = f"none (best {r['on_time']:.1%})"
            cost = ratio = "-"
        else:
            met = f"{r['target']:g}"
            cost = f"{r['replica_seconds'] / 60:.0f}"
            ratio = f"{r['cost_vs_static']:.2f}" if r["cost_vs_static"] is not None else "-"
        static = f"{r['static_replicas']} ({r['static_replica_seconds'] / 60:.0f})" if r["static_replicas"] else "none"
        table.append([r["scenario"], r["intervals"], r["behavior"], r["signal"], met, cost, ratio, static])
    headers = [
        "scenario",
        "intervals",
        "behavior",
        "signal",
        f"cheapest target with >= {attainment:.0%} on time",
        "replica-minutes",
        "cost vs static",
        "static fleet (replica-minutes)",
    ]
    return markdown_table(headers, table)


def format_runs(runs: list[dict[str, Any]]) -> str:
    table = [
        [
            r["scenario"],
            r["intervals"],
            r["behavior"] if r["signal"] != "static" else "-",
            r["signal"],
            f"{r['target']:g}",
            f"{r['replica_seconds'] / 60:.0f}",
            r["peak_replicas"],
            f"{r['on_time']:.3f}",
            f"{r['mean_latency_s']:.1f}",
            f"{r['p99_latency_s']:.1f}",
            f"{r['p99_queue_s']:.1f}",
            r["evictions"],
            r["retried"],
        ]
        for r in sorted(runs, key=lambda r: (r["scenario"], r["intervals"], r["behavior"], r["signal"], r["target"]))
    ]
    headers = [
        "scenario",
        "intervals",
        "behavior",
        "signal",
        "target",
        "replica-minutes",
        "peak",
        "on time",
        "mean s",
        "p99 s",
        "p99 TTFT s",
        "evictions",
        "retried",
    ]
    return markdown_table(headers, table)


def cmd_bench_autoscale(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    if args.workload is not None:  # a trace: its own arrivals, lengths and hints
        try:
            trace = read_workload(args.workload)
        except (OSError, WorkloadError) as exc:
            raise SystemExit(f"bench: {args.workload}: {exc}") from exc
        too_long = [r.id for r in trace if r.prompt_tokens + r.output_tokens > args.memory]
        if too_long:
            raise SystemExit(f"bench: request {too_long[0]} needs more than --memory {args.memory} KV tokens")
        settings = [(args.workload.stem, "file")]
    else:
        settings = [(scenario, intervals) for scenario in args.scenarios for intervals in args.intervals]
    with ProcessPoolExecutor(args.jobs) as pool:
        for scenario, intervals in settings:
            base = {
                "scenario": scenario,
                "intervals": intervals,
                "workload": str(args.workload) if args.workload is not None else None,
                "seed": args.seed,
                "step_s": args.step_s,
                "startup_s": args.startup,
                "time_scale": args.time_scale,
                "memory": args.memory,
                "router": args.router,
                "behavior": "-",
            }
            static = static_sweep(pool, base, args.attainment)
            runs += static
            # Autoscaled fleets start where a static one meets the first phase (a steady state), not at 1.
            level = max(args.attainment)
            first = cheapest(static_sweep(pool, {**base, "first_phase_only": True}, [level]), level)
            first = first or {"target": MAX_REPLICAS}
            start_n = int(first["target"])
            tasks = [
                {**base, "signal": s, "target": t, "behavior": b, "start": start_n}
                for b in args.behaviors
                for s in args.signals
                for t in (args.targets.get(s) or TARGETS[s])
            ]
            runs += pool.map(_run, tasks)
            print(
                f"bench: {scenario}/{intervals}: {len(static) + len(tasks)} runs, {time.perf_counter() - start:.0f} s",
                file=sys.stderr,
            )
    rows = summarize(runs, args.attainment)
    for r in runs:  # replicas over time for the runs at the default targets (what a pool gets unless told)
        keep = r["signal"] in DEFAULT_TARGETS and r["target"] == DEFAULT_TARGETS[r["signal"]] and r["timeline"]
        r["timeline"] = _columns(r["timeline"]) if keep else None
    table = "\n\n".join([*(format_summary(rows, a) for a in args.attainment), format_runs(runs)])
    print(table)
    report = {
        "benchmark": "autoscale",
        "memory_tokens": args.memory,
        "step_s": args.step_s,
        "startup_s": args.startup,
        "attainment": args.attainment,
        "slo": {"ttft_s": FleetConfig.slo_ttft_s, "tpot_s": 2 * args.step_s},
        "behaviors": {k: BEHAVIORS[k].__dict__ for k in args.behaviors},
        "wall_s": round(time.perf_counter() - start, 1),
        "summary": rows,
        "runs": runs,
    }
    write_report(args.out, report, table)
    return 0


def _targets(text: str) -> dict[str, list[float]]:
    """ "queueDepth=2,4;kvUsage=0.7" -> {"queueDepth": [2, 4], "kvUsage": [0.7]}."""
    out: dict[str, list[float]] = {}
    for part in filter(None, text.split(";")):
        name, _, values = part.partition("=")
        if name not in SIGNALS or not values:
            raise argparse.ArgumentTypeError(f"expected SIGNAL=V1,V2 with SIGNAL one of {', '.join(SIGNALS)}")
        out[name] = [float(v) for v in values.split(",")]
    return out


def name_list(known: Sequence[str], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n for n in text.split(",") if n]
        for n in names:
            if n not in known:
                raise argparse.ArgumentTypeError(f"unknown {what} {n!r} (choose from {', '.join(known)})")
        if not names:
            raise argparse.ArgumentTypeError(f"name at least one {what}")
        return names

    return parse


def share(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def add_fleet_options(p: argparse.ArgumentParser) -> None:
    """The options both fleet benchmarks take: traffic, service level and replica size."""
    p.add_argument("--scenarios", type=name_list(list(SCENARIOS), "scenario"), default=list(SCENARIOS))
    p.add_argument("--intervals", type=lambda s: s.split(","), default=["noise:0.5", "naive"])
    p.add_argument(
        "--attainment",
        type=lambda text: [share(x) for x in text.split(",")],
        default=[0.95, 0.99],
        help="shares of requests that must be on time (a table each)",
    )
    p.add_argument("--memory", type=positive_int, default=MEMORY, help="KV tokens per replica")


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("autoscale", help="autoscaling signals and targets on a simulated fleet")
    add_fleet_options(p)
    p.add_argument("--signals", type=name_list(SIGNALS, "signal"), default=list(SIGNALS))
    p.add_argument("--behaviors", type=name_list(list(BEHAVIORS), "behavior"), default=list(BEHAVIORS))
    p.add_argument("--targets", type=_targets, default={}, help='per signal, e.g. "queueDepth=2,4;kvUsage=0.7"')
    p.add_argument("--router", choices=ROUTERS, default="least-requests", help="how arrivals pick a replica")
    p.add_argument(
        "--workload",
        type=Path,
        default=None,
        help="a JSON Lines trace (optimist simulate's format) to play instead of the scenarios",
    )
    p.add_argument(
        "--step-s", type=positive_float, default=STEP_S, help="seconds per decode step (a trace's time unit)"
    )
    p.add_argument("--startup", type=float, default=60.0, help="seconds a new replica takes to become ready")
    p.add_argument("--time-scale", type=positive_float, default=1.0, help="stretch (>1) or shrink the scenarios")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--jobs", type=positive_int, default=2, help="worker processes")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/autoscale.json"))
    p.set_defaults(func=cmd_bench_autoscale)
