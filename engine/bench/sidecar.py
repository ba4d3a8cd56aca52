"""`optimist bench sidecar`: engine throughput with the metrics sidecar following it vs without, in one run.

Alternates runs without and with a sidecar process (at its default interval unless told otherwise) on the same
engine and prompts, so slow drifts of a shared machine hit both sides; reports the ratio of mean tok/s.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from pathlib import Path

from .report import markdown_table, write_report
from .serving import Result, _start_server, percentile, prompt_set, run_engine


def cmd_bench_sidecar(args: argparse.Namespace) -> int:
    from ..config import default_model_path
    from ..model.loader import load_model

    model_path = args.model or default_model_path()
    prompts = prompt_set(load_model(model_path).tokenizer)[:-1]
    work = [prompts[i % len(prompts)] for i in range(args.requests)]
    args.concurrency, args.apis = [args.concurrency_level], ["grpc"]
    proc, address, _ = _start_server(args, "float")
    runs: dict[str, list[Result]] = {"without": [], "with": []}
    try:
        run_engine(address, work[:4], 4, 4)  # warm-up
        for _ in range(args.rounds):
            for mode in ("without", "with"):
                sidecar = None
                if mode == "with":
                    with socket.socket() as s:
                        s.bind(("127.0.0.1", 0))
                        port = s.getsockname()[1]
                    sidecar = subprocess.Popen(
                        [sys.executable, "-m", "optimist.engine.cli", "sidecar", "--engine", address,
                         "--host", "127.0.0.1", "--port", str(port), "--interval-ms", str(args.interval_ms)],
                        stderr=subprocess.DEVNULL,
                    )  # fmt: skip
                try:
                    print(f"bench: {mode} sidecar", file=sys.stderr)
                    runs[mode].append(run_engine(address, work, args.concurrency_level, args.max_tokens))
                finally:
                    if sidecar is not None:
                        sidecar.terminate()
                        sidecar.wait(timeout=10)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    mean = {m: sum(r.tokens_per_s for r in rs) / len(rs) for m, rs in runs.items()}
    median = {m: percentile([r.tokens_per_s for r in rs], 50) for m, rs in runs.items()}
    ratio = mean["with"] / mean["without"]
    median_ratio = median["with"] / median["without"]
    table = markdown_table(
        ["sidecar", "runs", "tok/s (each)", "mean tok/s", "median tok/s"],
        [
            [m, len(rs), ", ".join(f"{r.tokens_per_s:.1f}" for r in rs), f"{mean[m]:.1f}", f"{median[m]:.1f}"]
            for m, rs in runs.items()
        ],
    )
    table += (
        f"\n\nthroughput with the sidecar following every {args.interval_ms} ms: {100 * ratio:.1f}% of without"
        f" (means), {100 * median_ratio:.1f}% (medians)"
    )
    print(table)
    report = {
        "benchmark": "sidecar",
        "interval_ms": args.interval_ms,
        "concurrency": args.concurrency_level,
        "ratio": round(ratio, 4),
        "median_ratio": round(median_ratio, 4),
        "runs": {m: [r.summary() for r in rs] for m, rs in runs.items()},
    }
    write_report(args.out, report, table)
    return 0


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("sidecar", help="engine throughput with and without the metrics sidecar")
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--kv-cache-tokens", type=int, default=65536)
    p.add_argument("--concurrency-level", type=int, default=8)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--interval-ms", type=int, default=1000)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/sidecar-overhead-cpu.json"))
    p.set_defaults(func=cmd_bench_sidecar)
