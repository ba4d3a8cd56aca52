"""The metrics sidecar as a real process: exposition checked by promtool, scraped by a real Prometheus server,
and surviving an engine restart."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from optimist.engine.api import engine_pb2 as pb
from optimist.engine.api import engine_pb2_grpc as pb_grpc
from optimist.engine.config import EngineConfig

from ..conftest import ServerThread


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free ports (all held open while choosing, so two calls cannot hand out the same one)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except (OSError, http.client.HTTPException):  # not up yet, or a half-started server
        return 0, ""


def wait_for(check, timeout: float = 30.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def samples(text: str) -> dict[str, float]:
    """name{labels} -> value, labels reduced to the finished reason where present."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + (f"[{s.labels['finished_reason']}]" if "finished_reason" in s.labels else "")
            if "le" not in s.labels:
                out[key] = s.value
    return out


def start_sidecar(engine_address: str, port: int) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "optimist.engine.cli", "sidecar", "--engine", engine_address]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--interval-ms", "100", "--pool", "test-pool"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200, what="sidecar /healthz")
    return proc


def generate(address: str, n: int, max_tokens: int, token_ids: list[int] | None = None) -> None:
    """n concurrent requests: prompts "the 0", "the 1", ... or, given token_ids, that prompt each time."""

    def one(i: int) -> None:
        with grpc.insecure_channel(address) as channel:
            sampling = pb.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            if token_ids is None:
                req = pb.GenerateRequest(text=f"the {i}", sampling=sampling)
            else:
                req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=token_ids), sampling=sampling)
            for _ in pb_grpc.EngineStub(channel).Generate(req):
                pass

    with ThreadPoolExecutor(n) as pool:
        list(pool.map(one, range(n)))


@pytest.fixture()
def tiny_server(tiny_gguf: Path) -> Iterator[ServerThread]:
    """A fresh engine (counters at zero) with a KV cache that holds one 60-token request at a time."""
    srv = ServerThread(EngineConfig(model=tiny_gguf, kv_cache_tokens=96, max_num_seqs=8))
    srv.call(srv.server.load())
    yield srv
    srv.stop()


def test_metrics_health_and_promtool(tiny_server: ServerThread) -> None:
    port = free_port()
    sidecar = start_sidecar(tiny_server.address, port)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_get(base + "/readyz")[0] == 200, what="ready")
        generate(tiny_server.address, 3, 5)
        text = wait_for(
            lambda: (
                (t := http_get(base + "/metrics")[1]) and samples(t).get("optimist_generation_tokens_total") == 15 and t
            ),
            what="15 generated tokens in /metrics",
        )
        values = samples(text)
        assert values["optimist_requests_finished_total[length]"] == 3
        # vLLM's names for the same series (its dashboards and alerts), reasons in its words
        assert values["vllm:request_success_total[length]"] == 3 and values["vllm:generation_tokens_total"] == 15
        assert values["vllm:time_to_first_token_seconds_count"] == 3 and values["vllm:num_preemptions_total"] == 0
        assert values["vllm:prompt_tokens_total"] == values["optimist_prompt_tokens_total"] > 0
        assert values["optimist_requests_running"] == 0 and values["vllm:num_requests_waiting"] == 0
        assert values["vllm:kv_cache_usage_perc"] == 0 and values["optimist_kv_blocks_capacity"] == 6
        assert values["optimist_time_to_first_token_seconds_count"] == 3
        assert values["optimist_sparse_prefill_share"] == 0  # dense prefill only (short prompts)
        assert values["optimist_prefix_cache_hit_tokens_total"] == 0  # three different short prompts
        # The same 40-token prompt twice, one after the other: the second takes two full 16-token blocks (32
        # tokens) of K/V from the prefix cache.
        for _ in range(2):
            generate(tiny_server.address, 1, 2, token_ids=list(range(3, 43)))
        text = wait_for(
            lambda: (
                (t := http_get(base + "/metrics")[1]) and samples(t).get("optimist_generation_tokens_total") == 19 and t
            ),
            what="19 generated tokens in /metrics",
        )
        values = samples(text)
        prompt_tokens = values["optimist_prompt_tokens_total"]
        assert values["optimist_prefix_cache_hit_tokens_total"] == 32
        assert (
            values["vllm:prefix_cache_hits_total"] == 32 and values["vllm:prefix_cache_queries_total"] == prompt_tokens
        )
        assert values["optimist_prefix_cache_hit_share"] == pytest.approx(32 / prompt_tokens)
        assert 'model_name="tiny-llama"' in text and 'pool="test-pool"' in text
        promtool = shutil.which("promtool")
        if promtool is None:
            pytest.skip("promtool is not installed (apt-get install prometheus)")
        check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        # promtool flags the vllm:* names (colons are for recording rules); they exist only for compatibility.
        problems = [line for line in (check.stdout + check.stderr).splitlines() if line and "vllm:" not in line]
        assert problems == [], problems
    finally:
        sidecar.terminate()
        sidecar.wait(timeout=10)


def test_real_prometheus_scrapes_counters_and_the_queue_rising_and_draining(tiny_server: ServerThread) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    port, prom_port = free_ports(2)
    sidecar = start_sidecar(tiny_server.address, port)
    workdir = Path(tempfile.mkdtemp(prefix="optimist-prom-"))
    (workdir / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 200ms\n"
        "scrape_configs:\n  - job_name: sidecar\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
    )
    prom = subprocess.Popen(
        [prometheus, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    api = f"http://127.0.0.1:{prom_port}"

    def query(promql: str) -> float | None:
        status, body = http_get(f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        if status != 200:
            return None
        result = json.loads(body)["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    try:
        wait_for(lambda: http_get(api + "/-/ready")[0] == 200, timeout=60, what="prometheus ready")
        wait_for(lambda: query("optimist_engine_up") == 1.0, timeout=30, what="first scrape")
        n, tokens = 24, 60
        generate(tiny_server.address, n, tokens)  # one fits the cache at a time: the rest wait
        wait_for(lambda: query("optimist_generation_tokens_total") == n * tokens, what="generated tokens counter")
        assert query('optimist_requests_finished_total{finished_reason="length"}') == n
        assert (query("max_over_time(optimist_requests_waiting[5m])") or 0) >= 5
        assert (query("max_over_time(vllm:num_requests_waiting[5m])") or 0) >= 5
        wait_for(lambda: query("optimist_requests_waiting") == 0, what="queue drained")
        assert query("optimist_requests_running") == 0
        for promql in recipe_queries():
            assert query(promql.replace("my-pool", "test-pool")) is not None, promql
    finally:
        prom.terminate()
        sidecar.terminate()
        prom.wait(timeout=20)
        sidecar.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


RECIPES = Path(__file__).resolve().parents[2] / "deploy" / "autoscaling"
ADAPTER_RULES = Path(__file__).resolve().parents[2] / "charts" / "optimist" / "files" / "prometheus-adapter-rules.yaml"


def recipe_queries() -> list[str]:
    """The PromQL of the autoscaling recipes, as KEDA and prometheus-adapter would send it for pool my-pool."""
    import yaml

    keda = yaml.safe_load((RECIPES / "keda-scaledobject.yaml").read_text())
    queries = [t["metadata"]["query"] for t in keda["spec"]["triggers"]]
    for rule in yaml.safe_load(ADAPTER_RULES.read_text())["rules"]:
        series = rule["seriesQuery"].split("{", 1)[0]
        queries.append(
            rule["metricsQuery"].replace("<<.Series>>", series).replace("<<.LabelMatchers>>", 'pool="my-pool"')
        )
    return queries


def test_autoscaling_recipes_target_the_pool_scale_subresource_with_adapter_metrics() -> None:
    import yaml

    hpa = yaml.safe_load((RECIPES / "hpa.yaml").read_text())
    keda = yaml.safe_load((RECIPES / "keda-scaledobject.yaml").read_text())
    target = {"apiVersion": "optimist.dev/v1alpha1", "kind": "InferencePool", "name": "my-pool"}
    assert hpa["spec"]["scaleTargetRef"] == target and keda["spec"]["scaleTargetRef"] == target
    adapter = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]
    exposed = {rule["name"]["as"] for rule in adapter}
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} <= exposed
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 60


def test_sidecar_follows_an_engine_restart_without_restarting(tiny_gguf: Path) -> None:
    engine_port, port = free_ports(2)
    config = EngineConfig(model=tiny_gguf, kv_cache_tokens=512)
    first = ServerThread(config, port=engine_port)
    first.call(first.server.load())
    sidecar = start_sidecar(f"127.0.0.1:{engine_port}", port)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_get(base + "/readyz")[0] == 200, what="ready")
        first.stop()
        wait_for(lambda: http_get(base + "/readyz")[0] == 503, what="not ready after the engine stopped")
        assert samples(http_get(base + "/metrics")[1])["optimist_engine_up"] == 0
        second = ServerThread(config, port=engine_port)
        second.call(second.server.load())
        try:
            wait_for(lambda: http_get(base + "/readyz")[0] == 200, what="ready again")
            assert sidecar.poll() is None, "the sidecar must not have exited"
            assert samples(http_get(base + "/metrics")[1])["optimist_engine_up"] == 1
        finally:
            second.stop()
    finally:
        sidecar.terminate()
        sidecar.wait(timeout=10)


def test_vllm_request_success_uses_vllm_reasons() -> None:
    """EOS and stop strings are both vLLM's "stop"; our "aborted" is its "abort"."""
    from prometheus_client import CollectorRegistry, generate_latest

    from optimist.engine.metrics import TTFT_BUCKETS, Histogram
    from optimist.engine.server import histogram_to_proto
    from optimist.engine.sidecar import LoadCollector, SidecarConfig

    empty = histogram_to_proto(Histogram(TTFT_BUCKETS))

    class Fixed:
        config = SidecarConfig(pool="p")
        fresh = True
        latest = pb.Load(
            model_name="m", kv_blocks_total=8, finished_total={"eos": 2, "stop": 1, "aborted": 1},
            time_to_first_token_s=empty, inter_token_latency_s=empty, e2e_latency_s=empty, queue_time_s=empty,
        )  # fmt: skip

    registry = CollectorRegistry(auto_describe=False)
    registry.register(LoadCollector(Fixed()))
    values = samples(generate_latest(registry).decode())
    assert values["vllm:request_success_total[stop]"] == 3 and values["vllm:request_success_total[abort]"] == 1
    assert "vllm:request_success_total[eos]" not in values
    assert values["optimist_requests_finished_total[eos]"] == 2  # the native series keeps our own reasons
