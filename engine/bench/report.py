"""What every benchmark ends with: a Markdown table on stdout, and JSON (plus the table as .md) on disk."""

from __future__ import annotations

import argparse
import json
import sys
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
