"""`optimist bench prefill-gemm`: a prefill chunk's matmul over 4-bit blocks with int8 activations
(`native.linear_int8`: each block of 32 activations rounded to int8, integer products on AVX-512 VNNI) against the
exact path the engine takes otherwise (the blocks widened to float32 for torch's GEMM, `NativeLinear.widened`), on
the same inputs, alternating, best of `repeats`; with both sides' rates, the ratio and the int8 path's error
relative to the exact product; then what the rounding does to a model's predictions (`model_agreement`). Prints
tables and writes JSON.

Shapes are "m:n:k" (rows, outputs, inputs); the defaults are SmolLM2-135M's matmuls at a 2,048-row chunk (QKV
fused, the output projection, gate or up, down) and one of Llama-3-8B's. Weights are random Q4_1 blocks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .report import best_alternating, markdown_table, positive_int, write_report

SHAPES = [(2048, 960, 576), (2048, 576, 576), (2048, 1536, 576), (2048, 576, 1536), (2048, 4096, 4096)]


def _shape(text: str) -> tuple[int, int, int]:
    try:
        m, n, k = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is m:n:k (rows : outputs : inputs), got {text!r}") from None
    if m <= 0 or n <= 0 or n % 32 or k <= 0 or k % 32:
        raise argparse.ArgumentTypeError(f"a shape needs m > 0 and n, k positive multiples of 32, got {text!r}")
    return m, n, k


def _measure(m: int, n: int, k: int, repeats: int, generator: Any) -> dict[str, Any]:
    import gguf
    import numpy as np
    import torch
    import torch.nn.functional as F

    from ..model import native

    rng = np.random.default_rng(n * k)
    raw = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), gguf.GGMLQuantizationType.Q4_1)
    weight = native.NativeWeight.from_gguf(raw, int(gguf.GGMLQuantizationType.Q4_1), n, k)
    layer = native.NativeLinear(weight, int8=True)
    assert layer.panels is not None
    lib, panels = native.library(), layer.panels
    x = torch.randn(m, k, generator=generator)
    out: dict[str, torch.Tensor] = {}

    def run_int8() -> None:
        out["int8"] = native.linear_int8(lib, panels, x)

    def run_float() -> None:
        out["float"] = F.linear(x, layer.widened())

    t_int8, t_float = best_alternating(run_int8, run_float, repeats)
    exact = x.double() @ layer.widened().double().t()
    error = ((out["int8"].double() - exact).norm() / exact.norm()).item()
    macs = m * n * k
    return {"m": m, "n": n, "k": k, "int8_ms": round(t_int8 * 1e3, 3), "float_ms": round(t_float * 1e3, 3),
            "int8_gmacs": round(macs / t_int8 / 1e9, 1), "float_gmacs": round(macs / t_float / 1e9, 1),
            "speedup": round(t_float / t_int8, 2), "relative_error": error}  # fmt: skip


def default_text() -> Path:
    """Natural English text on any machine with Python: its license."""
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"


def model_agreement(model_path: Path | None, text: Path, tokens: int) -> dict[str, Any]:
    """The model's next-token distributions at every position of `tokens` tokens of `text`, prefilled with int8 and
    with exact float32 matmuls: how often the top token agrees, their mean and largest KL divergence (exact ||
    int8) and the perplexity of the text under each."""
    import torch

    from ..config import EngineConfig
    from ..engine import Engine
    from ..model.llama import prompt_logits

    engine = Engine(EngineConfig(model=model_path, device="cpu", kv_cache_tokens=max(tokens, 256), prefill_gemm="int8"))
    try:
        ids = engine.tokenizer.encode(text.read_text(errors="replace"))[:tokens]
        exact = prompt_logits(engine.model, ids, int8=False, every_position=True).log_softmax(-1)
        rounded = prompt_logits(engine.model, ids, int8=True, every_position=True).log_softmax(-1)
        kl = (exact.exp() * (exact - rounded)).sum(-1)
        following = torch.tensor(ids[1:])[:, None]
        ppl = [float((-lp[:-1].gather(1, following).mean()).exp()) for lp in (exact, rounded)]
        return {"model": engine.model_name, "text": str(text), "tokens": len(ids),
                "top1_agreement": round(float((exact.argmax(-1) == rounded.argmax(-1)).float().mean()), 4),
                "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
                "perplexity_float": round(ppl[0], 3), "perplexity_int8": round(ppl[1], 3)}  # fmt: skip
    finally:
        engine.shutdown()


def cmd_bench_prefill_gemm(args: argparse.Namespace) -> int:
    import torch

    from ..malloc import keep_freed_memory
    from ..model import native

    if args.threads:
        torch.set_num_threads(args.threads)
    # as the CPU engine runs: freed memory stays with the process, so each call's outputs land on warm pages (without
    # it both sides page-faulted fresh ones every call: int8 measured 190-200 GMAC/s at SmolLM2's shapes, 440 warm)
    keep_freed_memory()
    reason = native.unavailable_reason()
    if reason is None and not native.library().native_vnni():
        reason = "this CPU has no AVX-512 VNNI: prefill matmuls stay float32 here"
    if reason is not None:
        print(f"bench prefill-gemm: {reason}", file=sys.stderr)
        return 2
    generator = torch.Generator().manual_seed(0)
    rows = []
    for m, n, k in args.shapes:
        rows.append(_measure(m, n, k, args.repeats, generator))
        print(rows[-1], file=sys.stderr)
    headers = ["rows", "outputs", "inputs", "int8 ms", "float ms", "int8 GMAC/s", "float GMAC/s", "int8 vs float",
               "int8 error"]  # fmt: skip
    table = markdown_table(
        headers,
        [[r["m"], r["n"], r["k"], r["int8_ms"], r["float_ms"], r["int8_gmacs"], r["float_gmacs"], r["speedup"],
          f"{r['relative_error']:.1e}"] for r in rows],
    )  # fmt: skip
    table += (
        f"\n\nRandom Q4_1 weights, Gaussian activations, {torch.get_num_threads()} threads; float: the blocks widened"
        " for the call and torch's float32 GEMM; int8: activations rounded per block of 32, including that step;"
        " error: |int8 - exact| / |exact| (Frobenius); freed memory kept, as in the engine."
    )
    report: dict[str, Any] = {"benchmark": "prefill-gemm", "repeats": args.repeats,
                              "threads": torch.get_num_threads(), "rows": rows}  # fmt: skip
    if args.model_tokens:
        text = args.text or default_text()
        if not text.is_file():
            print(f"bench prefill-gemm: no text at {text} (--text)", file=sys.stderr)
            return 2
        agreement = model_agreement(args.model, text, args.model_tokens)
        report["model_agreement"] = agreement
        table += "\n\n" + markdown_table(
            ["model", "tokens", "top-1 agreement", "KL mean", "KL max", "perplexity float", "perplexity int8"],
            [[agreement["model"], agreement["tokens"], agreement["top1_agreement"], f"{agreement['kl_mean']:.2e}",
              f"{agreement['kl_max']:.2e}", agreement["perplexity_float"], agreement["perplexity_int8"]]],
        )  # fmt: skip
        table += f"\n\nEvery position of {text.name}, prefilled once with int8 and once with float32 matmuls."
    print(table)
    write_report(args.out, report, table)
    return 0


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("prefill-gemm", help="prefill matmuls: int8 activations vs float32 over 4-bit blocks")
    p.add_argument("--shapes", type=lambda s: [_shape(x) for x in s.split(",")], default=SHAPES,
                   help="m:n:k triples (rows : outputs : inputs), comma-separated")  # fmt: skip
    p.add_argument("--repeats", type=positive_int, default=7, help="alternating runs per shape (best kept)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--model", type=Path, default=None, help="GGUF model for the agreement check (default: SmolLM2)")
    p.add_argument("--model-tokens", type=int, default=2048,
                   help="tokens of --text for the model's int8 vs float agreement; 0 = skip")  # fmt: skip
    p.add_argument("--text", type=Path, default=None, help="text for the agreement check (default: Python's license)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/prefill-gemm.json"))
    p.set_defaults(func=cmd_bench_prefill_gemm)
