"""`optimist bench cpu-attention`: a prefill chunk's causal attention in our C kernel (`native.prefill_attention`)
against torch's fused CPU attention (the flash kernel, bottom-right causal, as the engine calls it) on the same
inputs, alternating, best of `repeats`; with both sides' GFLOPS, the ratio, the largest difference between their
outputs, and what this machine runs: our kernels' vector width, torch's CPU capability and the context bound up to
which the engine's dense prefill uses the C kernel (`native.prefill_keys`). Prints a table and writes JSON.

Shapes are "n:L" pairs: n query rows at the last n of L positions (a chunk after L - n cached tokens). Heads default
to SmolLM2-135M's (9 query heads over 3 KV heads, head size 64); the engine calls the kernel per KV group in the
sparse path and for all groups at once in the dense path (`--kv-heads`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .report import best_alternating, markdown_table, positive_int, write_report

SHAPES = [(128, 128), (512, 512), (2048, 2048), (2048, 4096), (2048, 7183), (2048, 16384)]


def _shape(text: str) -> tuple[int, int]:
    try:
        n, length = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is n:L (query rows : keys), got {text!r}") from None
    if not 0 < n <= length:
        raise argparse.ArgumentTypeError(f"a shape needs 0 < n <= L, got {text!r}")
    return n, length


def _measure(n: int, length: int, args: argparse.Namespace, generator: Any) -> dict[str, Any]:
    """One shape: both kernels on the same inputs, alternating, best of args.repeats each."""
    import torch

    from ..attention.cpu import bottom_right_causal_attention
    from ..model import native

    rep = args.heads // args.kv_heads
    q = torch.randn(n, args.heads, args.dim, generator=generator)
    k = torch.randn(length, args.kv_heads, args.dim, generator=generator)
    v = torch.randn(length, args.kv_heads, args.dim, generator=generator)
    ours = torch.empty_like(q)
    # torch's layout: [1, heads, rows, D], each KV head repeated for its query heads
    qt = q.transpose(0, 1)[None]
    kt = k.transpose(0, 1).repeat_interleave(rep, dim=0)[None]
    vt = v.transpose(0, 1).repeat_interleave(rep, dim=0)[None]
    theirs: list[torch.Tensor] = []

    def run_ours() -> None:
        if not native.prefill_attention(q, k, v, ours):
            raise ValueError(f"the C kernel does not take {args.heads}/{args.kv_heads} heads of {args.dim}")

    def run_torch() -> None:
        theirs[:] = [bottom_right_causal_attention(qt, kt, vt)]

    t_ours, t_torch = best_alternating(run_ours, run_torch, args.repeats)  # warm-up builds the C library
    flops = 4 * args.heads * args.dim * n * (length - (n - 1) / 2)  # QK and PV over the causal pairs
    return {"n": n, "keys": length, "ours_ms": round(t_ours * 1e3, 3), "torch_ms": round(t_torch * 1e3, 3),
            "ours_gflops": round(flops / t_ours / 1e9, 1), "torch_gflops": round(flops / t_torch / 1e9, 1),
            "speedup": round(t_torch / t_ours, 2),
            "max_abs_error": (theirs[0][0].transpose(0, 1) - ours).abs().max().item()}  # fmt: skip


def cmd_bench_cpu_attention(args: argparse.Namespace) -> int:
    import torch

    from ..model import native

    if args.threads:
        torch.set_num_threads(args.threads)
    reason = native.unavailable_reason()
    if reason is not None:
        print(f"bench cpu-attention: {reason}", file=sys.stderr)
        return 2
    if args.heads % args.kv_heads:
        print(f"bench cpu-attention: {args.heads} query heads over {args.kv_heads} KV heads", file=sys.stderr)
        return 2
    generator = torch.Generator().manual_seed(0)
    rows = []
    for n, length in args.shapes:
        rows.append(_measure(n, length, args, generator))
        print(rows[-1], file=sys.stderr)
    lanes = native.library().native_simd()
    capability = torch.backends.cpu.get_cpu_capability()
    headers = ["rows", "keys", "ours ms", "torch ms", "ours GFLOPS", "torch GFLOPS", "ours vs torch", "max |diff|"]
    table = markdown_table(
        headers,
        [[r["n"], r["keys"], r["ours_ms"], r["torch_ms"], r["ours_gflops"], r["torch_gflops"], r["speedup"],
          f"{r['max_abs_error']:.1e}"] for r in rows],
    )  # fmt: skip
    table += (
        f"\n\n{args.heads} query heads over {args.kv_heads} KV heads of {args.dim}; our kernels {lanes} floats wide,"
        f" torch's CPU capability {capability}, {torch.get_num_threads()} threads; the engine's dense prefill runs"
        f" the C kernel up to {native.prefill_keys()} keys."
    )
    print(table)
    report = {"benchmark": "cpu-attention", "heads": args.heads, "kv_heads": args.kv_heads, "dim": args.dim,
              "repeats": args.repeats, "threads": torch.get_num_threads(), "lanes": lanes,
              "torch_capability": capability, "prefill_keys": native.prefill_keys(), "rows": rows}  # fmt: skip
    write_report(args.out, report, table)
    return 0


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("cpu-attention", help="prefill attention: our C kernel vs torch's flash kernel on CPU")
    p.add_argument("--shapes", type=lambda s: [_shape(x) for x in s.split(",")], default=SHAPES,
                   help="n:L pairs (query rows : keys), comma-separated")  # fmt: skip
    p.add_argument("--heads", type=positive_int, default=9)
    p.add_argument("--kv-heads", type=positive_int, default=3)
    p.add_argument("--dim", type=positive_int, default=64)
    p.add_argument("--repeats", type=positive_int, default=5, help="alternating runs per shape (best kept)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu-attention.json"))
    p.set_defaults(func=cmd_bench_cpu_attention)
