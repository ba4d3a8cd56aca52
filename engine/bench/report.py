"""What every benchmark ends with: a Markdown table on stdout, and JSON (plus the table as .md) on disk."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(path: Path | None, report: dict[str, Any], table: str) -> None:
    """Writes `report` as JSON to `path` and `table` beside it as .md (nothing when `path` is None)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    path.with_suffix(".md").write_text(table + "\n")
    print(f"bench: wrote {path} and {path.with_suffix('.md')}", file=sys.stderr)


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def best_alternating(first: Callable[[], None], second: Callable[[], None], repeats: int) -> tuple[float, float]:
    """Best wall time of each of two runs over `repeats` rounds that alternate which goes first (so machine drift
    hits both), after one warm-up call of each."""
    first()
    second()
    best = {first: float("inf"), second: float("inf")}
    for r in range(repeats):
        for fn in (first, second) if r % 2 == 0 else (second, first):
            t0 = time.perf_counter()
            fn()
            best[fn] = min(best[fn], time.perf_counter() - t0)
    return best[first], best[second]


def serve_in_batches(
    engine: Any, make_request: Callable[[int], Any], count: int, concurrency: int
) -> tuple[list[list[int]], list[float], float]:
    """Submits requests 0..count-1 to an in-process engine, `concurrency` at a time (each batch finished before the
    next starts); returns each one's output token ids, each one's end-to-end latency, and the wall time."""
    from ..outputs import Chunk, Event, Finished

    outputs: list[list[int]] = [[] for _ in range(count)]
    latencies = [0.0] * count
    sem = threading.Semaphore(0)

    def sink_for(i: int) -> Callable[[Event], None]:
        def sink(ev: Event) -> None:
            if isinstance(ev, Chunk):
                outputs[i].extend(ev.token_ids)
            elif isinstance(ev, Finished):
                latencies[i] = ev.total_s
                sem.release()

        return sink

    start = time.perf_counter()
    for first in range(0, count, concurrency):
        batch = range(first, min(first + concurrency, count))
        for i in batch:
            engine.submit(make_request(i), sink_for(i))
        for _ in batch:
            sem.acquire()
    return outputs, latencies, time.perf_counter() - start
