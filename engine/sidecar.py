"""The metrics sidecar: follows the engine's load over local gRPC (WatchLoad) and serves Prometheus `/metrics`,
`/healthz` (the sidecar runs) and `/readyz` (the engine answers and reports ready).

It only reads what the engine streams, at its own interval, so it costs the engine one snapshot per interval.
When the engine goes away (restart, crash) the sidecar reports not-ready and keeps reconnecting; it never exits
on its own. Series are exported only while the stream is fresh, so autoscalers never act on stale values.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

import grpc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .api import engine_pb2 as pb
from .api import engine_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SidecarConfig:
    engine: str = "127.0.0.1:50051"
    host: str = "0.0.0.0"
    port: int = 9090
    interval_ms: int = 1000
    pool: str = ""
    vllm_compat: bool = True  # the vllm:* series the Gateway API Inference Extension reads


class LoadFollower:
    """Keeps the latest Load snapshot from the engine's WatchLoad stream, reconnecting with backoff."""

    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        self.latest: pb.Load | None = None
        self.received_at = 0.0
        self.connected = False
        self.reconnects = 0

    @property
    def fresh(self) -> bool:
        """Connected and heard from within three intervals."""
        window = 3 * self.config.interval_ms / 1000
        return self.connected and self.latest is not None and time.monotonic() - self.received_at < window

    @property
    def ready(self) -> bool:
        return self.fresh and self.latest is not None and self.latest.ready

    async def run(self) -> None:
        backoff = 0.2
        while True:
            try:
                async with grpc.aio.insecure_channel(self.config.engine) as channel:
                    stub = pb_grpc.EngineStub(channel)
                    stream = stub.WatchLoad(pb.WatchLoadRequest(interval_ms=self.config.interval_ms))
                    async for load in stream:
                        self.latest, self.received_at, self.connected = load, time.monotonic(), True
                        backoff = 0.2
            except grpc.aio.AioRpcError as exc:
                log.info("engine %s: %s", self.config.engine, exc.code().name)
            self.connected = False
            self.reconnects += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)


class LoadSource(Protocol):
    """Where a LoadCollector reads: the sidecar's LoadFollower, or the engine's own load (server.py)."""

    @property
    def config(self) -> SidecarConfig: ...

    @property
    def fresh(self) -> bool: ...

    @property
    def latest(self) -> pb.Load | None: ...


class LoadCollector(Collector):
    """Turns the latest snapshot into Prometheus families (native optimist_* names, vLLM bucket sets)."""

    def __init__(self, follower: LoadSource) -> None:
        self.follower = follower

    def collect(self) -> Iterator[Metric]:
        f = self.follower
        up = GaugeMetricFamily("optimist_engine_up", "1 while the sidecar follows a live engine", labels=["pool"])
        up.add_metric([f.config.pool], 1.0 if f.fresh else 0.0)
        yield up
        load = f.latest
        if load is None or not f.fresh:
            return
        names = ["model_name", "pool"]
        labels = [load.model_name, f.config.pool]
        load_time = time.time()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(labels, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(labels, value)
            return c

        usage = load.kv_blocks_used / load.kv_blocks_total if load.kv_blocks_total else 0.0
        demand = load.lower_bound_demand_blocks / load.kv_blocks_total if load.kv_blocks_total else 0.0
        yield gauge("optimist_engine_ready", "1 when the engine accepts requests", 1.0 if load.ready else 0.0)
        yield gauge("optimist_requests_waiting", "Requests waiting for admission", load.waiting)
        yield gauge("optimist_requests_running", "Requests in the running batch", load.running)
        yield gauge("optimist_kv_blocks_used", "KV cache blocks in use", load.kv_blocks_used)
        yield gauge("optimist_kv_blocks_capacity", "KV cache blocks in all", load.kv_blocks_total)
        yield gauge("optimist_kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0-1)", usage)
        yield gauge(
            "optimist_lower_bound_kv_demand_ratio",
            "Predicted KV need of running and waiting requests (prompt + lower-bound output) over capacity",
            demand,
        )
        if load.max_loras:
            yield gauge(
                "optimist_lora_adapters_running", "LoRA adapters among the running requests", len(load.running_adapters)
            )
            yield gauge(
                "optimist_lora_adapters_waiting", "LoRA adapters among the waiting requests", len(load.waiting_adapters)
            )
            yield gauge("optimist_lora_adapters_max", "Most LoRA adapters that run at once (max_loras)", load.max_loras)
        yield counter("optimist_evictions", "Requests preempted to free KV memory", load.evictions_total)
        yield counter("optimist_prompt_tokens", "Prompt tokens admitted", load.prompt_tokens_total)
        yield counter("optimist_generation_tokens", "Tokens generated", load.generation_tokens_total)
        yield counter("optimist_engine_steps", "Engine steps run", load.steps_total)
        speculative = (
            ("num_drafts", "Request steps that carried speculative drafts", load.spec_drafts_total),
            ("num_draft_tokens", "Speculative draft tokens computed", load.spec_draft_tokens_total),
            ("num_accepted_tokens", "Speculative draft tokens kept", load.spec_accepted_tokens_total),
        )
        for name, doc, value in speculative:
            yield counter(f"optimist_spec_decode_{name}", doc, value)
        for name, what, tokens in (
            ("optimist_sparse_prefill", "prefilled with sparse attention", load.sparse_prefill_tokens_total),
            ("optimist_prefix_cache_hit", "whose K/V came from the prefix cache", load.prefix_cache_hit_tokens_total),
        ):
            share = tokens / load.prompt_tokens_total if load.prompt_tokens_total else 0.0
            yield counter(f"{name}_tokens", f"Prompt tokens {what}", tokens)
            yield gauge(f"{name}_share", f"Fraction of prompt tokens {what}", share)
        finished = CounterMetricFamily(
            "optimist_requests_finished", "Finished requests by reason", labels=[*names, "finished_reason"]
        )
        for reason, count in sorted(load.finished_total.items()):
            finished.add_metric([*labels, reason], count)
        yield finished
        histograms = (
            ("time_to_first_token_seconds", "Time to first token", load.time_to_first_token_s),
            ("inter_token_latency_seconds", "Time between tokens of a request", load.inter_token_latency_s),
            ("e2e_request_latency_seconds", "Arrival to finish", load.e2e_latency_s),
            ("request_queue_time_seconds", "Arrival to first admission", load.queue_time_s),
        )
        for name, doc, hist in histograms:
            yield _histogram(f"optimist_{name}", doc, names, labels, hist)
        if f.config.vllm_compat:
            # vLLM's own names for the request series, so its Grafana dashboards and alerts read this engine too
            for name, doc, hist in histograms:
                yield _histogram(f"vllm:{name}", f"{doc} (vLLM-compatible name)", names, labels, hist)
            yield counter("vllm:prompt_tokens", "Prompt tokens (vLLM-compatible name)", load.prompt_tokens_total)
            yield counter(
                "vllm:generation_tokens", "Generated tokens (vLLM-compatible name)", load.generation_tokens_total
            )
            yield counter("vllm:num_preemptions", "Preemptions (vLLM-compatible name)", load.evictions_total)
            for name, doc, value in speculative:
                yield counter(f"vllm:spec_decode_{name}", f"{doc} (vLLM-compatible name)", value)
            success = CounterMetricFamily(
                "vllm:request_success", "Finished requests by reason (vLLM-compatible name and reasons)",
                labels=[*names, "finished_reason"],
            )  # fmt: skip
            by_reason: dict[str, float] = {}
            for reason, count in load.finished_total.items():
                key = _VLLM_REASON.get(reason, reason)
                by_reason[key] = by_reason.get(key, 0) + count
            for reason, count in sorted(by_reason.items()):
                success.add_metric([*labels, reason], count)
            yield success
            yield gauge("vllm:num_requests_waiting", "Requests waiting (vLLM-compatible name)", load.waiting)
            yield gauge("vllm:num_requests_running", "Requests running (vLLM-compatible name)", load.running)
            yield gauge("vllm:kv_cache_usage_perc", "KV cache usage, 0-1 (vLLM-compatible name)", usage)
            # vLLM's name before v1, still the default of older endpoint pickers
            yield gauge("vllm:gpu_cache_usage_perc", "KV cache usage, 0-1 (vLLM's pre-v1 name)", usage)
            # The endpoint picker's model-server protocol also reads these two info series (the LoRA one is
            # required: without it a picker marks the endpoint unusable; its LoRA affinity reads the adapters
            # running and waiting, and max_lora, the most that run at once), and the cache layout.
            lora = GaugeMetricFamily(
                "vllm:lora_requests_info",
                "LoRA adapters of the running and the waiting requests, comma-separated (vLLM-compatible info "
                "series); the value is a timestamp",
                labels=[*names, "max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            )
            running_adapters, waiting_adapters = ",".join(load.running_adapters), ",".join(load.waiting_adapters)
            lora.add_metric([*labels, str(load.max_loras), running_adapters, waiting_adapters], load_time)
            yield lora
            cache = GaugeMetricFamily(
                "vllm:cache_config_info",
                "KV cache layout (vLLM-compatible info series)",
                labels=[*names, "block_size", "num_gpu_blocks"],
            )
            cache.add_metric([*labels, str(load.kv_block_size), str(load.kv_blocks_total)], 1.0)
            yield cache
            yield counter(
                "vllm:prefix_cache_queries", "Prompt tokens looked up (vLLM-compatible name)", load.prompt_tokens_total
            )
            yield counter(
                "vllm:prefix_cache_hits",
                "Prompt tokens found in the prefix cache (vLLM-compatible name)",
                load.prefix_cache_hit_tokens_total,
            )


def _le(bound: float) -> str:
    return repr(float(bound))


_VLLM_REASON = {"eos": "stop", "stop": "stop", "length": "length", "aborted": "abort"}


def _histogram(name: str, doc: str, names: list[str], labels: list[str], hist: pb.Histogram) -> HistogramMetricFamily:
    h = HistogramMetricFamily(name, doc, labels=names)
    bounds = [*(_le(b) for b in hist.upper_bounds), "+Inf"]
    h.add_metric(labels, list(zip(bounds, hist.cumulative_counts, strict=True)), sum_value=hist.sum)
    return h


class _Handler(BaseHTTPRequestHandler):
    registry: CollectorRegistry
    follower: LoadFollower

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._reply(200, generate_latest(self.registry), "text/plain; version=0.0.4; charset=utf-8")
        elif path == "/healthz":
            self._reply(200, b"ok\n")
        elif path == "/readyz":
            ok = self.follower.ready
            self._reply(200 if ok else 503, b"ready\n" if ok else b"engine not ready\n")
        else:
            self._reply(404, b"not found\n")

    def _reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug(format, *args)


def start_http(config: SidecarConfig, follower: LoadFollower) -> ThreadingHTTPServer:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LoadCollector(follower))
    handler = type("Handler", (_Handler,), {"registry": registry, "follower": follower})
    server = ThreadingHTTPServer((config.host, config.port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="sidecar-http", daemon=True).start()
    return server


async def run_sidecar(config: SidecarConfig) -> None:
    follower = LoadFollower(config)
    server = start_http(config, follower)
    log.info("sidecar: /metrics on %s:%d following %s", config.host, server.server_port, config.engine)
    try:
        await follower.run()
    finally:
        with contextlib.suppress(Exception):
            server.shutdown()
