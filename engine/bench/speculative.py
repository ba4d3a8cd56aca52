"""`optimist bench speculative`: what n-gram speculative decoding gains where answers copy their prompt, and what it
costs where they do not.

One engine (the CPU defaults, prefix caching off so every mode computes the same prompts), two workloads of greedy
chat requests:
- `copy`: answers that reuse the prompt's text (repeat a passage, fix its spelling, quote it), what extraction,
  editing and retrieval-augmented answers look like;
- `json`: the first sentence of a passage under a key of a JSON object (a JSON Schema constraint): drafts the
  language allows, masked row by row, on top of jump-forward;
- `chat`: open questions, where the answer rarely repeats anything: drafts are seldom found and mostly rejected.
Modes over the same requests, in alternating order per round: speculation off, and on with each --tokens value. At
each concurrency (1: one request at a time; N: all at once) the table gives tokens per second (the best round's,
and each round's ratio to `off` run beside it: this machine drifts more between rounds than between neighbours),
engine steps, tokens per request step, the share of drafts kept, mean end-to-end latency, and whether every answer
equals the one without speculation (greedy answers must).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .report import markdown_table, positive_int, serve_in_batches, write_report

PASSAGES = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How vexingly quick daft "
    "zebras jump. Sphinx of black quartz, judge my vow.",
    "Water boils at one hundred degrees Celsius at sea level. At higher altitudes the air pressure is lower, so "
    "water boils at a lower temperature and food takes longer to cook.",
    "The library opens at nine in the morning and closes at six in the evening. On Sundays it opens at noon. "
    "Books can be borrowed for three weeks and renewed twice.",
    "Our meeting is moved to Thursday at three o'clock in room twelve. Please bring the quarterly report and the "
    "budget figures for the new project.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. It happens in the chloroplasts of "
    "plant cells, which contain the green pigment chlorophyll.",
    "The train to Lyon leaves from platform four at ten past eight. Passengers with bicycles must board the last "
    "carriage and keep the aisles free.",
]
COPY_TASKS = [
    "Repeat the following text exactly, word for word:\n\n{}",
    "Fix any spelling mistakes in this text and write it out in full:\n\n{}",
    "Quote this text back to me without changing anything:\n\n{}",
]
QUESTIONS = [
    "What is the capital of France?",
    "Why is the sky blue?",
    "Write a haiku about rain.",
    "Give me three tips for a job interview.",
    "What does a compiler do?",
    "Name two planets of the solar system and say one thing about each.",
]


QUOTE_SCHEMA = {
    "type": "object",
    "properties": {"quote": {"type": "string"}, "word_count": {"type": "integer"}},
    "required": ["quote", "word_count"],
    "additionalProperties": False,
}
QUOTE_TASK = 'Put the first sentence of this text, word for word, under the key "quote" of a JSON object:\n\n{}'


def workload(tokenizer: Any, name: str, count: int) -> list[list[int]]:
    """Chat prompt ids of one workload, cycling over its texts."""
    if name == "copy":
        texts = [COPY_TASKS[i % len(COPY_TASKS)].format(PASSAGES[i % len(PASSAGES)]) for i in range(count)]
    elif name == "json":
        texts = [QUOTE_TASK.format(PASSAGES[i % len(PASSAGES)]) for i in range(count)]
    elif name != "chat":
        raise ValueError(f"unknown workload {name!r}: copy, json or chat")
    else:
        texts = [QUESTIONS[i % len(QUESTIONS)] for i in range(count)]
    return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": t}])) for t in texts]


def run_mode(
    engine: Any, work: list[list[int]], tokens: int, concurrency: int, max_tokens: int, constrained: bool = False
) -> dict[str, Any]:
    """Serves the workload with `tokens` drafts per step (0 = off), under QUOTE_SCHEMA if `constrained`; returns
    its measures and the outputs."""
    import json

    from ..request import SamplingParams, StructuredOutput
    from ..speculative import SpeculativeConfig

    engine.speculative = SpeculativeConfig(tokens, engine.config.speculative_ngram_min,
                                           engine.config.speculative_ngram_max)  # fmt: skip
    before = engine.load().stats
    schema = StructuredOutput("json_schema", json.dumps(QUOTE_SCHEMA)) if constrained else None
    params = SamplingParams(temperature=0, max_tokens=max_tokens, structured_output=schema)
    outputs, latencies, wall = serve_in_batches(
        engine, lambda i: engine.new_request(work[i], params), len(work), concurrency
    )
    after = engine.load().stats
    drafted = after.spec_draft_tokens - before.spec_draft_tokens
    kept = after.spec_accepted_tokens - before.spec_accepted_tokens
    produced = sum(len(o) for o in outputs)
    request_steps = produced - kept  # each request step yields one token plus the drafts it kept
    return {"mode": f"ngram k={tokens}" if tokens else "off", "concurrency": concurrency, "requests": len(work),
            "tokens": produced, "wall_s": wall, "steps": after.steps - before.steps,
            "tokens_per_request_step": produced / max(1, request_steps), "drafted": drafted, "kept": kept,
            "kept_share": kept / drafted if drafted else 0.0, "mean_latency_s": sum(latencies) / len(latencies),
            "outputs": outputs}  # fmt: skip


def cmd_bench_speculative(args: argparse.Namespace) -> int:
    from ..config import EngineConfig
    from ..engine import Engine

    engine = Engine(EngineConfig(model=args.model, weights=args.weights, prefix_caching=False))
    modes = [0, *args.tokens]
    rows = []
    for name in args.workloads:
        work = workload(engine.tokenizer, name, args.requests)
        run_mode(engine, work[:2], 0, 2, args.max_tokens, name == "json")  # warm-up
        for concurrency in args.concurrency or sorted({1, args.requests}):
            best: dict[int, dict[str, Any]] = {}
            walls: dict[int, list[float]] = {k: [] for k in modes}
            reference: list[list[int]] | None = None
            same: dict[int, bool] = {k: True for k in modes}
            for r in range(args.repeats):
                for k in modes if r % 2 == 0 else modes[::-1]:
                    print(f"bench: {name}, k={k}, concurrency {concurrency}, round {r + 1}", file=sys.stderr)
                    row = run_mode(engine, work, k, concurrency, args.max_tokens, name == "json")
                    if k == 0 and reference is None:
                        reference = row["outputs"]
                    walls[k].append(row["wall_s"])
                    if k not in best or row["wall_s"] < best[k]["wall_s"]:
                        best[k] = row
                    same[k] = same[k] and (reference is None or row["outputs"] == reference)
            for k in modes:
                row = best[k]
                outputs = row.pop("outputs")
                row["same_answers"] = same[k] and outputs == reference
                row["workload"] = name
                row["tok_s"] = row["tokens"] / row["wall_s"]
                row["per_round_vs_off"] = [round(o / w, 2) for o, w in zip(walls[0], walls[k], strict=True)]
                rows.append(row)
    engine.shutdown()
    for row in rows:
        off = next(r for r in rows if (r["workload"], r["concurrency"], r["mode"]) ==
                   (row["workload"], row["concurrency"], "off"))  # fmt: skip
        row["tok_s_vs_off"] = row["tok_s"] / off["tok_s"]
        for key in ("wall_s", "mean_latency_s", "tok_s", "tok_s_vs_off", "tokens_per_request_step", "kept_share"):
            row[key] = round(row[key], 2)
    headers = ["workload", "mode", "concurrency", "requests", "tokens", "steps", "tokens per request step",
               "drafts kept", "tok/s", "vs off", "vs off per round", "mean latency s",
               "same answers as off"]  # fmt: skip
    keys = ["workload", "mode", "concurrency", "requests", "tokens", "steps", "tokens_per_request_step",
            "kept_share", "tok_s", "tok_s_vs_off", "per_round_vs_off", "mean_latency_s", "same_answers"]  # fmt: skip
    table = markdown_table(headers, [[_cell(r[k]) for k in keys] for r in rows])
    print(table)
    report = {"benchmark": "speculative", "weights": args.weights, "repeats": args.repeats,
              "max_tokens": args.max_tokens, "rows": rows}  # fmt: skip
    write_report(args.out, report, table)
    return 0 if all(r["same_answers"] for r in rows) else 1


def _cell(value: Any) -> Any:
    return " ".join(f"{v:.2f}" for v in value) if isinstance(value, list) else value


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("speculative", help="n-gram speculative decoding: its gain on copying answers, its cost")
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--weights", default="auto")
    p.add_argument("--requests", type=positive_int, default=12, help="requests per mode (also the larger concurrency)")
    p.add_argument("--repeats", type=positive_int, default=2, help="rounds per mode (the best is kept)")
    p.add_argument("--max-tokens", type=positive_int, default=96)
    p.add_argument("--tokens", type=lambda s: [positive_int(c) for c in s.split(",")], default=[4],
                   help="drafts per step to compare with off, comma-separated")  # fmt: skip
    p.add_argument("--workloads", type=lambda s: s.split(","), default=["copy", "json", "chat"])
    p.add_argument("--concurrency", type=lambda s: [positive_int(c) for c in s.split(",")], default=None,
                   help="requests at once, comma-separated (default: 1 and --requests)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/speculative-cpu.json"))
    p.set_defaults(func=cmd_bench_speculative)
