"""`optimist bench structured`: what constraining outputs to a JSON Schema costs, and what jump-forward saves.

One engine (the CPU defaults), chat prompts that ask for JSON of three schemas with long keys and enums (what
extraction services send). Three modes over the same prompts, in alternating order per round:
- `free`: no constraint, each request generating exactly as many tokens as its constrained answer (EOS ignored),
  so the model does the same work; the share of its answers that are valid JSON of the schema is reported too;
- `schema, no jump-forward`: every token sampled under the grammar's mask;
- `schema`: the engine's default, forced tokens appended without a step.
At each concurrency (1: one request at a time; N: all at once) the table gives tokens per second (the best round's,
and each round's ratio to the free and to the no-jump-forward mode run beside it: this machine drifts more between
rounds than between neighbours), mean end-to-end latency, engine steps, the mask work per step (worker time) and
how long the engine waited for masks after the model's forward pass (the part not hidden behind it), and the share
of answers valid for their schema.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from .report import markdown_table, positive_int, serve_in_batches, write_report

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "full_name_of_the_person": {"type": "string", "maxLength": 40},
            "age_in_years": {"type": "integer", "minimum": 0, "maximum": 120},
            "city_of_residence": {"type": "string", "maxLength": 40},
            "marital_status": {"enum": ["single", "married", "divorced", "widowed"]},
        },
        "required": ["full_name_of_the_person", "age_in_years", "city_of_residence", "marital_status"],
        "additionalProperties": False,
    },
    "product": {
        "type": "object",
        "properties": {
            "product_name": {"type": "string", "maxLength": 40},
            "price_in_euros": {"type": "number"},
            "product_category": {"enum": ["electronics", "clothing", "groceries", "furniture"]},
            "currently_in_stock": {"type": "boolean"},
        },
        "required": ["product_name", "price_in_euros", "product_category", "currently_in_stock"],
        "additionalProperties": False,
    },
    "event": {
        "type": "object",
        "properties": {
            "event_title": {"type": "string", "maxLength": 40},
            "year_of_the_event": {"type": "integer"},
            "event_location": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 30},
                    "country": {"type": "string", "maxLength": 30},
                },
                "required": ["city", "country"],
                "additionalProperties": False,
            },
        },
        "required": ["event_title", "year_of_the_event", "event_location"],
        "additionalProperties": False,
    },
}
QUESTIONS: dict[str, tuple[str, list[str]]] = {
    "person": ("Describe a person living in {} as JSON.", ["France", "Japan", "Brazil", "Canada", "Kenya", "Italy"]),
    "product": ("Describe a product sold in a shop in {} as JSON.", ["Paris", "Berlin", "Tokyo", "Madrid", "Oslo"]),
    "event": ("Describe a historical event that happened in {} as JSON.", ["Egypt", "China", "Greece", "Peru"]),
}


def workload(tokenizer: Any, count: int) -> list[tuple[str, list[int]]]:
    """(schema name, chat prompt ids), cycling over schemas and places."""
    items = []
    names = list(SCHEMAS)
    for i in range(count):
        name = names[i % len(names)]
        template, places = QUESTIONS[name]
        text = template.format(places[(i // len(names)) % len(places)])
        ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]))
        items.append((name, ids))
    return items


class _MaskTimer:
    """Wraps the engine's mask computation: worker time filling masks, and engine time waiting for them."""

    def __init__(self, engine: Any) -> None:
        self.grammars = engine.grammars
        self.fill_s = self.wait_s = 0.0
        self._fill, self._start = self.grammars._fill, self.grammars.start_masks
        self.grammars._fill = self.fill
        self.grammars.start_masks = self.start

    def fill(self, jobs: list[Any], bitmask: Any) -> Any:
        t0 = time.perf_counter()
        out = self._fill(jobs, bitmask)
        self.fill_s += time.perf_counter() - t0
        return out

    def start(self, requests: Any, drafts: Any = None) -> Any:
        return _Waited(self, self._start(requests, drafts))

    def reset(self) -> None:
        self.fill_s = self.wait_s = 0.0

    def restore(self) -> None:
        self.grammars._fill, self.grammars.start_masks = self._fill, self._start


class _Waited:
    """A mask future whose result() adds its wait to the timer."""

    def __init__(self, timer: _MaskTimer, inner: Future[Any]) -> None:
        self.timer, self.inner = timer, inner

    def result(self) -> Any:
        t0 = time.perf_counter()
        out = self.inner.result()
        self.timer.wait_s += time.perf_counter() - t0
        return out


def run_mode(engine: Any, work: list[Any], lengths: list[int] | None, mode: str, concurrency: int) -> dict[str, Any]:
    """Serves the workload in one mode; returns its measures and the outputs."""
    from ..request import SamplingParams, StructuredOutput

    engine.jump_forward = mode == "schema"

    def request(i: int) -> Any:
        name, ids = work[i]
        if mode == "free":
            assert lengths is not None
            params = SamplingParams(temperature=0, max_tokens=lengths[i], ignore_eos=True)
        else:
            constraint = StructuredOutput("json_schema", json.dumps(SCHEMAS[name]))
            params = SamplingParams(temperature=0, max_tokens=200, structured_output=constraint)
        return engine.new_request(ids, params)

    steps0 = engine.load().stats.steps
    outputs, latencies, wall = serve_in_batches(engine, request, len(work), concurrency)
    steps = engine.load().stats.steps - steps0
    tokens = sum(len(o) for o in outputs)
    return {"mode": mode, "concurrency": concurrency, "requests": len(work), "tokens": tokens, "wall_s": wall,
            "steps": steps, "mean_latency_s": sum(latencies) / len(latencies), "outputs": outputs}  # fmt: skip


def valid_share(engine: Any, work: list[Any], outputs: list[list[int]]) -> float:
    import jsonschema

    good = 0
    for (name, _), out in zip(work, outputs, strict=True):
        try:
            jsonschema.validate(json.loads(engine.tokenizer.decode(out)), SCHEMAS[name])
            good += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    return good / len(work)


def cmd_bench_structured(args: argparse.Namespace) -> int:
    from ..config import EngineConfig
    from ..engine import Engine

    # (speculative drafts off: this bench isolates the constraint and jump-forward; `bench speculative --workloads
    # json` measures drafts under a schema)
    engine = Engine(EngineConfig(model=args.model, weights=args.weights, prefix_caching=False, speculative_tokens=0))
    work = workload(engine.tokenizer, args.requests)
    timer = _MaskTimer(engine)
    # the constrained answers' lengths, which the free mode then generates (and a warm-up)
    lengths = [len(o) for o in run_mode(engine, work, None, "schema, no jump-forward", args.requests)["outputs"]]
    modes = ["free", "schema, no jump-forward", "schema"]
    rows = []
    for concurrency in args.concurrency or sorted({1, args.requests}):
        best: dict[str, dict[str, Any]] = {}
        walls: dict[str, list[float]] = {mode: [] for mode in modes}
        for r in range(args.repeats):
            for mode in modes if r % 2 == 0 else modes[::-1]:
                print(f"bench: {mode}, concurrency {concurrency}, round {r + 1}", file=sys.stderr)
                timer.reset()
                row = run_mode(engine, work, lengths, mode, concurrency)
                row["fill_ms_per_step"] = 1000 * timer.fill_s / max(1, row["steps"])
                row["wait_ms_per_step"] = 1000 * timer.wait_s / max(1, row["steps"])
                walls[mode].append(row["wall_s"])
                if mode not in best or row["wall_s"] < best[mode]["wall_s"]:
                    best[mode] = row
        for mode in modes:
            row = best[mode]
            row["valid_share"] = valid_share(engine, work, row.pop("outputs"))
            row["tok_s"] = row["tokens"] / row["wall_s"]
            # per round, against the other modes run next to it: this machine drifts more between rounds
            row["per_round_vs_free"] = [round(f / w, 2) for f, w in zip(walls["free"], walls[mode], strict=True)]
            row["per_round_vs_no_jump"] = [
                round(n / w, 2) for n, w in zip(walls["schema, no jump-forward"], walls[mode], strict=True)
            ]
            rows.append(row)
    timer.restore()
    engine.shutdown()
    for row in rows:
        free = next(r for r in rows if r["concurrency"] == row["concurrency"] and r["mode"] == "free")
        row["tok_s_vs_free"] = row["tok_s"] / free["tok_s"]
        for key in ("wall_s", "mean_latency_s", "tok_s", "fill_ms_per_step", "wait_ms_per_step", "tok_s_vs_free"):
            row[key] = round(row[key], 3 if key.endswith("per_step") else 2)
    headers = ["mode", "concurrency", "requests", "tokens", "steps", "tok/s", "vs free", "vs free per round",
               "vs no jump-forward per round", "mean latency s", "mask ms/step", "mask wait ms/step",
               "valid JSON of the schema"]  # fmt: skip
    keys = ["mode", "concurrency", "requests", "tokens", "steps", "tok_s", "tok_s_vs_free", "per_round_vs_free",
            "per_round_vs_no_jump", "mean_latency_s", "fill_ms_per_step", "wait_ms_per_step",
            "valid_share"]  # fmt: skip
    table = markdown_table(headers, [[_cell(r[k]) for k in keys] for r in rows])
    print(table)
    report = {"benchmark": "structured", "weights": args.weights, "repeats": args.repeats, "rows": rows}
    write_report(args.out, report, table)
    return 0


def _cell(value: Any) -> Any:
    return " ".join(f"{v:.2f}" for v in value) if isinstance(value, list) else value


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("structured", help="JSON-Schema-constrained generation: its cost, and jump-forward's gain")
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--weights", default="auto")
    p.add_argument("--requests", type=positive_int, default=15, help="requests per mode (also the larger concurrency)")
    p.add_argument("--repeats", type=positive_int, default=2, help="rounds per mode (the best is kept)")
    p.add_argument("--concurrency", type=lambda s: [positive_int(c) for c in s.split(",")], default=None,
                   help="requests at once, comma-separated (default: 1 and --requests)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/structured-cpu.json"))
    p.set_defaults(func=cmd_bench_structured)
