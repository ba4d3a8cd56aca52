"""`optimist bench prefill`: long-prompt time to answer with dense vs sparse prefill in our engine, and Hugging Face
transformers on the same token ids, in one run; with the sparse configuration's measured attention recall and the
passkey answers. Each run is one prompt, prefill plus a few greedy tokens (the passkey)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .report import markdown_table, positive_int, write_report

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompt(repeats: int, key: int = 68193) -> str:
    """A number hidden in the middle of repeated filler sentences (the usual passkey-retrieval test)."""
    before, after = FILLER * (repeats // 2), FILLER * (repeats - repeats // 2)
    return (
        "There is important info hidden inside a lot of irrelevant text. Find it and memorize it.\n"
        f"{before}The pass key is {key}. Remember it. {key} is the pass key.\n{after}"
        "What is the pass key? The pass key is"
    )


def repeats_for(tokens: int) -> int:
    """Filler repeats giving about `tokens` tokens with SmolLM2's tokenizer (24 tokens per repeat)."""
    return max(1, (tokens - 60) // 24)


def _time_engine(engine: Any, ids: list[int], max_tokens: int) -> tuple[float, list[int]]:
    from ..request import SamplingParams

    t0 = time.perf_counter()
    out, _, _ = engine.generate(engine.new_request(ids, SamplingParams(temperature=0.0, max_tokens=max_tokens)))
    return time.perf_counter() - t0, list(out)


def _time_transformers(model: Any, ids: list[int], max_tokens: int) -> tuple[float, list[int]]:
    import torch

    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids], device=model.device), max_new_tokens=max_tokens, do_sample=False)
    return time.perf_counter() - t0, out[0, len(ids) :].tolist()


def cmd_bench_prefill(args: argparse.Namespace) -> int:
    import torch

    from ..attention.sparse.config import pattern_config_for
    from ..attention.sparse.prefill import TILE
    from ..attention.sparse.search import evaluate
    from ..config import EngineConfig
    from ..engine import Engine
    from .serving import load_transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    # No prefix caching: the passkey prompts share their leading filler, and each must be timed from scratch.
    common = {"model": args.model, "kv_cache_tokens": 16384, "max_num_batched_tokens": args.chunk}
    common["prefix_caching"] = False
    common["prefill_gemm"] = args.prefill_gemm
    dense = Engine(EngineConfig(**common))
    sparse = Engine(EngineConfig(**common, sparse_prefill_threshold=args.threshold, sparse_patterns=args.patterns))
    model_path = dense.config.model_path()
    patterns = pattern_config_for(args.patterns, model_path, dense.model_config)
    hf = load_transformers(model_path) if "transformers" in args.baselines else None
    tok = dense.tokenizer
    rows = []
    for target in args.lengths:
        ids = tok.encode(passkey_prompt(repeats_for(target)))
        print(f"bench: {len(ids)} tokens", file=sys.stderr)
        row: dict[str, Any] = {"tokens": len(ids)}
        # dense, sparse (and transformers) alternate, `repeats` rounds: machine drift hits all; each keeps its best
        # time (noise from other tenants only adds), and the per-round dense/sparse ratios show the spread
        pairs, hf_times = [], []
        for r in range(args.repeats):
            if r % 2:  # odd rounds run sparse first: neither always comes second
                t_sparse, out_sparse = _time_engine(sparse, ids, args.max_tokens)
                t_dense, out_dense = _time_engine(dense, ids, args.max_tokens)
            else:
                t_dense, out_dense = _time_engine(dense, ids, args.max_tokens)
                t_sparse, out_sparse = _time_engine(sparse, ids, args.max_tokens)
            pairs.append((t_dense, t_sparse))
            if hf is not None:
                t_hf, out_hf = _time_transformers(hf, ids, args.max_tokens)
                hf_times.append(t_hf)
        t_dense, t_sparse = min(p[0] for p in pairs), min(p[1] for p in pairs)
        ratios = [d / s for d, s in pairs]
        row |= {"dense_s": round(t_dense, 2), "sparse_s": round(t_sparse, 2), "pairs_s": pairs,
                "dense_answer": tok.decode(out_dense), "sparse_answer": tok.decode(out_sparse),
                "same_answer": out_dense == out_sparse, "speedup": round(t_dense / t_sparse, 2),
                "speedup_range": f"{min(ratios):.2f}-{max(ratios):.2f}"}  # fmt: skip
        if hf is not None:
            t_hf = min(hf_times)
            row |= {"transformers_s": round(t_hf, 2), "transformers_answer": tok.decode(out_hf),
                    "sparse_vs_transformers": round(t_sparse / t_hf, 2)}  # fmt: skip
        recall, density = evaluate(sparse.model, ids, patterns)
        row |= {"recall": round(recall, 4), "density": round(density, 3)}
        if args.chunk % TILE == 0:  # as the engine ran it: its chunks, its dense switches
            recall, density = evaluate(sparse.model, ids, patterns, chunk=args.chunk)
            row |= {"recall_as_run": round(recall, 4), "density_as_run": round(density, 3)}
        rows.append(row)
        print(row, file=sys.stderr)
    dense.shutdown()
    sparse.shutdown()
    headers = ["tokens", "dense s", "sparse s", "speed-up", "per pair", "transformers s", "sparse / transformers",
               "recall", "keys visited", "as run: recall, keys", "answers (dense / sparse / transformers)"]  # fmt: skip
    table = markdown_table(
        headers,
        [
            [r["tokens"], r["dense_s"], r["sparse_s"], r["speedup"], r["speedup_range"], r.get("transformers_s", "-"),
             r.get("sparse_vs_transformers", "-"), r["recall"], r["density"],
             f"{r['recall_as_run']}, {r['density_as_run']}" if "recall_as_run" in r else "-",
             " / ".join(repr(r[k].strip()) for k in ("dense_answer", "sparse_answer", "transformers_answer")
                        if k in r)]
            for r in rows
        ],
    )  # fmt: skip
    table += (
        f"\n\nOur engine: weights {dense.weights}, prefill matmuls with {dense.prefill_gemm} activations"
        f" (--prefill-gemm {args.prefill_gemm}), {torch.get_num_threads()} threads, chunks of {args.chunk} tokens."
    )
    print(table)
    report = {"benchmark": "prefill", "threshold": args.threshold, "chunk": args.chunk, "repeats": args.repeats,
              "max_tokens": args.max_tokens, "threads": torch.get_num_threads(), "weights": dense.weights,
              "prefill_gemm": dense.prefill_gemm, "rows": rows}  # fmt: skip
    write_report(args.out, report, table)
    return 0


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("prefill", help="long-prompt dense vs sparse prefill, and transformers")
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--patterns", type=Path, default=None, help="pattern file (default: the model's bundled one)")
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 4096, 7200])
    p.add_argument("--threshold", type=int, default=1024, help="sparse prefill above this many prompt tokens")
    p.add_argument("--chunk", type=int, default=2048, help="max tokens per engine step (chunked prefill)")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument(
        "--repeats", type=positive_int, default=3, help="alternating dense/sparse runs per length (best kept)"
    )
    p.add_argument("--baselines", type=lambda s: s.split(","), default=["transformers"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument(
        "--prefill-gemm",
        default="auto",
        choices=["auto", "float", "int8"],
        help="our engine's prefill matmuls, both dense and sparse (see optimist serve --help)",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/prefill-cpu.json"))
    p.set_defaults(func=cmd_bench_prefill)
