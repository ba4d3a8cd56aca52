"""`optimist bench lora`: what serving LoRA adapters costs against the base model alone.

One engine (the CPU defaults; prefix caching and speculative decoding off, so every mode computes the same rows)
with --adapters random adapters of rank --rank on every projection (PEFT's file format, written by this bench),
greedy chat requests that each produce exactly --max-tokens tokens (ignore_eos). Modes over the same requests, in
alternating order per round: `base` (no adapter), `1 adapter` (every request on the same one), `N adapters`
(request i on adapter i mod N: every step mixes them). At each concurrency (1: one request at a time; N: all at
once) the table gives tokens per second (the best round's, and each round's ratio to `base` run beside it: this
machine drifts more between rounds than between neighbours) and mean end-to-end latency. A fine-tune merged into
its weights would run at `base`'s speed but serve only itself; the ratio is what serving many from one copy costs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from .report import markdown_table, positive_int, serve_in_batches, write_report
from .speculative import QUESTIONS

MODULES = {"q_proj": ("self_attn", "q"), "k_proj": ("self_attn", "kv"), "v_proj": ("self_attn", "kv"),
           "o_proj": ("self_attn", "o"), "gate_proj": ("mlp", "up"), "up_proj": ("mlp", "up"),
           "down_proj": ("mlp", "down")}  # fmt: skip


def write_random_adapter(folder: Path, config: Any, rank: int, seed: int, std: float = 0.02) -> Path:
    """A PEFT LoRA adapter of `rank` on every projection of a model of `config` (engine ModelConfig), A as PEFT
    initializes it, B drawn with `std` (PEFT starts B at zero: an adapter that changes nothing)."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    shapes = {  # (in, out) of each kind of projection
        "q": (config.hidden_size, config.q_size),
        "kv": (config.hidden_size, config.kv_size),
        "o": (config.q_size, config.hidden_size),
        "up": (config.hidden_size, config.intermediate_size),
        "down": (config.intermediate_size, config.hidden_size),
    }
    tensors = {}
    for layer in range(config.num_layers):
        for module, (block, kind) in MODULES.items():
            fan_in, fan_out = shapes[kind]
            key = f"base_model.model.model.layers.{layer}.{block}.{module}"
            bound = 1.0 / fan_in**0.5
            tensors[f"{key}.lora_A.weight"] = (torch.rand(rank, fan_in, generator=gen) * 2 - 1) * bound
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * std
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config_json = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(MODULES),
                   "bias": "none", "task_type": "CAUSAL_LM"}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config_json))
    return folder


def run_mode(
    engine: Any, work: list[list[int]], adapters: list[str], concurrency: int, max_tokens: int
) -> dict[str, Any]:
    """Serves the workload with request i on adapters[i % len] (none when `adapters` is empty)."""
    from ..request import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    def make(i: int) -> Any:
        adapter = engine.adapter(adapters[i % len(adapters)]) if adapters else None
        return engine.new_request(work[i], params, adapter=adapter)

    outputs, latencies, wall = serve_in_batches(engine, make, len(work), concurrency)
    mode = "base" if not adapters else f"{len(adapters)} adapter{'s' if len(adapters) > 1 else ''}"
    return {"mode": mode, "concurrency": concurrency, "requests": len(work), "tokens": sum(len(o) for o in outputs),
            "wall_s": wall, "mean_latency_s": sum(latencies) / len(latencies)}  # fmt: skip


def cmd_bench_lora(args: argparse.Namespace) -> int:
    from ..config import EngineConfig
    from ..engine import Engine

    engine = Engine(
        EngineConfig(model=args.model, weights=args.weights, prefix_caching=False, speculative_tokens=0,
                     enable_lora=True, max_loras=args.adapters)
    )  # fmt: skip
    names = [f"adapter-{i}" for i in range(args.adapters)]
    with tempfile.TemporaryDirectory(prefix="optimist-lora-") as tmp:
        for i, name in enumerate(names):
            engine.load_adapter(name, write_random_adapter(Path(tmp) / name, engine.model_config, args.rank, seed=i))
    tokenizer = engine.tokenizer
    texts = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.requests)]
    work = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": t}])) for t in texts]
    modes: list[list[str]] = [[], names[:1], names] if args.adapters > 1 else [[], names[:1]]
    run_mode(engine, work[:2], names, 2, 4)  # warm-up
    rows = []
    for concurrency in args.concurrency or sorted({1, args.requests}):
        best: dict[int, dict[str, Any]] = {}
        walls: dict[int, list[float]] = {i: [] for i in range(len(modes))}
        for r in range(args.repeats):
            order = list(range(len(modes)))
            for i in order if r % 2 == 0 else order[::-1]:
                print(f"bench: {len(modes[i])} adapters, concurrency {concurrency}, round {r + 1}", file=sys.stderr)
                row = run_mode(engine, work, modes[i], concurrency, args.max_tokens)
                walls[i].append(row["wall_s"])
                if i not in best or row["wall_s"] < best[i]["wall_s"]:
                    best[i] = row
        for i in range(len(modes)):
            row = best[i]
            row["tok_s"] = row["tokens"] / row["wall_s"]
            row["per_round_vs_base"] = [round(b / w, 2) for b, w in zip(walls[0], walls[i], strict=True)]
            rows.append(row)
    engine.shutdown()
    for row in rows:
        base = next(r for r in rows if r["concurrency"] == row["concurrency"] and r["mode"] == "base")
        row["tok_s_vs_base"] = row["tok_s"] / base["tok_s"]
        for key in ("wall_s", "mean_latency_s", "tok_s", "tok_s_vs_base"):
            row[key] = round(row[key], 2)
    headers = ["mode", "concurrency", "requests", "tokens", "tok/s", "vs base", "vs base per round",
               "mean latency s"]  # fmt: skip
    keys = ["mode", "concurrency", "requests", "tokens", "tok_s", "tok_s_vs_base", "per_round_vs_base",
            "mean_latency_s"]  # fmt: skip
    cells = [[" ".join(f"{v:.2f}" for v in r[k]) if isinstance(r[k], list) else r[k] for k in keys] for r in rows]
    table = markdown_table(headers, cells)
    print(table)
    report = {"benchmark": "lora", "weights": args.weights, "rank": args.rank, "adapters": args.adapters,
              "repeats": args.repeats, "max_tokens": args.max_tokens, "rows": rows}  # fmt: skip
    write_report(args.out, report, table)
    return 0


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("lora", help="LoRA adapters: serving several beside the base model, against the base alone")
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--weights", default="auto")
    p.add_argument("--rank", type=positive_int, default=16)
    p.add_argument("--adapters", type=positive_int, default=4, help="adapters the mixed mode cycles over")
    p.add_argument("--requests", type=positive_int, default=8, help="requests per mode (also the larger concurrency)")
    p.add_argument("--repeats", type=positive_int, default=3, help="rounds per mode (the best is kept)")
    p.add_argument("--max-tokens", type=positive_int, default=64)
    p.add_argument("--concurrency", type=lambda s: [positive_int(c) for c in s.split(",")], default=None,
                   help="requests at once, comma-separated (default: 1 and --requests)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/lora-cpu.json"))
    p.set_defaults(func=cmd_bench_lora)
