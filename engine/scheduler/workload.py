"""The JSON Lines workload format shared by every driver (simulator, benchmarks, anyone's own traces):

    {"id": "r17", "arrival": 0, "prompt_tokens": 85, "output_tokens": 212, "lower": 1, "upper": 1000}

`arrival` is in steps; `lower`/`upper` are optional (default [1, max output length in the file]).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


class WorkloadError(ValueError):
    """A workload line is malformed; the message starts with its line number."""


@dataclass(frozen=True)
class WorkloadRequest:
    id: str
    arrival: int
    prompt_tokens: int
    output_tokens: int
    lower: int | None = None
    upper: int | None = None


def _int_field(obj: dict[str, object], name: str, line: int, minimum: int, required: bool = True) -> int | None:
    if name not in obj:
        if required:
            raise WorkloadError(f"line {line}: missing field {name!r}")
        return None
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise WorkloadError(f"line {line}: field {name!r} must be an integer, got {value!r}")
    if value < minimum:
        raise WorkloadError(f"line {line}: field {name!r} must be >= {minimum}, got {value}")
    return value


def parse_workload(lines: Iterable[str]) -> list[WorkloadRequest]:
    requests: list[WorkloadRequest] = []
    seen: set[str] = set()
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"line {number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise WorkloadError(f"line {number}: expected a JSON object")
        rid = str(obj.get("id", f"line-{number}"))
        if rid in seen:
            raise WorkloadError(f"line {number}: duplicate id {rid!r}")
        seen.add(rid)
        arrival = _int_field(obj, "arrival", number, 0, required=False) or 0
        prompt = _int_field(obj, "prompt_tokens", number, 1)
        output = _int_field(obj, "output_tokens", number, 1)
        lower = _int_field(obj, "lower", number, 1, required=False)
        upper = _int_field(obj, "upper", number, 1, required=False)
        assert prompt is not None and output is not None
        if lower is not None and lower > output:
            raise WorkloadError(f"line {number}: lower ({lower}) is above output_tokens ({output})")
        if upper is not None and upper < output:
            raise WorkloadError(f"line {number}: upper ({upper}) is below output_tokens ({output})")
        requests.append(WorkloadRequest(rid, arrival, prompt, output, lower, upper))
    if not requests:
        raise WorkloadError("the workload has no requests")
    return requests


def read_workload(path: Path) -> list[WorkloadRequest]:
    with open(path, encoding="utf-8") as f:
        return parse_workload(f)


def write_workload(path: Path, requests: Iterable[WorkloadRequest]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in requests:
            obj = {k: v for k, v in asdict(r).items() if v is not None}
            f.write(json.dumps(obj) + "\n")


def lognormal_lengths(rng: np.random.Generator, n: int, median: float, sigma: float, lo: int, hi: int) -> np.ndarray:
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), lo, hi).astype(int)


def paper_workload(n: int, seed: int, intervals: str) -> list[WorkloadRequest]:
    """The benchmark's workload: all at time 0; outputs lognormal (median ~120, clipped to [1, 1000]); prompts
    lognormal (median ~40, clipped to [1, 1024]); intervals "naive" ([1, 1000]), "bins" (width-100 bins around
    the truth), or "noise:X" ([(1-X)o, (1+X)o])."""
    rng = np.random.default_rng(seed)
    outputs = lognormal_lengths(rng, n, 120, 1.0, 1, 1000)
    prompts = lognormal_lengths(rng, n, 40, 1.0, 1, 1024)
    out: list[WorkloadRequest] = []
    for i, (o, s) in enumerate(zip(outputs.tolist(), prompts.tolist(), strict=True)):
        lo, hi = interval(intervals, o, 1000)
        out.append(WorkloadRequest(f"r{i}", 0, s, o, lo, hi))
    return out


def interval(intervals: str, output: int, max_output: int) -> tuple[int, int]:
    """A predicted [lower, upper] for a true output length: "naive" ([1, max_output]), "bins" (width-100 bins
    around the truth), or "noise:X" ([(1-X)o, (1+X)o])."""
    if intervals == "naive":
        return 1, max_output
    if intervals == "bins":
        lo = (output - 1) // 100 * 100 + 1
        return lo, lo + 99
    if intervals.startswith("noise:"):
        x = float(intervals.split(":", 1)[1])
        return max(1, int(np.floor((1 - x) * output))), max(output, int(np.ceil((1 + x) * output)))
    raise ValueError(f"unknown interval setting {intervals!r}")
