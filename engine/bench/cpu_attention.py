"""`optimist bench cpu-attention`: a prefill chunk's causal attention in our C kernel (`native.prefill_attention`)
against torch's fused CPU attention (the flash kernel, bottom-right causal, as the engine calls it) on the same
inputs, alternating, best of `repeats`; with both sides' GFLOPS, the ratio, the largest difference between their
outputs, and what this machine runs: our kernels' vector width, torch's CPU capability and the context bound up to
which the engine's dense prefill uses the C kernel (`native.prefill_keys`). Prints a table and writes JSON.

Shapes are "n:L" pairs: n query rows at the last n of L positions (a chunk after L - n cached tokens). Heads default
to SmolLM2-135M's (9 query heads over 3 KV heads, head size 64); the engine calls the kernel per KV group in the
sparse path and for all groups at once in the dense path (`--kv-heads`).

Then decode steps (`--decode`, "m:L": m sequences of L tokens each, one new query token each): our C decode attention
(`native.decode_attention`, reading the paged cache where it is) against torch's over the same cache (each row's K
and V gathered by slot, then SDPA, grouped-query), with the sequences on scattered slots of a cache holding them
all, as the engine's block tables place them; for a float32 cache and, where the kernels read one, a float16 cache
(`--kv-cache-dtype float16`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .report import best_alternating, markdown_table, positive_int, write_report

SHAPES = [(128, 128), (512, 512), (2048, 2048), (2048, 4096), (2048, 7183), (2048, 16384)]
DECODE = [(1, 512), (1, 2048), (1, 7183), (1, 16384), (8, 2048), (8, 7183)]


def _pair(text: str, form: str) -> tuple[int, int]:
    """Two positive integers "a:b" (`form` names them in the error)."""
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is {form}, got {text!r}") from None
    if a <= 0 or b <= 0:
        raise argparse.ArgumentTypeError(f"a shape needs positive numbers, got {text!r}")
    return a, b


def _shape(text: str) -> tuple[int, int]:
    """A prefill shape n:L, n query rows of L keys (n <= L)."""
    n, length = _pair(text, "n:L (query rows : keys)")
    if n > length:
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


def _measure_decode(m: int, length: int, kv_dtype: str, args: argparse.Namespace, generator: Any) -> dict[str, Any]:
    """One decode shape: m rows of `length` context each on scattered slots (16-slot blocks in random order), the
    cache in `kv_dtype` (float32 or float16: torch converts what it gathers)."""
    import torch
    import torch.nn.functional as F

    from ..model import native

    block = 16
    blocks = -(-length // block)
    num_slots = m * blocks * block
    dtype = getattr(torch, kv_dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    read = 2 * m * length * args.kv_heads * args.dim * itemsize  # the K and V bytes each call reads
    # as many layers' caches as make ~256 MB (up to 30): a decode step walks every layer's, so they come from memory,
    # not from the last level cache as one small cache called again would
    layers = max(1, min(30, (256 << 20) // (2 * num_slots * args.kv_heads * args.dim * itemsize)))
    caches = [
        (torch.randn(num_slots, args.kv_heads, args.dim, generator=generator).to(dtype),
         torch.randn(num_slots, args.kv_heads, args.dim, generator=generator).to(dtype))
        for _ in range(layers)
    ]  # fmt: skip
    order = torch.randperm(m * blocks, generator=generator).view(m, blocks)  # each row's block table
    slots = (order[:, :, None] * block + torch.arange(block)).reshape(m, -1)[:, :length].contiguous()
    lens = torch.full((m,), length, dtype=torch.long)
    q = torch.randn(m, args.heads, args.dim, generator=generator)
    ours = torch.empty_like(q)
    theirs: list[torch.Tensor] = []

    def run_ours() -> None:
        for k_cache, v_cache in caches:
            native.decode_attention(q, k_cache, v_cache, slots, lens, ours)

    def run_torch() -> None:
        for k_cache, v_cache in caches:
            keys = k_cache[slots].float().transpose(1, 2)  # [m, kv heads, L, D]
            values = v_cache[slots].float().transpose(1, 2)
            theirs[:] = [F.scaled_dot_product_attention(q[:, :, None], keys, values, enable_gqa=True)[:, :, 0]]

    t_ours, t_torch = (t / layers for t in best_alternating(run_ours, run_torch, args.repeats))
    return {"m": m, "keys": length, "cache": kv_dtype, "layers": layers, "ours_ms": round(t_ours * 1e3, 3),
            "torch_ms": round(t_torch * 1e3, 3), "ours_gbs": round(read / t_ours / 1e9, 1),
            "torch_gbs": round(read / t_torch / 1e9, 1), "speedup": round(t_torch / t_ours, 2),
            "max_abs_error": (theirs[0] - ours).abs().max().item()}  # fmt: skip


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
    decode = []
    kv_dtypes = ["float32"] + (["float16"] if native.kv_float16() else [])
    for m, length in args.decode:
        for kv_dtype in kv_dtypes:
            decode.append(_measure_decode(m, length, kv_dtype, args, generator))
            print(decode[-1], file=sys.stderr)
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
    if decode:
        table += "\n\nDecode steps (m sequences of L keys each, one query token each, on scattered cache slots):\n\n"
        table += markdown_table(
            ["sequences", "keys", "cache", "ours ms", "torch ms", "ours GB/s", "torch GB/s", "ours vs torch",
             "max |diff|"],
            [[r["m"], r["keys"], r["cache"], r["ours_ms"], r["torch_ms"], r["ours_gbs"], r["torch_gbs"], r["speedup"],
              f"{r['max_abs_error']:.1e}"] for r in decode],
        )  # fmt: skip
        table += (
            "\n\nPer layer: each call cycles over up to 30 layers' caches (~256 MB), as a decode step does; GB/s: the"
            " K and V bytes a call reads over its time (a float16 cache: half); torch gathers them by slot (a float16"
            " cache converted to float32), then SDPA."
        )
    print(table)
    report = {"benchmark": "cpu-attention", "heads": args.heads, "kv_heads": args.kv_heads, "dim": args.dim,
              "repeats": args.repeats, "threads": torch.get_num_threads(), "lanes": lanes,
              "torch_capability": capability, "prefill_keys": native.prefill_keys(), "rows": rows,
              "decode_rows": decode}  # fmt: skip
    write_report(args.out, report, table)
    return 0


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("cpu-attention", help="prefill attention: our C kernel vs torch's flash kernel on CPU")
    p.add_argument("--shapes", type=lambda s: [_shape(x) for x in s.split(",")], default=SHAPES,
                   help="n:L pairs (query rows : keys), comma-separated")  # fmt: skip
    p.add_argument("--decode", type=lambda s: [_pair(x, "m:L (sequences : keys)") for x in s.split(",") if x],
                   default=DECODE, help="m:L pairs (sequences : keys each) for decode steps; empty: none")  # fmt: skip
    p.add_argument("--heads", type=positive_int, default=9)
    p.add_argument("--kv-heads", type=positive_int, default=3)
    p.add_argument("--dim", type=positive_int, default=64)
    p.add_argument("--repeats", type=positive_int, default=5, help="alternating runs per shape (best kept)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu-attention.json"))
    p.set_defaults(func=cmd_bench_cpu_attention)
