"""`optimist` command line. Environment variables and flags are read here and nowhere else."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from .config import ConfigError, EngineConfig


class _Progress:
    """Prints loading progress to stderr, at most every half second."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.last = 0.0
        self.start = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - self.last > 0.5:
            self.last = now
            end = "\n" if done == total else "\r"
            print(f"{self.label}: {done}/{total} ({now - self.start:.1f} s)", end=end, file=sys.stderr, flush=True)


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None, help="a .gguf file or a Hugging Face folder (default: SmolLM2)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument(
        "--weights",
        default="auto",
        choices=["auto", "float", "fp16", "int4"],
        help="auto (default): int4 for a GGUF model on CPU where the native kernels build, else fp16 on an x86 CPU, "
        "else float; float: exact; fp16 (CPU): float16 weights, float32 arithmetic, logits within ~0.1%%; int4 "
        "(CPU): the GGUF file's own Q4_0/Q4_1/Q8_0 blocks read by native C kernels with float32 arithmetic (exact "
        "weights; ~3x fp16's single-stream decode)",
    )
    p.add_argument(
        "--prefill-gemm",
        default="auto",
        choices=["auto", "float", "int8"],
        help="matmuls of prefill chunks (1,024 rows and more) over int4 weights: int8 rounds each block of 32 "
        "activations to int8 and sums the products with the 4-bit weights as integers (llama.cpp's method; AVX-512 "
        "VNNI CPUs; ~2x float32's GEMM rate, outputs within ~1%%); float: float32 over the widened blocks (exact); "
        "auto (default): int8 where the CPU has VNNI",
    )
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "float32", "float16"],
        help="auto (default): the model's dtype; float16 (CPU, float32 model): K/V stored in half the bytes, so "
        "twice the tokens in the same memory and decode steps at long contexts read half as much (each K/V value "
        "rounded to float16)",
    )
    p.add_argument("--kv-cache-tokens", type=int, default=EngineConfig.kv_cache_tokens, help="KV capacity in tokens")
    p.add_argument("--kv-block-size", type=int, default=EngineConfig.kv_block_size)
    p.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs, help="largest running batch")
    p.add_argument("--max-batched-tokens", type=int, default=EngineConfig.max_num_batched_tokens)
    p.add_argument("--max-waiting", type=int, default=EngineConfig.max_waiting)
    p.add_argument(
        "--scheduler",
        default=EngineConfig.scheduler,
        choices=["amin", "amin-learned", "amax", "fcfs"],
        help="scheduling policy",
    )
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--served-model-name", default="", help="model name reported to clients (default: the model's)")
    p.add_argument("--max-model-len", type=int, default=0, help="context in tokens (default: the model's own)")
    p.add_argument(
        "--sparse-prefill-threshold",
        type=int,
        default=0,
        help="prompts longer than this many tokens prefill with sparse attention (0 = off)",
    )
    p.add_argument("--sparse-patterns", type=Path, default=None, help="per-head pattern file (search-patterns)")
    p.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="do not share the K/V of equal prompt prefixes between requests",
    )
    p.add_argument(
        "--no-jump-forward",
        dest="jump_forward",
        action="store_false",
        help="structured outputs: sample every token, also those the language forces (default: append them at once)",
    )
    p.add_argument(
        "--speculative-tokens",
        type=int,
        default=EngineConfig.speculative_tokens,
        help="speculative decoding: up to this many tokens per decode step guessed from earlier occurrences of the "
        "request's last tokens (n-gram prompt lookup) and checked in the same step; 0 = off",
    )
    p.add_argument("--speculative-ngram-min", type=int, default=EngineConfig.speculative_ngram_min)
    p.add_argument("--speculative-ngram-max", type=int, default=EngineConfig.speculative_ngram_max)
    p.add_argument(
        "--speculative-config",
        type=_speculative_json,
        default=None,
        help='vLLM\'s form of the three options above, e.g. \'{"method": "ngram", "num_speculative_tokens": 4, '
        '"prompt_lookup_max": 4, "prompt_lookup_min": 1}\' (ngram is the only method)',
    )
    p.add_argument(
        "--lora-modules",
        nargs="+",
        type=_lora_module,
        default=[],
        metavar="NAME=PATH",
        help="LoRA adapters to serve (PEFT directories), each requested by its NAME as the model (OpenAI `model`, "
        'gRPC `adapter`); vLLM\'s JSON form \'{"name": N, "path": P}\' works too',
    )
    p.add_argument(
        "--enable-lora",
        action="store_true",
        help="LoRA adapters may be used (implied by --lora-modules; needed to load them only while serving)",
    )
    p.add_argument(
        "--max-loras",
        type=int,
        default=EngineConfig.max_loras,
        help="most distinct LoRA adapters among the running requests; requests of another one wait for a slot",
    )
    p.add_argument(
        "--max-lora-rank", type=int, default=EngineConfig.max_lora_rank, help="adapters above it are refused"
    )
    p.add_argument("--max-loaded-loras", type=int, default=EngineConfig.max_loaded_loras)
    p.add_argument(
        "--allow-runtime-lora-updating",
        action="store_true",
        default=os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("1", "true"),
        help="the OpenAI API's /v1/load_lora_adapter and /v1/unload_lora_adapter work (they read any path the "
        "server can: keep the API behind a key); also VLLM_ALLOW_RUNTIME_LORA_UPDATING=true",
    )
    p.add_argument(
        "--kv-cache-memory-fraction",
        type=float,
        default=0.0,
        help="CUDA: size the KV cache as this share of the memory free after loading (overrides --kv-cache-tokens)",
    )


_VLLM_SPECULATIVE_KEYS = {
    "num_speculative_tokens": "speculative_tokens",
    "prompt_lookup_min": "speculative_ngram_min",
    "prompt_lookup_max": "speculative_ngram_max",
}


def _speculative_json(text: str) -> dict[str, int]:
    """--speculative-config: vLLM's JSON object, as EngineConfig fields; argparse reports the ValueError's text."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    method = value.get("method", "ngram")
    if method != "ngram":
        raise argparse.ArgumentTypeError(f"method {method!r} is not offered; only ngram (prompt lookup)")
    fields = {}
    for key, item in value.items():
        if key == "method":
            continue
        if key not in _VLLM_SPECULATIVE_KEYS:
            raise argparse.ArgumentTypeError(f"unknown key {key!r}; takes method, {', '.join(_VLLM_SPECULATIVE_KEYS)}")
        if not isinstance(item, int) or isinstance(item, bool):
            raise argparse.ArgumentTypeError(f"{key} must be an integer, got {item!r}")
        fields[_VLLM_SPECULATIVE_KEYS[key]] = item
    return fields


def _lora_module(text: str) -> tuple[str, Path]:
    """--lora-modules item: NAME=PATH, or vLLM's JSON object {"name", "path"[, "base_model_name"]}."""
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
        if (
            not isinstance(value, dict)
            or not isinstance(value.get("name"), str)
            or not isinstance(value.get("path"), str)
        ):
            raise argparse.ArgumentTypeError('the JSON form is {"name": NAME, "path": PATH}')
        unknown = set(value) - {"name", "path", "base_model_name"}
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown key {sorted(unknown)[0]!r}; takes name, path, base_model_name")
        return value["name"], Path(value["path"])
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=PATH")
    return name, Path(path)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    config = EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        weights=args.weights,
        prefill_gemm=args.prefill_gemm,
        kv_cache_dtype=args.kv_cache_dtype,
        kv_cache_tokens=args.kv_cache_tokens,
        kv_block_size=args.kv_block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_batched_tokens,
        max_waiting=args.max_waiting,
        scheduler=args.scheduler,
        threads=args.threads,
        served_model_name=args.served_model_name,
        max_model_len=args.max_model_len,
        kv_cache_memory_fraction=args.kv_cache_memory_fraction,
        sparse_prefill_threshold=args.sparse_prefill_threshold,
        sparse_patterns=args.sparse_patterns,
        prefix_caching=args.prefix_caching,
        jump_forward=args.jump_forward,
        speculative_tokens=args.speculative_tokens,
        speculative_ngram_min=args.speculative_ngram_min,
        speculative_ngram_max=args.speculative_ngram_max,
        lora_modules=tuple(args.lora_modules),
        enable_lora=args.enable_lora,
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        max_loaded_loras=args.max_loaded_loras,
        runtime_lora_updating=args.allow_runtime_lora_updating,
    )
    if args.speculative_config is not None:
        config = dataclasses.replace(config, **args.speculative_config)
    config.validate()
    return config


async def _serve(
    config: EngineConfig, host: str, port: int, grace_s: float, http_port: int | None, api_key: str | None
) -> None:
    from .server import Server

    server = Server(config, host, port, grace_s, http_port=http_port, api_key=api_key)
    await server.start()
    http = f"; OpenAI-compatible HTTP on {host}:{server.http.port}" if server.http else ""
    print(f"optimist: gRPC on {host}:{server.port}{http}; loading the model", file=sys.stderr, flush=True)
    try:
        await server.load(_Progress("loading model tensors"))
    except BaseException:
        await server.close()
        raise
    print(f"optimist: ready on {host}:{server.port}", file=sys.stderr, flush=True)
    await server.serve_forever()


def read_api_key(path: Path | None) -> str | None:
    """The OpenAI API's key from a file (a mounted Secret: the key never shows in the process list)."""
    if path is None:
        return None
    try:
        key = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--api-key-file: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    if not key or any(c.isspace() for c in key):
        raise ConfigError(f"--api-key-file: {path} must hold one key without spaces, got {len(key)} characters")
    return key


def cmd_serve(args: argparse.Namespace) -> int:
    http_port = None if args.no_http else args.http_port
    config = engine_config(args)
    api_key = read_api_key(args.api_key_file)
    asyncio.run(_serve(config, args.host, args.port, args.grace_period, http_port, api_key))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import grpc

    from .api import engine_pb2 as pb
    from .client import build_request, stream

    try:
        structured = _structured_option(args)
    except OSError as exc:
        print(f"optimist generate: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    request = build_request(args.prompt, args.chat, args.max_tokens, args.temperature, args.seed)
    if structured is not None:
        request.sampling.structured_output.CopyFrom(structured)
    request.adapter = args.adapter
    try:
        for msg in stream(args.server, request, args.timeout):
            if msg.HasField("chunk"):
                print(msg.chunk.text, end="", flush=True)
            else:
                f = msg.final
                reason = pb.FinishReason.Name(f.finish_reason).removeprefix("FINISH_REASON_").lower()
                print()
                print(
                    f"[{reason}; {f.usage.prompt_tokens} prompt + {f.usage.completion_tokens} completion tokens; "
                    f"first token {f.timings.time_to_first_token_s:.2f} s; total {f.timings.total_s:.2f} s]",
                    file=sys.stderr,
                )
    except grpc.RpcError as exc:
        print(f"optimist generate: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0


def _structured_option(args: argparse.Namespace) -> Any:
    """The StructuredOutput that generate's --json-schema / --json / --regex / --choice / --grammar asks for."""
    from .api import engine_pb2 as pb

    def text(value: str) -> str:  # @FILE reads the file, as curl does
        return Path(value[1:]).read_text() if value.startswith("@") else value

    if args.json_schema is not None:
        return pb.StructuredOutput(json_schema=text(args.json_schema))
    if args.json:
        return pb.StructuredOutput(json_object=True)
    if args.regex is not None:
        return pb.StructuredOutput(regex=text(args.regex))
    if args.choice:
        return pb.StructuredOutput(choice=pb.Choices(choices=args.choice))
    if args.grammar is not None:
        return pb.StructuredOutput(grammar=text(args.grammar))
    return None


def cmd_demo(args: argparse.Namespace) -> int:
    """Starts the engine on the default model, asks it one question over gRPC, prints the answer, stops."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "optimist.engine.cli", "serve", "--port", str(port), "--no-http"])
    try:
        from .client import wait_ready

        wait_ready(address, timeout_s=300)
        print(f"> {args.prompt}", flush=True)
        args.server, args.chat, args.seed, args.timeout = address, True, None, 300
        args.json_schema = args.regex = args.choice = args.grammar = None  # a free answer
        args.json = False
        args.adapter = ""  # the base model
        return cmd_generate(args)
    finally:
        server.terminate()
        server.wait(timeout=60)


def cmd_sidecar(args: argparse.Namespace) -> int:
    from .sidecar import SidecarConfig, run_sidecar

    if args.interval_ms < 50:
        raise ConfigError(f"--interval-ms must be at least 50, got {args.interval_ms}")
    config = SidecarConfig(
        engine=args.engine,
        host=args.host,
        port=args.port,
        interval_ms=args.interval_ms,
        pool=args.pool,
        vllm_compat=not args.no_vllm_metrics,
    )
    print(
        f"optimist sidecar: /metrics on {args.host}:{args.port}, following {args.engine}", file=sys.stderr, flush=True
    )
    asyncio.run(run_sidecar(config))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    import json
    import math

    from .scheduler.policies import make_policy
    from .scheduler.simulator import simulate
    from .scheduler.workload import read_workload

    workload = read_workload(args.workload)
    if args.policy == "opt":
        from .scheduler.optimum import exact_optimum

        if args.prefill_tokens_per_step:
            raise ValueError("--policy opt models free prefill; drop --prefill-tokens-per-step")
        result = exact_optimum(workload, args.memory)
    else:
        params = {"growth": args.growth} if args.policy in ("amin", "amin-learned") else {}
        result = simulate(
            workload,
            make_policy(args.policy, **params),
            args.memory,
            evict_cost=args.evict_cost,
            prefill_tokens_per_step=args.prefill_tokens_per_step or math.inf,
        )
    summary = result.summary()
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>14}: {value:.2f}" if isinstance(value, float) else f"{key:>14}: {value}")
    return 0


def cmd_search_patterns(args: argparse.Namespace) -> int:
    from .attention.sparse.config import save_pattern_config
    from .attention.sparse.search import calibration_text, evaluate, records_text, search
    from .model.llama import Llama
    from .model.loader import load_model

    if args.budget < 64:
        raise ConfigError(f"--budget must be at least 64 keys per row, got {args.budget}")
    if args.target_recall is not None and not 0 < args.target_recall <= 1:
        raise ConfigError(f"--target-recall must be in (0, 1], got {args.target_recall}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model_path = args.model if args.model is not None else EngineConfig().model_path()
    loaded = load_model(model_path, progress=_Progress("loading model tensors"))
    model = Llama.for_weights(loaded.config)
    model.load_weights(loaded.weights)
    model.eval()
    model.init_rope()
    if args.prompt_file:
        texts = [f.read_text() for f in args.prompt_file]
    else:  # prose and structured records: heads whose attention follows the prompt show on the pair
        texts = [calibration_text(args.length * 4), records_text(args.length * 4)]
    prompts = [loaded.tokenizer.encode(t)[: min(args.length, loaded.config.context_length)] for t in texts]
    for prompt, text in zip(prompts, args.prompt_file or ["the built-in calibration text"], strict=False):
        if len(prompt) < 128:
            raise ConfigError(f"{text}: the calibration prompt has {len(prompt)} tokens; give at least 128")
    tokens = prompts[0]
    print(f"search-patterns: {' + '.join(str(len(p)) for p in prompts)} calibration tokens, budget {args.budget} "
          "keys per row", file=sys.stderr)  # fmt: skip
    result = search(model, tokens, args.budget, progress=_Progress("layers searched"),
                    target_recall=args.target_recall, also=prompts[1:])  # fmt: skip
    save_pattern_config(args.output, result.patterns)
    scores = [p.score for layer in result.patterns for p in layer]
    summary = {"output": str(args.output), "tokens": [len(p) for p in prompts], "budget": args.budget,
               "target_recall": args.target_recall,
               "density": round(result.density, 4), "mean_recall": round(sum(scores) / len(scores), 4),
               "min_recall": min(scores)}  # fmt: skip
    if args.eval_file:
        eval_tokens = loaded.tokenizer.encode(args.eval_file.read_text())[: len(tokens)]
        rec, dens = evaluate(model, eval_tokens, result.patterns)
        summary |= {"eval_tokens": len(eval_tokens), "eval_recall": round(rec, 4), "eval_density": round(dens, 4)}
    print(json.dumps(summary))
    return 0


def cmd_check_kernels(args: argparse.Namespace) -> int:
    import torch

    from .attention.sparse.compile_check import as_json, check_kernels, summary, table

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    if args.block is not None and (args.block < 16 or args.block & (args.block - 1)):
        print(f"optimist check-kernels: --block {args.block} must be a power of two of at least 16", file=sys.stderr)
        return 2
    rows = check_kernels(args.arch, dtype, args.head_dim, block=args.block)
    print(table(rows, args.arch))
    problems = summary(rows)
    if args.out:
        report = {"arch": args.arch, "dtype": args.dtype, "head_dim": args.head_dim, "block": args.block,
                  "rows": as_json(rows)}  # fmt: skip
        args.out.write_text(json.dumps(report | {"problems": problems}, indent=1) + "\n")
    for problem in problems:
        print(f"optimist check-kernels: {problem}", file=sys.stderr)
    return 1 if problems else 0


def cmd_operator(args: argparse.Namespace) -> int:
    from optimist.operator.main import main as operator_main

    return operator_main(args.kubeconfig, args.namespace, args.liveness or None, args.drift_interval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optimist", description="Optimist LLM serving")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the engine (gRPC, and OpenAI-compatible HTTP)")
    _engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=50051, help="gRPC port (optimist.v1.Engine, KServe v2, health)")
    serve.add_argument(
        "--http-port",
        type=int,
        default=8000,
        help="OpenAI-compatible HTTP port (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics); "
        "0 = a free port",
    )
    serve.add_argument("--no-http", action="store_true", help="serve gRPC only")
    serve.add_argument(
        "--api-key-file",
        type=Path,
        default=None,
        help="a file holding the key the OpenAI API's /v1 routes require as `Authorization: Bearer KEY`",
    )
    serve.add_argument("--grace-period", type=float, default=30.0, help="seconds to finish requests on SIGTERM")
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="send one request to a running engine and stream the answer")
    gen.add_argument("prompt")
    gen.add_argument("--server", default="127.0.0.1:50051")
    gen.add_argument("--adapter", default="", help="a LoRA adapter the server has loaded (default: the base model)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message (chat template)")
    gen.add_argument("--max-tokens", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    shape = gen.add_mutually_exclusive_group()  # structured output (@FILE reads a file)
    shape.add_argument("--json-schema", metavar="SCHEMA", help="the answer is JSON of this JSON Schema (or @FILE)")
    shape.add_argument("--json", action="store_true", help="the answer is a JSON object")
    shape.add_argument("--regex", help="the answer matches this regular expression (or @FILE)")
    shape.add_argument("--choice", action="append", help="the answer is one of these (repeat the option)")
    shape.add_argument("--grammar", help="the answer is a text of this Lark or GBNF grammar (or @FILE)")
    gen.set_defaults(func=cmd_generate)

    demo = sub.add_parser("demo", help="start the engine on the default model and ask it one question")
    demo.add_argument("prompt", nargs="?", default="What is the capital of France? Answer in one sentence.")
    demo.add_argument("--max-tokens", type=int, default=64)
    demo.add_argument("--temperature", type=float, default=0.0)
    demo.set_defaults(func=cmd_demo)

    side = sub.add_parser("sidecar", help="serve Prometheus metrics about a running engine")
    side.add_argument("--engine", default="127.0.0.1:50051", help="the engine's gRPC address")
    side.add_argument("--host", default="0.0.0.0")
    side.add_argument("--port", type=int, default=9090)
    side.add_argument("--interval-ms", type=int, default=1000, help="how often the engine sends its load")
    side.add_argument("--pool", default="", help="value of the pool label (the InferencePool's name)")
    side.add_argument("--no-vllm-metrics", action="store_true", help="omit the vllm:* compatibility series")
    side.set_defaults(func=cmd_sidecar)

    sim = sub.add_parser("simulate", help="run the scheduling simulator on a JSON Lines workload")
    sim.add_argument("--workload", type=Path, required=True, help="JSON Lines, one request per line")
    sim.add_argument(
        "--policy",
        required=True,
        choices=["hsf", "amax", "amin", "amin-learned", "fcfs", "opt"],
        help="opt: the exact optimum in hindsight, by integer programming (small workloads)",
    )
    sim.add_argument("--memory", type=int, required=True, help="KV capacity in tokens")
    sim.add_argument("--evict-cost", default="lost", choices=["lost", "recompute"])
    sim.add_argument("--prefill-tokens-per-step", type=float, default=0, help="prefill speed; 0 = free (default)")
    sim.add_argument("--growth", default="increment", choices=["increment", "double"], help="A_min bound growth")
    sim.add_argument("--json", action="store_true", help="print one JSON object")
    sim.set_defaults(func=cmd_simulate)

    sp = sub.add_parser("search-patterns", help="choose each head's sparse-prefill pattern on a calibration prompt")
    sp.add_argument("--model", type=Path, default=None, help="a .gguf file or a Hugging Face folder (default: SmolLM2)")
    sp.add_argument("--output", type=Path, required=True, help="pattern file to write (MInference's JSON format)")
    sp.add_argument(
        "--prompt-file",
        type=Path,
        action="append",
        help="calibration text; repeat for several (default: built-in prose and a built-in structured log)",
    )
    sp.add_argument("--length", type=int, default=4096, help="calibration tokens (the prompt is cut to this)")
    sp.add_argument("--budget", type=int, default=1024, help="keys per query row every candidate may visit")
    sp.add_argument(
        "--target-recall",
        type=float,
        default=None,
        help="spend what it takes for this mean recall on the calibration prompt (instead of --budget's limit)",
    )
    sp.add_argument(
        "--eval-file", type=Path, default=None, help="another text to report the chosen patterns' recall on"
    )
    sp.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    sp.set_defaults(func=cmd_search_patterns)

    ck = sub.add_parser(
        "check-kernels",
        help="compile the sparse-prefill Triton kernels for an NVIDIA GPU (no GPU needed) and report each "
        "autotuning candidate's shared memory, registers and machine instructions per key tile",
    )
    ck.add_argument("--arch", type=int, default=90, help="compute capability x 10: 80 A100, 89 L4/L40, 90 H100/H200")
    ck.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ck.add_argument("--head-dim", type=int, default=128, help="attention head size (a power of two, at least 16)")
    ck.add_argument("--block", type=int, default=None, help="query rows per program (default: the engine's, 64)")
    ck.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    ck.set_defaults(func=cmd_check_kernels)

    op = sub.add_parser("operator", help="run the Kubernetes operator for InferencePools (kopf)")
    op.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster, else $KUBECONFIG)")
    op.add_argument(
        "--namespace", action="append", default=[], help="watch only this namespace (repeatable; default: all)"
    )
    op.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint URL ('' = none)")
    op.add_argument("--drift-interval", type=float, default=60.0, help="seconds between drift checks of each pool")
    op.set_defaults(func=cmd_operator)

    from .bench.serving import add_parser as add_bench

    add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except (ConfigError, OSError, TimeoutError, RuntimeError, ValueError) as exc:
        print(f"optimist {args.command}: error: {exc}".splitlines()[0], file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
