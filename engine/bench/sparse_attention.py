"""`optimist bench sparse-attention`: attention time of the sparse Triton kernels against PyTorch SDPA (the flash
backend on a GPU) at long lengths, estimation and index building included, with attention-mass recall on
structured inputs, in one run. Prints a table and writes JSON.

Inputs are synthetic with the structure long-context heads show: per KV group a slowly varying random walk x
(queries 1.5 x plus a shared direction; keys x), so every query weighs its neighbourhood (a local window); a few
sink keys and scattered vertical keys along the shared direction; and keys that copy the query a fixed distance
ahead (slash lines). Recall is the dense causal attention mass the sparse index keeps, averaged over heads and
sampled rows (exact softmax rows in fp32); beside it, the oracle: the mass as many keys per row would keep if they
were each row's heaviest, the ceiling for any index of that density on these inputs (their background, every
query against every key, spreads mass that no pattern can predict, more of it the longer the sequence).

Patterns: MInference's three by default; `--patterns` also takes coverage (FlexPrefill-style shares), query_aware
(ours: keys chosen per query block from its own last rows; its estimation is the costly part at long contexts) and
dense: every key through our vertical-slash kernel (one range of all diagonals), whose time against SDPA's is the
kernel's per-key rate against flash's, apart from how sparse the other rows are.

Defaults on a GPU: Llama-3-8B head shapes (32 query heads, 8 KV heads, head size 128, bf16) at 32K..1M tokens. On
a CPU (no GPU) the kernels run in the Triton interpreter, so only tiny shapes are sensible: the defaults shrink.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from .report import markdown_table, write_report


def structured_qkv(
    n: int, hq: int, hkv: int, d: int, dtype: Any, device: Any, seed: int = 0
) -> tuple[Any, Any, Any, list[list[int]]]:
    """q [Hq, n, d], k/v [Hkv, n, d] (SDPA's layout), and each KV group's planted slash offsets."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.empty((hq, n, d), dtype=dtype, device=device)
    k = torch.empty((hkv, n, d), dtype=dtype, device=device)
    v = torch.randn((hkv, n, d), dtype=dtype, device=device, generator=g)
    width = 32  # smoothing window of the random walk: neighbours within ~this distance look alike
    kernel = torch.exp(-torch.arange(width, device=device, dtype=torch.float32) / 8.0)
    kernel = (kernel / kernel.norm()).view(1, 1, width)
    group = hq // hkv
    slashes: list[list[int]] = []
    for h in range(hkv):
        noise = torch.randn((d, 1, n + width - 1), device=device, generator=g)
        x = torch.nn.functional.conv1d(noise, kernel).squeeze(1).T  # [n, d]
        x = x * (math.sqrt(d) / x.norm(dim=1, keepdim=True))
        u = torch.randn(d, device=device, generator=g)
        u = u * (math.sqrt(d) / u.norm())
        kh = x.clone()
        kh[:4] += 2.5 * u  # sinks
        verticals = torch.randint(4, n, (max(1, n // 2048),), device=device, generator=g)
        kh[verticals] += 1.5 * u
        offsets = sorted({int(o) for o in torch.randint(200, max(201, n // 2), (3,), generator=g, device=device)})
        offsets = [o for o in offsets if o < n]
        for o in offsets:  # key j resembles the query o positions later: a slash line at offset o
            kh[: n - o] += 0.9 * x[o:]
        slashes.append(offsets)
        k[h] = kh.to(dtype)
        for j in range(group):
            qh = 1.5 * x + 0.6 * u + 0.3 * torch.randn((n, d), device=device, generator=g)
            q[h * group + j] = qh.to(dtype)
    return q, k, v, slashes


def recall(q: Any, k: Any, rows_mask: Callable[[int, Any], Any], rows: Any) -> float:
    """Mean over heads and `rows` of the causal softmax mass (fp32) inside rows_mask(head, rows)."""
    return mass_kept(q, k, rows_mask, rows, oracle=False)["recall"]


def mass_kept(q: Any, k: Any, rows_mask: Callable[[int, Any], Any], rows: Any, oracle: bool = True) -> dict[str, float]:
    """recall: as `recall`; oracle: the mass the same number of keys per row would keep if they were each row's
    heaviest (no pattern predicts those: the most any index this dense can keep on these inputs; a sort of every
    sampled row, skipped when not asked for: nan); keys: keys visited per row, averaged; pairs: their share of the
    rows' causal keys."""
    import torch

    hq, n, d = q.shape
    group = hq // k.shape[0]
    rows = rows.to(q.device)
    kept, best, keys = [], [], []
    causal = torch.arange(n, device=q.device)[None, :] <= rows[:, None]
    for h in range(hq):
        scores = (q[h, rows].float() @ k[h // group].float().T) / math.sqrt(d)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        mask = rows_mask(h, rows)
        kept.append((probs * mask).sum(dim=-1))
        count = mask.sum(dim=-1).long()
        keys.append(count.float())
        if oracle:
            heaviest = probs.sort(dim=-1, descending=True).values.cumsum(dim=-1)
            best.append(torch.where(count > 0, heaviest.gather(1, (count - 1).clamp(min=0)[:, None])[:, 0], 0.0))
    visited = torch.stack(keys)
    return {
        "recall": float(torch.stack(kept).mean()),
        "oracle": float(torch.stack(best).mean()) if oracle else math.nan,
        "keys": float(visited.mean()),
        "pairs": float(visited.sum(dim=0).mean() / hq / (rows + 1).float().mean()),
    }


def _timer(device: Any) -> Callable[[Callable[[], Any], int], float]:
    import torch

    def run(fn: Callable[[], Any], repeats: int) -> float:
        """Median milliseconds of `repeats` calls after one warm-up."""
        fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1000 * (time.perf_counter() - t0))
        return statistics.median(times)

    return run


def _dense(q: Any, k: Any, v: Any) -> tuple[Callable[[], Any], str]:
    """SDPA over [1, H, n, d]: flash on a GPU (grouped-query natively when it can, else K/V repeated beforehand)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qs, ks, vs = q[None], k[None], v[None]
    if q.device.type != "cuda":
        return (lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)), "cpu"
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        try:
            F.scaled_dot_product_attention(qs[:, :, :128], ks[:, :, :128], vs[:, :, :128], is_causal=True,
                                           enable_gqa=True)  # fmt: skip
            gqa = True
        except RuntimeError:
            gqa = False
    if not gqa:
        group = q.shape[0] // k.shape[0]
        ks, vs = ks.repeat_interleave(group, dim=1), vs.repeat_interleave(group, dim=1)

    def call() -> Any:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)

    return call, "flash" + (" (gqa)" if gqa else " (K/V repeated)")


def _one_length(
    n: int, hq: int, hkv: int, d: int, dtype: Any, device: Any, chosen: dict[str, Any],
    timer: Callable[[Callable[[], Any], int], float], args: argparse.Namespace,
) -> list[dict[str, Any]]:  # fmt: skip
    """Dense SDPA, then each chosen pattern (estimate + index, kernels, recall), at one length."""
    import torch

    from ..attention.sparse.gpu import BLOCK, plan, run

    q, k, v, _ = structured_qkv(n, hq, hkv, d, dtype, device, seed=n)
    dense_call, backend = _dense(q, k, v)
    repeats = args.repeats if n <= 262144 else 1
    dense_ms = timer(dense_call, repeats)
    # dense through our kernel is checked against SDPA's output (the kernels' correctness at full size on this GPU)
    expected = dense_call()[0].transpose(0, 1) if "dense" in chosen else None
    del dense_call
    qe, ke, ve = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # the engine's layout (views)
    rows = torch.linspace(n // 8, n - 1, args.recall_rows, device=device).long().unique()
    out = []
    for (name, pattern), block in ((c, b) for c in chosen.items() for b in args.blocks):
        bs = pattern is not None and pattern.kind == "block_sparse"
        if block != args.blocks[0] and bs:
            continue  # block-sparse keeps 64-token blocks
        if pattern is None:  # dense through our kernel: one range of every diagonal
            make = partial(_everything, hq, n, block, device)
            times = {"-": timer(make, repeats)}
        else:  # each estimator's time for the same plan (tested to be the same); the rows use the first's
            times = {e: timer(partial(plan, qe, ke, 0, [pattern] * hq, block, e), repeats) for e in args.estimators}
            make = partial(plan, qe, ke, 0, [pattern] * hq, block, args.estimators[0])
        plan_ms = next(iter(times.values()))
        by_estimator = {e: round(t, 2) for e, t in times.items()}
        sparse = make()
        mass = mass_kept(q, k, sparse.rows_mask, rows)
        # the range loop only exists in the vertical-slash kernel (vertical-slash and A-shape heads)
        for loop in ["-"] if bs else args.loops:
            call = partial(run, qe, ke, ve, sparse, "nested" if loop == "-" else loop)
            kernel_ms = timer(call, repeats)
            error = {}
            if pattern is None and expected is not None:
                error["max_abs_error"] = round(float((call().float() - expected.float()).abs().max()), 5)
            total = plan_ms + kernel_ms
            row = {"tokens": n, "pattern": name, "block": BLOCK if bs else block, "loop": loop,
                   "budget": [pattern.a, pattern.b] if pattern else "all", "dense_ms": round(dense_ms, 2),
                   "dense_backend": backend, "estimate_index_ms": round(plan_ms, 2),
                   "kernel_ms": round(kernel_ms, 2), "sparse_ms": round(total, 2),
                   "speedup": round(dense_ms / total, 2), "recall": round(mass["recall"], 4),
                   "oracle_recall": round(mass["oracle"], 4), "keys_per_row": round(mass["keys"]),
                   "pairs": round(mass["pairs"], 4), **error}  # fmt: skip
            if len(by_estimator) > 1:
                row["estimate_index_ms_by_estimator"] = by_estimator
            print(f"bench: {row}", file=sys.stderr)
            out.append(row)
    for chunk in (c for c in args.chunks if c < n):
        out += _chunked(q, k, v, qe, ke, ve, chunk, chosen, rows, timer, repeats, args)
    return out


def _chunked(
    q: Any, k: Any, v: Any, qe: Any, ke: Any, ve: Any, chunk: int, chosen: dict[str, Any], rows: Any,
    timer: Callable[[Callable[[], Any], int], float], repeats: int, args: argparse.Namespace,
) -> list[dict[str, Any]]:  # fmt: skip
    """The prompt prefilled in chunks of `chunk` queries, as the engine runs it (each chunk after the keys before
    it): dense through the engine's chunk attention (`attention/chunk.py`: flash, bottom-right causal), the same
    with an explicit boolean mask (what the engine ran before session 27), and each sparse pattern planned and run
    per chunk (its estimate from the chunk's own last queries)."""
    import torch
    import torch.nn.functional as F

    from ..attention.chunk import bottom_right_causal
    from ..attention.sparse.gpu import plan, run

    n = q.shape[1]
    spans = [(c0, min(n, c0 + chunk)) for c0 in range(0, n, chunk)]

    def dense(masked: bool) -> Any:
        outs = []
        for c0, c1 in spans:
            qs, ks, vs = q[None, :, c0:c1], k[None, :, :c1], v[None, :, :c1]
            if masked and c0:
                keep = torch.arange(c1, device=q.device)[None, :] <= torch.arange(c0, c1, device=q.device)[:, None]
                outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=keep, enable_gqa=True))
            else:
                outs.append(bottom_right_causal(qs, ks, vs))
        return outs

    dense_ms = timer(partial(dense, False), repeats)
    masked_ms = timer(partial(dense, True), repeats)
    # the chunks' dense output against one causal call over the whole prompt
    whole = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, enable_gqa=True)
    error = float((torch.cat(dense(False), dim=2).float() - whole.float()).abs().max())
    del whole
    out = []
    for name, pattern in chosen.items():
        if pattern is None:
            continue
        patterns = [pattern] * q.shape[0]

        def sparse(patterns: list[Any] = patterns, estimator: str = args.estimators[0]) -> list[Any]:
            block = args.blocks[0]
            return [run(qe[c0:c1], ke[:c1], ve[:c1], plan(qe[c0:c1], ke[:c1], c0, patterns, block, estimator))
                    for c0, c1 in spans]  # fmt: skip

        by_estimator = {e: round(timer(partial(sparse, estimator=e), repeats), 2) for e in args.estimators}
        sparse_ms = by_estimator[args.estimators[0]]
        plans = [(c0, c1, plan(qe[c0:c1], ke[:c1], c0, patterns, args.blocks[0], args.estimators[0]))
                 for c0, c1 in spans]  # fmt: skip

        def rows_mask(h: int, r: Any, plans: list[Any] = plans) -> Any:
            mask = torch.zeros((len(r), n), dtype=torch.bool, device=q.device)
            for i, row in enumerate(r.tolist()):
                c0, c1, p = next(x for x in plans if x[0] <= row < x[1])
                mask[i, :c1] = p.rows_mask(h, torch.tensor([row - c0], device=q.device))[0]
            return mask

        mass = mass_kept(q, k, rows_mask, rows, oracle=False)
        row = {"tokens": n, "pattern": name, "block": args.blocks[0], "loop": "auto", "chunk": chunk,
               "budget": [pattern.a, pattern.b], "dense_ms": round(dense_ms, 2), "masked_dense_ms": round(masked_ms, 2),
               "dense_backend": "chunks: " + ("flash, bottom-right causal" if q.is_cuda else "cpu"),
               "sparse_ms": round(sparse_ms, 2),
               "speedup": round(dense_ms / sparse_ms, 2), "recall": round(mass["recall"], 4),
               "keys_per_row": round(mass["keys"]), "pairs": round(mass["pairs"], 4)}  # fmt: skip
        row["max_abs_error"] = round(error, 5)  # of the dense chunks (the baseline), not of this sparse row
        if len(by_estimator) > 1:
            row["sparse_ms_by_estimator"] = by_estimator
        print(f"bench: {row}", file=sys.stderr)
        out.append(row)
    return out


TARGET_RECALL = 0.95  # #4's targets hold the speed-ups to this recall


def best_at_recall(results: list[dict[str, Any]], recall: float) -> dict[int, dict[str, Any] | None]:
    """Per length, the fastest sparse row over the whole prompt (dense-through-ours and chunked rows excluded)
    keeping at least `recall` of the mass, or None where none does."""
    best: dict[int, dict[str, Any] | None] = {}
    for r in results:
        if "speedup" not in r:
            continue  # an out-of-memory row
        current = best.setdefault(r["tokens"], None)
        eligible = "chunk" not in r and r["pattern"] != "dense" and r["recall"] >= recall
        if eligible and (current is None or r["speedup"] > current["speedup"]):
            best[r["tokens"]] = r
    return best


def _everything(hq: int, n: int, block: int, device: Any) -> Any:
    """A plan whose vertical-slash index holds every key of every row (all diagonals, one range; one column, which
    the range covers): dense attention through our kernel, the per-key rate the sparse rows are made of."""
    import torch

    from ..attention.sparse.gpu import SparsePlan
    from ..attention.sparse.index import build_vertical_slash_index

    offsets = torch.arange(n, device=device, dtype=torch.int32)[None].expand(hq, -1)
    columns = torch.zeros((hq, 1), device=device, dtype=torch.int32)
    index = build_vertical_slash_index(columns, offsets, 0, n, block)
    return SparsePlan(torch.arange(hq, device=device, dtype=torch.int32), index, None, None)


def _precompile(dtype: Any, d: int, heads: tuple[int, int], device: Any, blocks: list[int]) -> None:
    from ..attention.sparse.compile_check import KERNELS, precompile
    from ..attention.sparse.gpu import BLOCK

    t0 = time.perf_counter()
    done = 0
    for block in blocks:  # block-sparse keeps the engine's blocks (see _one_length)
        done += precompile(dtype, d, heads, device, KERNELS if block == BLOCK else ("vertical_slash",), block=block)
    print(f"bench: compiled {done} programs in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def cmd_bench_sparse_attention(args: argparse.Namespace) -> int:
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    from ..attention.sparse.config import HeadPattern
    from ..attention.sparse.triton_kernels import INTERPRET, tuned_configs

    if not cuda and not INTERPRET:
        print("bench: no GPU and Triton was imported without TRITON_INTERPRET=1; set it and rerun", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    lengths = args.lengths or ([32768, 131072, 262144, 524288, 1048576] if cuda else [512, 1024])
    hq, hkv, d = (args.heads, args.kv_heads, args.head_dim) if cuda else (4, 2, 32)
    if args.shape:
        hq, hkv, d = args.shape
    patterns: dict[str, HeadPattern | None] = {
        "dense": None,  # every key through our kernel (see _everything)
        "vertical_slash": HeadPattern("vertical_slash", args.vs[0], args.vs[1]),
        "a_shape": HeadPattern("a_shape", args.a_shape[0], args.a_shape[1]),
        "block_sparse": HeadPattern("block_sparse", args.block_sparse, 0),
        "coverage": HeadPattern("coverage", args.coverage[0], args.coverage[1]),
        "query_aware": HeadPattern("query_aware", args.query_aware[0], args.query_aware[1]),
    }
    unknown = [name for name in args.patterns if name not in patterns]
    if unknown:
        print(f"bench: unknown pattern {unknown[0]!r} (choose from {', '.join(patterns)})", file=sys.stderr)
        return 2
    args.loops = args.loops or (["nested", "flat", "auto"] if cuda else ["nested", "flat"])
    unknown = [name for name in args.loops if name not in ("nested", "flat", "auto")]
    if unknown:
        print(f"bench: unknown loop {unknown[0]!r} (choose from nested, flat, auto)", file=sys.stderr)
        return 2
    from ..attention.sparse.gpu import ESTIMATORS

    unknown = [name for name in args.estimators if name not in ESTIMATORS]
    if unknown or not args.estimators:
        print(f"bench: unknown estimator {unknown[0] if unknown else ''!r} (choose from {', '.join(ESTIMATORS)})",
              file=sys.stderr)  # fmt: skip
        return 2
    at: dict[int, list[str]] = {}
    for spec in args.patterns_at:
        length, _, names = spec.partition("=")
        if not length.isdigit() or not names or any(name not in patterns for name in names.split(",")):
            print(f"bench: --patterns-at takes LENGTH=PATTERN[,PATTERN...] with patterns from {', '.join(patterns)}; "
                  f"got {spec!r}", file=sys.stderr)  # fmt: skip
            return 2
        at[int(length)] = names.split(",")
    timer = _timer(device)
    results: list[dict[str, Any]] = []
    print(f"bench: {hq} query heads, {hkv} KV heads, head size {d}, {dtype}, {device}", file=sys.stderr)
    if cuda:  # as the engine does at start: every candidate compiled on a thread pool, so autotuning only times
        _precompile(dtype, d, (hq, hkv), device, args.blocks)
    for n in lengths:
        chosen = {name: patterns[name] for name in at.get(n, args.patterns)}
        try:
            results += _one_length(n, hq, hkv, d, dtype, device, chosen, timer, args)
        except torch.OutOfMemoryError:
            print(f"bench: {n} tokens do not fit in GPU memory; stopping here", file=sys.stderr)
            results.append({"tokens": n, "pattern": "-", "error": "out of memory"})
            break
        finally:
            if cuda:
                torch.cuda.empty_cache()
    headers = ["tokens", "pattern", "block", "loop", "chunk", "budget", "SDPA ms", "SDPA masked ms",
               "estimate+index ms", "kernel ms", "sparse ms", "speed-up", "recall", "oracle at equal keys",
               "keys per row", "max error vs SDPA"]  # fmt: skip
    table = markdown_table(
        headers,
        [
            [r["tokens"], r["pattern"], r.get("block", ""), r.get("loop", ""), r.get("chunk", "-"),
             r.get("budget", ""), r.get("dense_ms", ""), r.get("masked_dense_ms", ""),
             r.get("estimate_index_ms", ""), r.get("kernel_ms", ""), r.get("sparse_ms", ""),
             r.get("speedup", r.get("error", "")), r.get("recall", ""), r.get("oracle_recall", ""),
             r.get("keys_per_row", ""), r.get("max_abs_error", "")]
            for r in results
        ],
    )  # fmt: skip
    print(table)
    best = best_at_recall(results, TARGET_RECALL)
    for n, row in best.items():
        print(f"bench: {n} tokens, fastest at recall >= {TARGET_RECALL}: "
              + (f"{row['pattern']} (block {row['block']}, loop {row['loop']}) {row['speedup']}x at recall "
                 f"{row['recall']}" if row else "none"), file=sys.stderr)  # fmt: skip
    report = {
        "benchmark": "sparse-attention",
        "device": torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)",
        "torch": torch.__version__,
        "shape": {"query_heads": hq, "kv_heads": hkv, "head_dim": d, "dtype": str(dtype)},
        "tuned_configs": tuned_configs() if cuda else {},
        "results": results,
        "fastest_at_target_recall": {str(n): row for n, row in best.items()},
    }
    write_report(args.out, report, table)
    return 0


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("sparse-attention", help="sparse Triton kernels vs SDPA at long lengths, with recall")

    def ints(s: str) -> list[int]:
        return [int(x) for x in s.split(",")]

    p.add_argument("--lengths", type=ints, default=None, help="default: 32K..1M on a GPU, 512,1024 on a CPU")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--shape", type=ints, default=None, help="HQ,HKV,D (overrides the per-device defaults)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 in the interpreter")
    p.add_argument("--patterns", type=lambda s: s.split(","), default=["vertical_slash", "a_shape", "block_sparse"])
    p.add_argument(
        "--patterns-at",
        action="append",
        default=[],
        metavar="LENGTH=PATTERNS",
        help="the patterns at one length instead of --patterns (repeatable), e.g. 1048576=vertical_slash",
    )
    p.add_argument("--vs", type=ints, default=[1000, 6096], help="vertical-slash k_v,k_s (MInference's default)")
    p.add_argument("--a-shape", type=ints, default=[1024, 4096], help="A-shape sinks,window")
    p.add_argument("--block-sparse", type=int, default=100, help="key blocks kept per query block")
    p.add_argument("--coverage", type=ints, default=[900, 900], help="coverage column,diagonal shares (per mille)")
    p.add_argument(
        "--query-aware", type=ints, default=[8, 950], help="query-aware rows sampled per block, share (per mille)"
    )
    p.add_argument("--blocks", type=ints, default=[64, 128], help="query rows per vertical-slash program to try")
    p.add_argument(
        "--loops",
        type=lambda s: s.split(","),
        default=None,
        help="the vertical-slash kernel's range loops to time (nested: one loop per segment; flat: one tile list; "
        "auto: autotuning picks either, the engine's default; default: all three on a GPU, nested,flat without, "
        "where auto runs nested)",
    )
    p.add_argument(
        "--chunks",
        type=ints,
        default=[],
        help="also prefill in chunks of these many queries, as the engine does (dense and sparse per chunk)",
    )
    p.add_argument(
        "--estimators",
        type=lambda s: s.split(","),
        default=["torch"],
        help="vertical/slash estimate implementations to time (torch, triton); the first one's plans are the rows'",
    )
    p.add_argument("--recall-rows", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpu", action="store_true", help="use the interpreter even when a GPU is present")
    p.add_argument("--out", type=Path, default=None, help="JSON path (and .md beside it); default: none")
    p.set_defaults(func=cmd_bench_sparse_attention)
