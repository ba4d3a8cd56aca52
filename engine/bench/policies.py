"""`optimist bench policies`: the scheduling policies in the real engine, with the real model and a small KV cache.

All requests arrive at once (as in the paper's experiments); each has a true output length drawn from a heavy-
tailed distribution and enforced with max_tokens (EOS ignored), which the scheduler does not see unless hints are
given. One engine serves every policy in turn (the policy is swapped while the engine is idle), so the model,
cache and workload are identical. Reports mean and p99 end-to-end latency, evictions, and the scheduler's own time
per engine step next to the step's total; then the scheduler alone with hundreds of waiting requests.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .report import markdown_table, write_report
from .serving import percentile, prompt_set


def run_policy(
    engine: Any, policy_name: str, work: list[tuple[list[int], int, tuple[int, int] | None]]
) -> dict[str, Any]:
    from ..outputs import Event, Finished
    from ..request import SamplingParams
    from ..scheduler.policies import make_policy

    engine.scheduler.policy = make_policy(policy_name)
    sched_time = [0.0]
    steps = [0]
    original = engine.scheduler.schedule

    def timed() -> Any:
        t0 = time.perf_counter()
        plan = original()
        sched_time[0] += time.perf_counter() - t0
        steps[0] += 1
        return plan

    engine.scheduler.schedule = timed
    latencies: list[float] = []
    done = threading.Semaphore(0)
    before = engine.load().evictions_total

    def sink(event: Event) -> None:
        if isinstance(event, Finished):
            latencies.append(event.total_s)
            done.release()

    start = time.perf_counter()
    for prompt, length, hint in work:
        params = SamplingParams(temperature=0, max_tokens=length, ignore_eos=True)
        lower, upper = hint if hint else (None, None)
        engine.submit(engine.new_request(prompt, params, lower_hint=lower, upper_hint=upper), sink)
    for _ in work:
        done.acquire()
    wall = time.perf_counter() - start
    engine.scheduler.schedule = original
    return {
        "policy": policy_name,
        "requests": len(work),
        "mean_latency_s": round(sum(latencies) / len(latencies), 2),
        "p99_latency_s": round(percentile(latencies, 99), 2),
        "wall_s": round(wall, 1),
        "evictions": engine.load().evictions_total - before,
        "steps": steps[0],
        "scheduler_ms_per_step": round(1000 * sched_time[0] / max(1, steps[0]), 3),
        "step_ms": round(1000 * wall / max(1, steps[0]), 1),
    }


def scheduler_alone(waiting: int, running: int, policy_name: str) -> float:
    """Microseconds per schedule() with `waiting` queued and `running` decoding requests (no model)."""
    from ..kv_cache import BlockAllocator
    from ..request import Request, SamplingParams
    from ..scheduler.policies import make_policy
    from ..scheduler.scheduler import Scheduler

    rng = np.random.default_rng(0)
    alloc = BlockAllocator(4096, 16)
    sched = Scheduler(make_policy(policy_name), alloc, max_num_seqs=running, max_batched_tokens=8192)
    for i in range(waiting + running):
        n = int(rng.integers(20, 200))
        req = Request(id=f"r{i}", prompt_ids=[1] * n, params=SamplingParams(max_tokens=500))
        sched.add(req)
    sched.schedule()  # admits up to `running`
    for req in sched.running:
        req.num_computed = req.num_tokens
        req.output_ids.append(1)  # each is one token behind: a decode
    t0 = time.perf_counter()
    n_calls = 50
    for _ in range(n_calls):
        plan = sched.schedule()
        for item in plan.scheduled:
            item.request.num_computed += item.num_new
            item.request.output_ids.append(1)
    return 1e6 * (time.perf_counter() - t0) / n_calls


def cmd_bench_policies(args: argparse.Namespace) -> int:
    from ..config import EngineConfig
    from ..engine import Engine

    # No prefix caching: every policy serves the same prompts in turn, and must not inherit the previous one's K/V.
    config = EngineConfig(model=args.model, kv_cache_tokens=args.kv_cache_tokens, max_num_seqs=64, prefix_caching=False)
    engine = Engine(config)
    prompts = prompt_set(engine.tokenizer)[:-1]  # without the long-context prompt: it alone would fill the cache
    rng = np.random.default_rng(args.seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(args.median), 1.0, args.requests)), 4, args.max_output).astype(int)
    rows = []
    for hints in args.hints:
        work = []
        for i, length in enumerate(lengths.tolist()):
            hint = None
            if hints == "noise":  # ±50% around the truth
                hint = (max(1, int(0.5 * length)), int(1.5 * length) + 1)
            work.append((prompts[i % len(prompts)], length, hint))
        for name in args.policies:
            print(f"bench: {name}, hints {hints}", file=sys.stderr)
            row = run_policy(engine, name, work)
            row["hints"] = hints
            rows.append(row)
    engine.shutdown()
    alone = [
        {"policy": p, "waiting": w, "running": 64, "us_per_schedule": round(scheduler_alone(w, 64, p), 1)}
        for p in args.policies
        for w in (100, 500, 2000)
    ]
    keys = ["hints", "policy", "mean_latency_s", "p99_latency_s", "evictions", "steps", "scheduler_ms_per_step",
            "step_ms"]  # fmt: skip
    headers = ["hints", "policy", "mean latency s", "p99 latency s", "evictions", "steps", "scheduler ms/step",
               "step ms"]  # fmt: skip
    table = markdown_table(headers, [[r[k] for k in keys] for r in rows])
    table += "\n\n" + markdown_table(
        ["policy", "waiting", "running", "µs per schedule()"],
        [[a["policy"], a["waiting"], a["running"], a["us_per_schedule"]] for a in alone],
    )
    print(table)
    report = {"benchmark": "policies", "kv_cache_tokens": args.kv_cache_tokens, "rows": rows, "scheduler": alone}
    write_report(args.out, report, table)
    return 0


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("policies", help="scheduling policies in the real engine under a small KV cache")
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--kv-cache-tokens", type=int, default=1024)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--median", type=float, default=32, help="median true output length")
    p.add_argument("--max-output", type=int, default=160)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hints", type=lambda s: s.split(","), default=["none", "noise"])
    p.add_argument("--policies", type=lambda s: s.split(","), default=["amin", "amin-learned", "fcfs", "amax"])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/policies-engine-cpu.json"))
    p.set_defaults(func=cmd_bench_policies)
