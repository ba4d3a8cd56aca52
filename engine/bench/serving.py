"""`optimist bench serve`: generation throughput and latency of the engine over gRPC, with baselines.

Drives a running engine (or one it starts) with N concurrent streaming clients on a fixed mixed prompt set, every
request generating exactly `--max-tokens` tokens (EOS ignored) so all systems do the same work. Baselines in the
same run on the same token ids: Hugging Face transformers one request at a time and as a static batch, and
llama.cpp (llama-cpp-python) one request at a time when it is installed. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .report import markdown_table, write_report

PLAIN = [
    "The history of the Roman Empire can be summarised as follows:",
    'def merge_sort(items):\n    """Sort a list with merge sort."""\n',
    "Here is a recipe for a simple tomato soup. Ingredients:",
    "The three laws of thermodynamics are",
    "Once upon a time, in a kingdom by the sea, there lived a",
    "SELECT name, COUNT(*) FROM orders GROUP BY name ORDER BY",
    "Photosynthesis is the process by which plants",
    "A haiku about the first snow of winter:\n",
]
CHAT = [
    "Explain what a hash table is to a ten-year-old.",
    "Write a short email asking my landlord to fix the heating.",
    "What are the pros and cons of electric cars? Use bullet points.",
    "Give me three ideas for a birthday party for a seven-year-old.",
    "Summarise the plot of Romeo and Juliet in a few sentences.",
    "How do I reverse a linked list in Python? Show code.",
    "What causes the seasons on Earth?",
    "Translate 'Where is the train station?' into French, Spanish and German.",
]
LONG_CONTEXT = (
    "Read the following notes and answer the question at the end.\n"
    + " ".join(f"Note {i}: the meeting about project {i % 7} moved to room {100 + i}." for i in range(40))
    + "\nQuestion: where is the meeting about project 3?"
)


def prompt_set(tokenizer: Any) -> list[list[int]]:
    """The fixed mixed set as token ids: plain text, chat-templated questions, and one long-context prompt."""
    ids = [tokenizer.encode(p) for p in PLAIN]
    ids += [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": c}])) for c in CHAT]
    ids.append(tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": LONG_CONTEXT}])))
    return ids


@dataclass
class Result:
    system: str
    concurrency: int
    requests: int
    generated_tokens: int
    wall_s: float
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        del d["ttft_s"], d["itl_s"]
        d["tokens_per_s"] = round(self.tokens_per_s, 2)
        for name, values in (("ttft", self.ttft_s), ("itl", self.itl_s)):
            d[f"{name}_p50_ms"] = round(1000 * percentile(values, 50), 1) if values else None
            d[f"{name}_p99_ms"] = round(1000 * percentile(values, 99), 1) if values else None
        return d


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# ------------------------------------------------------------------------------------------- our engine


def _drive(
    prompts: list[list[int]], concurrency: int, one: Callable[[list[int]], tuple[float, list[float], int]]
) -> tuple[int, list[float], list[float], float]:
    """Runs `one` (a request: its start time, its tokens' arrival times, its token count) over the prompts from
    `concurrency` client threads; returns (tokens, TTFTs, inter-token gaps, wall seconds)."""
    ttfts: list[float] = []
    itls: list[float] = []
    total = 0
    lock = threading.Lock()

    def run(ids: list[int]) -> None:
        nonlocal total
        start, stamps, n = one(ids)
        with lock:
            total += n
            ttfts.append(stamps[0] - start)
            itls.extend(b - a for a, b in itertools.pairwise(stamps))

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(run, prompts))
    return total, ttfts, itls, time.perf_counter() - start


def run_engine(address: str, prompts: list[list[int]], concurrency: int, max_tokens: int) -> Result:
    import grpc

    from ..api import engine_pb2 as pb
    from ..api import engine_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(address)
    stub = pb_grpc.EngineStub(channel)

    def one(ids: list[int]) -> tuple[float, list[float], int]:
        req = pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=ids),
            sampling=pb.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
            return_text=False,
        )
        start = time.perf_counter()
        stamps: list[float] = []
        for msg in stub.Generate(req):
            if msg.HasField("chunk") and msg.chunk.token_ids:
                # a coalesced chunk: its tokens arrived together
                stamps.extend([time.perf_counter()] * len(msg.chunk.token_ids))
        return start, stamps, len(stamps)

    total, ttfts, itls, wall = _drive(prompts, concurrency, one)
    channel.close()
    return Result("optimist", concurrency, len(prompts), total, wall, ttfts, itls)


def run_http(url: str, prompts: list[list[int]], concurrency: int, max_tokens: int) -> Result:
    """The same work through the OpenAI-compatible API: streamed /v1/completions over HTTP/1.1, one connection per
    client thread. Tokens are counted from the final usage; a chunk carries the tokens of one engine batch."""
    import http.client
    import json
    from urllib.parse import urlparse

    parts = urlparse(url)
    local = threading.local()

    def one(ids: list[int]) -> tuple[float, list[float], int]:
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=600)
        body = {"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        start = time.perf_counter()
        local.conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = local.conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
        stamps: list[float] = []
        n = 0
        for line in resp:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
        return start, stamps, n

    total, ttfts, itls, wall = _drive(prompts, concurrency, one)
    return Result("optimist (OpenAI HTTP)", concurrency, len(prompts), total, wall, ttfts, itls, "ITL: chunk gaps")


# -------------------------------------------------------------------------------------------- baselines


def load_transformers(model_path: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name).eval()
    return model.to("cuda") if torch.cuda.is_available() else model  # the same device as the engine's default


def run_transformers_single(model: Any, prompts: list[list[int]], max_tokens: int) -> Result:
    import torch

    ttfts, total, wall = [], 0, 0.0
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids], device=model.device)
            t0 = time.perf_counter()
            model.generate(x, max_new_tokens=1, do_sample=False, pad_token_id=0)
            ttfts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = model.generate(
                x, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0
            )
            wall += time.perf_counter() - t0
            total += out.shape[1] - len(ids)
    itl = (wall - sum(ttfts)) / max(1, total - len(prompts))
    return Result("transformers (one at a time)", 1, len(prompts), total, wall, ttfts, [itl], "ITL is the mean")


def run_transformers_batch(model: Any, prompts: list[list[int]], max_tokens: int) -> Result:
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=model.device)  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        fixed = {"max_new_tokens": max_tokens, "min_new_tokens": max_tokens}
        out = model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, **fixed)
        wall = time.perf_counter() - t0
    total = (out.shape[1] - width) * len(prompts)
    itl = (wall - ttft) / max(1, max_tokens - 1)
    return Result(
        "transformers (static batch)", len(prompts), len(prompts), total, wall, [ttft] * len(prompts), [itl],
        "one padded batch; every request waits for the whole batch",
    )  # fmt: skip


def run_llama_cpp(model_path: Path, prompts: list[list[int]], max_tokens: int, threads: int, eos: int) -> Result:
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), n_ctx=4096, n_threads=threads, verbose=False, logits_all=False)
    ttfts: list[float] = []
    itls: list[float] = []
    total, wall = 0, 0.0
    for ids in prompts:
        llm.reset()
        t0 = time.perf_counter()
        stamps = []
        stream = llm.create_completion(
            ids, max_tokens=max_tokens, temperature=0.0, stream=True, logit_bias={eos: -1e9}
        )  # fmt: skip
        for _ in stream:
            stamps.append(time.perf_counter())
        wall += time.perf_counter() - t0
        total += len(stamps)
        ttfts.append(stamps[0] - t0)
        itls.extend(b - a for a, b in itertools.pairwise(stamps))
    return Result("llama.cpp (one at a time)", 1, len(prompts), total, wall, ttfts, itls)


# ------------------------------------------------------------------------------------------------ driver


def format_table(rows: list[dict[str, Any]]) -> str:
    headers = ["system", "concurrency", "requests", "tokens", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms",
               "ITL p99 ms"]  # fmt: skip
    keys = ["system", "concurrency", "requests", "generated_tokens", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms",
            "itl_p50_ms", "itl_p99_ms"]  # fmt: skip
    return markdown_table(headers, [[f"{r[k]:.1f}" if k == "tokens_per_s" else r[k] for k in keys] for r in rows])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(args: argparse.Namespace, weights: str) -> tuple[subprocess.Popen[bytes], str, str]:
    """(process, gRPC address, OpenAI HTTP URL or "")."""
    from ..client import wait_ready

    port = _free_port()
    http_port = _free_port() if "http" in args.apis else None
    http = ["--http-port", str(http_port)] if http_port else ["--no-http"]
    cmd = [sys.executable, "-m", "optimist.engine.cli", "serve", "--port", str(port), *http]
    if args.model:
        cmd += ["--model", str(args.model)]
    cmd += ["--kv-cache-tokens", str(args.kv_cache_tokens), "--max-num-seqs", str(max(args.concurrency))]
    cmd += ["--weights", weights]
    if not args.prefix_caching:  # the prompt set repeats: measure the work per request, as the baselines do it
        cmd += ["--no-prefix-caching"]
    proc = subprocess.Popen(cmd)
    address = f"127.0.0.1:{port}"
    wait_ready(address, timeout_s=600)
    return proc, address, f"http://127.0.0.1:{http_port}" if http_port else ""


def cmd_bench_serve(args: argparse.Namespace) -> int:
    import torch

    from ..config import default_model_path
    from ..model.loader import load_model

    model_path = args.model or default_model_path()
    print(f"bench: model {model_path}", file=sys.stderr)
    tokenizer = load_model(model_path).tokenizer
    prompts = prompt_set(tokenizer)
    rows: list[Result] = []
    baselines = set(args.baselines)

    def llama_cpp(when: str) -> None:
        # Measured before and after our rows: this machine's speed drifts over the minutes between them.
        if "llamacpp" not in baselines:
            return
        try:
            result = run_llama_cpp(
                model_path, prompts[: args.single_requests], args.max_tokens, torch.get_num_threads(),
                tokenizer.eos_ids[0],
            )  # fmt: skip
        except ImportError:
            print("bench: llama-cpp-python is not installed; llama.cpp baseline skipped", file=sys.stderr)
            baselines.discard("llamacpp")
            return
        result.system = f"llama.cpp (one at a time, {when})"
        rows.append(result)

    llama_cpp("before")

    # A running server was started with its own weights: measure it once, under its address.
    for weights in [args.server] if args.server else args.weights:
        proc, address, url = (None, args.server, "") if args.server else _start_server(args, weights)
        label = f"optimist (server at {weights})" if args.server else f"optimist ({weights} weights)"
        try:
            run_engine(address, prompts[:2], 2, 4)  # warm-up
            if url:
                run_http(url, prompts[:2], 2, 4)
            for c in args.concurrency:
                n = max(c, args.requests) if c > 1 else args.single_requests
                work = [prompts[i % len(prompts)] for i in range(n)]
                for api in args.apis:  # one after the other at each level: the same server, the same minutes
                    print(f"bench: {label}, {api}, concurrency {c}, {n} requests", file=sys.stderr)
                    if api == "http":
                        result = run_http(url, work, c, args.max_tokens)
                        result.system = f"{label[:-1]}, OpenAI HTTP)"
                    else:
                        result = run_engine(address, work, c, args.max_tokens)
                        result.system = label
                    rows.append(result)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)

    if "transformers" in baselines:
        print("bench: transformers (loading)", file=sys.stderr)
        model = load_transformers(model_path)
        rows.append(run_transformers_single(model, prompts[: args.single_requests], args.max_tokens))
        big = max(args.concurrency)
        rows.append(run_transformers_batch(model, [prompts[i % len(prompts)] for i in range(big)], args.max_tokens))
        del model
    llama_cpp("after")

    summaries = [r.summary() for r in rows]
    table = format_table(summaries)
    print(table)
    report = {
        "benchmark": "serve",
        "model": str(model_path.name),
        "max_tokens": args.max_tokens,
        "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "results": summaries,
    }
    write_report(args.out, report, table)
    grpc_rows = {(r.system, r.concurrency): r for r in rows}
    for r in rows:
        if r.system.endswith("OpenAI HTTP)"):
            base = grpc_rows.get((r.system.replace(", OpenAI HTTP)", ")"), r.concurrency))
            if base is not None and base.tokens_per_s > 0:
                ratio = r.tokens_per_s / base.tokens_per_s
                print(f"bench: {r.system} x{r.concurrency} = {ratio:.2f}x gRPC (tok/s)", file=sys.stderr)
    ours = [r for r in rows if r.system.startswith("optimist")]
    for r in rows:
        if not r.system.startswith("optimist") and ours:
            for o in ours:
                ratio = o.tokens_per_s / r.tokens_per_s
                print(f"bench: {o.system} x{o.concurrency} = {ratio:.2f}x {r.system} (tok/s)", file=sys.stderr)
    return 0


BASELINES = ("transformers", "llamacpp")
WEIGHTS = ("auto", "float", "fp16", "int4")
APIS = ("grpc", "http")


def comma_list(allowed: tuple[str, ...], what: str) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated list of names from `allowed` (empty allowed); others are an error."""

    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad)} (choose from {', '.join(allowed)})")
        return items

    return parse


def positive_ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"concurrency levels must be at least 1, got {text!r}")
    return values


def add_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks (print a table, write JSON)")
    kinds = bench.add_subparsers(dest="bench", required=True)
    serve = kinds.add_parser("serve", help="generation throughput and latency over gRPC, with baselines")
    serve.add_argument("--server", default=None, help="a running engine; default: start one")
    serve.add_argument("--model", type=Path, default=None)
    serve.add_argument("--kv-cache-tokens", type=int, default=65536)
    serve.add_argument("--concurrency", type=positive_ints, default=[1, 8, 32])
    serve.add_argument("--requests", type=int, default=64, help="requests per concurrency level above 1")
    serve.add_argument("--single-requests", type=int, default=4, help="requests at concurrency 1 and for baselines")
    serve.add_argument("--max-tokens", type=int, default=64)
    serve.add_argument(
        "--weights",
        type=comma_list(WEIGHTS, "weight mode"),
        default=["float", "fp16", "int4"],
        help="engine weight modes to run (ignored with --server)",
    )
    serve.add_argument(
        "--apis",
        type=comma_list(APIS, "API"),
        default=["grpc"],
        help="how to drive the engine: grpc (optimist.v1.Engine) and/or http (the OpenAI-compatible API, same server)",
    )
    serve.add_argument(
        "--prefix-caching", action="store_true", help="let the engine reuse the repeated prompts' K/V (default: off)"
    )
    serve.add_argument(
        "--baselines",
        type=comma_list(BASELINES, "baseline"),
        default=list(BASELINES),
        help="comma list; empty for none",
    )
    serve.add_argument("--out", type=Path, default=Path("benchmarks/results/serving-cpu.json"))
    serve.set_defaults(func=cmd_bench_serve)

    from .scheduling import add_parser as add_schedule

    add_schedule(kinds)

    from .autoscale import add_parser as add_autoscale

    add_autoscale(kinds)

    from .routing import add_parser as add_routing

    add_routing(kinds)

    from .optimum import add_parser as add_optimum

    add_optimum(kinds)

    from .policies import add_parser as add_policies

    add_policies(kinds)

    from .structured import add_parser as add_structured

    add_structured(kinds)

    from .speculative import add_parser as add_speculative

    add_speculative(kinds)

    from .lora import add_parser as add_lora

    add_lora(kinds)

    from .prefill import add_parser as add_prefill

    add_prefill(kinds)

    from .sidecar import add_parser as add_sidecar

    add_sidecar(kinds)

    from .sparse_attention import add_parser as add_sparse_attention

    add_sparse_attention(kinds)

    from .cpu_attention import add_parser as add_cpu_attention

    add_cpu_attention(kinds)

    from .prefill_gemm import add_parser as add_prefill_gemm

    add_prefill_gemm(kinds)
