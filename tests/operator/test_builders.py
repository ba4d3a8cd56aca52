"""The pure builders: the children of a minimal and of a full pool, field by field."""

from __future__ import annotations

from typing import Any

import pytest

from optimist.operator import builders as b
from optimist.operator.crd import defaulted_spec

from .conftest import load_example, with_identity


def by_kind(children: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{c['kind']}/{c['metadata']['name']}": c for c in children}


@pytest.fixture()
def minimal() -> dict[str, Any]:
    return with_identity(load_example("inferencepool.yaml"), uid="uid-min")


@pytest.fixture()
def full() -> dict[str, Any]:
    return with_identity(load_example("inferencepool-full.yaml"), uid="uid-full")


def test_minimal_pool_children(minimal: dict[str, Any]) -> None:
    children = by_kind(b.build_children(minimal))
    assert sorted(children) == [
        "Deployment/smollm2",
        "PodDisruptionBudget/smollm2",
        "Service/smollm2",
        "Service/smollm2-http",
        "Service/smollm2-metrics",
    ]
    owner = {
        "apiVersion": "optimist.dev/v1alpha1",
        "kind": "InferencePool",
        "name": "smollm2",
        "uid": "uid-min",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    for child in children.values():
        assert child["metadata"]["ownerReferences"] == [owner]
        assert child["metadata"]["namespace"] == "default"
        assert child["metadata"]["labels"]["optimist.dev/pool"] == "smollm2"
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "optimist-operator"

    dep = children["Deployment/smollm2"]
    assert dep["apiVersion"] == "apps/v1"
    assert dep["spec"]["replicas"] == 1
    selector = {"app.kubernetes.io/name": "optimist", "optimist.dev/pool": "smollm2"}
    assert dep["spec"]["selector"] == {"matchLabels": selector}
    template = dep["spec"]["template"]
    assert selector.items() <= template["metadata"]["labels"].items()
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    pod = template["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert "nodeSelector" not in pod and "runtimeClassName" not in pod and "imagePullSecrets" not in pod
    engine, sidecar = pod["containers"]
    assert engine["name"] == "engine" and sidecar["name"] == "sidecar"
    assert engine["image"] == "ghcr.io/optimist-serving/engine:0.1.0"
    assert engine["command"] == ["optimist"]
    assert engine["args"] == [
        "serve", "--host", "0.0.0.0", "--port", "50051", "--http-port", "8000", "--device", "cuda",
        "--scheduler", "amin", "--max-num-seqs", "64", "--max-batched-tokens", "2048",
    ]  # fmt: skip
    assert engine["resources"] == {
        "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
        "limits": {"memory": "16Gi", "nvidia.com/gpu": "1"},
    }
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert engine[probe]["grpc"] == {"port": 50051}
    # model loading gets startupSeconds (default 900) before the liveness probe may restart the pod
    assert engine["startupProbe"]["periodSeconds"] * engine["startupProbe"]["failureThreshold"] >= 900
    for c in (engine, sidecar):
        assert c["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        }
    mounts = {m["mountPath"]: m["name"] for m in engine["volumeMounts"]}
    assert mounts == {"/dev/shm": "dshm", "/tmp": "tmp"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}
    assert sidecar["args"] == ["sidecar", "--engine", "127.0.0.1:50051", "--port", "9090", "--pool", "smollm2"]
    assert sidecar["ports"] == [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    assert sidecar["image"] == engine["image"]

    grpc = children["Service/smollm2"]["spec"]
    assert grpc["clusterIP"] == "None"  # headless: clients balance over pod addresses
    assert grpc["selector"] == selector
    assert grpc["ports"][0]["port"] == 50051 and grpc["ports"][0]["appProtocol"] == "kubernetes.io/h2c"
    assert len(grpc["ports"]) == 1
    api = children["Service/smollm2-http"]  # OpenAI clients: one virtual IP spread over the ready pods
    assert api["spec"]["type"] == "ClusterIP" and api["spec"]["selector"] == selector
    assert api["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP",
                                     "appProtocol": "http"}]  # fmt: skip
    assert api["metadata"]["labels"]["app.kubernetes.io/component"] == "api"  # not scraped by the ServiceMonitor
    assert engine["ports"] == [
        {"name": "grpc", "containerPort": 50051, "protocol": "TCP"},
        {"name": "http", "containerPort": 8000, "protocol": "TCP"},
    ]
    metrics = children["Service/smollm2-metrics"]
    assert metrics["spec"]["ports"][0]["port"] == 9090
    assert metrics["metadata"]["labels"]["app.kubernetes.io/component"] == "metrics"
    pdb = children["PodDisruptionBudget/smollm2"]["spec"]
    assert pdb == {"maxUnavailable": 1, "selector": {"matchLabels": selector}}


def test_full_pool_children(full: dict[str, Any]) -> None:
    children = by_kind(b.build_children(full))
    assert sorted(children) == [
        "Deployment/llama3-8b",
        "HorizontalPodAutoscaler/llama3-8b",
        "InferencePool/llama3-8b",
        "PodDisruptionBudget/llama3-8b",
        "Service/llama3-8b",
        "Service/llama3-8b-http",
        "Service/llama3-8b-metrics",
        "ServiceMonitor/llama3-8b",
    ]
    dep = children["Deployment/llama3-8b"]
    assert dep["metadata"]["namespace"] == "serving"
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    engine = pod["containers"][0]
    assert engine["args"] == [
        "serve", "--host", "0.0.0.0", "--port", "50051", "--http-port", "8000", "--device", "cuda",
        "--model", "/models/llama-3-8b-instruct",
        "--served-model-name", "llama-3-8b-instruct", "--max-model-len", "32768",
        "--scheduler", "amin", "--kv-cache-memory-fraction", "0.85",
        "--max-num-seqs", "128", "--max-batched-tokens", "16384",
        "--sparse-prefill-threshold", "32768",
        "--lora-modules", "sql-assistant=/models/adapters/sql-assistant", "support-bot=/lora/1",
        "--api-key-file", "/etc/optimist/api-key/api-key",
        "--kv-block-size", "16",
    ]  # fmt: skip
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in engine["volumeMounts"]
    assert {"name": "api-key", "mountPath": "/etc/optimist/api-key", "readOnly": True} in engine["volumeMounts"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    # the Secret's key as a file the engine (group fsGroup) can read and nobody else
    assert volumes["api-key"]["secret"] == {"secretName": "llama3-8b-api-key", "defaultMode": 0o440,
                                            "items": [{"key": "api-key", "path": "api-key"}]}  # fmt: skip
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert volumes["dshm"]["emptyDir"]["sizeLimit"] == "8Gi"
    assert engine["resources"]["requests"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"}
    assert engine["startupProbe"]["failureThreshold"] * engine["startupProbe"]["periodSeconds"] >= 1200
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["runtimeClassName"] == "nvidia" and pod["priorityClassName"] == "inference"
    assert pod["imagePullSecrets"] == [{"name": "ghcr"}]

    hpa = children["HorizontalPodAutoscaler/llama3-8b"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    # the autoscaler scales the pool through /scale, never the Deployment
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "optimist.dev/v1alpha1",
        "kind": "InferencePool",
        "name": "llama3-8b",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert hpa["spec"]["metrics"] == [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": "optimist_lower_bound_kv_demand_ratio"},
                "target": {"type": "AverageValue", "averageValue": "900m"},
            },
        }
    ]
    assert hpa["spec"]["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == 60
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 600

    monitor = children["ServiceMonitor/llama3-8b"]["spec"]
    assert monitor["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s"}]
    assert monitor["selector"]["matchLabels"]["app.kubernetes.io/component"] == "metrics"

    gw = children["InferencePool/llama3-8b"]
    assert gw["apiVersion"] == "inference.networking.k8s.io/v1"
    assert gw["spec"] == {
        "selector": {"matchLabels": {"app.kubernetes.io/name": "optimist", "optimist.dev/pool": "llama3-8b"}},
        "targetPorts": [{"number": 8000}],
        "appProtocol": "http",
        "endpointPickerRef": {
            "group": "",
            "kind": "Service",
            "name": "llama3-8b-epp",
            "failureMode": "FailClose",
            "port": {"number": 9002},
        },
    }
    full["spec"]["gateway"]["appProtocol"] = "kubernetes.io/h2c"  # the gRPC port instead
    gw = by_kind(b.build_children(full))["InferencePool/llama3-8b"]
    assert (gw["spec"]["targetPorts"], gw["spec"]["appProtocol"]) == ([{"number": 50051}], "kubernetes.io/h2c")


def test_keda_scaled_object_sums_the_pool_signal(minimal: dict[str, Any]) -> None:
    minimal["spec"]["autoscaling"] = {"mode": "keda", "minReplicas": 0, "maxReplicas": 3, "metric": "queueDepth"}
    children = by_kind(b.build_children(minimal))
    assert "HorizontalPodAutoscaler/smollm2" not in children
    so = children["ScaledObject/smollm2"]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert so["spec"]["scaleTargetRef"]["kind"] == "InferencePool"
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (0, 3)
    trigger = so["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["query"] == (
        'sum(avg_over_time(optimist_requests_waiting{namespace="default",pool="smollm2"}[1m]))'
    )
    assert trigger["metadata"]["threshold"] == "4"
    assert trigger["metadata"]["serverAddress"].startswith("http://")


def test_kv_cache_dtype_reaches_the_engine(minimal: dict[str, Any]) -> None:
    """engine.kvCacheDtype other than auto becomes --kv-cache-dtype; auto (the default) leaves the engine's own."""
    args = by_kind(b.build_children(minimal))["Deployment/smollm2"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--kv-cache-dtype" not in args
    minimal["spec"].update(
        resources={"gpus": 0}, engine={**minimal["spec"].get("engine", {}), "kvCacheDtype": "float16"}
    )
    args = by_kind(b.build_children(minimal))["Deployment/smollm2"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--kv-cache-dtype") + 1] == "float16"


@pytest.mark.parametrize("weights", ["int4", "fp16", "float"])
def test_other_model_sources_and_cpu_pods(minimal: dict[str, Any], weights: str) -> None:
    minimal["spec"].update(
        model={"source": "image", "image": "ghcr.io/me/weights:1", "path": "model.gguf", "weights": weights},
        resources={"gpus": 0},
        monitoring={"vllmCompatibility": False},
        rollout={"podDisruptionBudget": {"enabled": False}},
        images={"sidecar": "ghcr.io/me/sidecar:1", "pullPolicy": "Always"},
    )
    children = by_kind(b.build_children(minimal))
    assert "PodDisruptionBudget/smollm2" not in children
    pod = children["Deployment/smollm2"]["spec"]["template"]["spec"]
    engine, sidecar = pod["containers"]
    assert engine["args"][engine["args"].index("--device") + 1] == "cpu"
    assert engine["args"][engine["args"].index("--model") + 1] == "/models/model.gguf"
    assert engine["args"][engine["args"].index("--weights") + 1] == weights
    assert "nvidia.com/gpu" not in engine["resources"]["requests"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model"]["image"] == {"reference": "ghcr.io/me/weights:1", "pullPolicy": "Always"}
    assert sidecar["args"][-1] == "--no-vllm-metrics"
    assert sidecar["image"] == "ghcr.io/me/sidecar:1"
    assert engine["imagePullPolicy"] == sidecar["imagePullPolicy"] == "Always"


def test_mig_gpu_resource(minimal: dict[str, Any]) -> None:
    minimal["spec"]["resources"] = {"gpus": 2, "gpuResourceName": "nvidia.com/mig-1g.10gb"}
    dep = b.build_children(minimal)[0]
    resources = dep["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/mig-1g.10gb"] == "2"
    assert "nvidia.com/gpu" not in resources["limits"]


def test_builders_are_pure_and_deterministic(full: dict[str, Any]) -> None:
    import copy

    before = copy.deepcopy(full)
    assert b.build_children(full) == b.build_children(full)
    assert full == before  # the pool is not modified (defaults are applied to a copy)


def test_defaults_come_from_the_schema(minimal: dict[str, Any]) -> None:
    spec = defaulted_spec(minimal)
    assert spec["engine"]["scheduler"] == "amin"
    assert spec["autoscaling"] == {
        "mode": "none",
        "minReplicas": 1,
        "maxReplicas": 4,
        "metric": "lowerBoundDemand",
        "scaleUpStabilizationSeconds": 0,
        "scaleDownStabilizationSeconds": 300,
        "prometheusAddress": "http://prometheus-operated.monitoring.svc:9090",
    }
    assert spec["rollout"]["podDisruptionBudget"] == {"enabled": True, "maxUnavailable": 1}


@pytest.mark.parametrize(("value", "text"), [(4.0, "4"), (0.9, "900m"), (0.85, "850m"), (12.5, "12500m")])
def test_quantity(value: float, text: str) -> None:
    assert b.quantity(value) == text


def test_every_hpa_metric_is_exposed_by_the_adapter_rules(minimal: dict[str, Any]) -> None:
    import yaml

    from .conftest import ROOT

    rules = yaml.safe_load((ROOT / "charts" / "optimist" / "files" / "prometheus-adapter-rules.yaml").read_text())
    exposed = {rule["name"]["as"] for rule in rules["rules"]}
    for metric in b.METRIC_SERIES:
        minimal["spec"]["autoscaling"] = {"mode": "hpa", "metric": metric}
        hpa = by_kind(b.build_children(minimal))["HorizontalPodAutoscaler/smollm2"]
        assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] in exposed, metric


def test_speculative_decoding_flags_only_where_the_pool_differs_from_the_engine(minimal: dict[str, Any]) -> None:
    from optimist.engine.config import EngineConfig

    def args(speculative: dict[str, Any] | None) -> list[str]:
        pool = with_identity(load_example("inferencepool.yaml"), uid="u")
        if speculative is not None:
            pool["spec"].setdefault("engine", {})["speculativeDecoding"] = speculative
        dep = by_kind(b.build_children(pool))["Deployment/smollm2"]
        return dep["spec"]["template"]["spec"]["containers"][0]["args"]

    # the CRD's defaults are the engine's: a pool that says nothing gets the engine's behaviour and no flags
    defaults = defaulted_spec({"spec": {}})["engine"]["speculativeDecoding"]
    engine = EngineConfig()
    assert defaults == {"tokens": engine.speculative_tokens, "ngramMin": engine.speculative_ngram_min,
                        "ngramMax": engine.speculative_ngram_max}  # fmt: skip
    assert not any(a.startswith("--speculative") for a in args(None))
    assert not any(a.startswith("--speculative") for a in args({"tokens": 4}))
    off = args({"tokens": 0})
    assert off[off.index("--speculative-tokens") + 1] == "0"
    tuned = args({"tokens": 6, "ngramMin": 2, "ngramMax": 5})
    for flag, value in (
        ("--speculative-tokens", "6"),
        ("--speculative-ngram-min", "2"),
        ("--speculative-ngram-max", "5"),
    ):
        assert tuned[tuned.index(flag) + 1] == value


@pytest.mark.parametrize("gpus,threshold", [(1, "32768"), (0, "8192")])
def test_sparse_prefill_threshold_defaults_to_where_it_pays_on_the_pods_device(gpus: int, threshold: str) -> None:
    """A pool turning sparse prefill on without a threshold gets the one measured for its device (GPU: 32K, where
    the kernels start to beat flash; CPU: 8K); a threshold it sets is kept."""
    pool = with_identity(load_example("inferencepool.yaml"), uid="u")
    pool["spec"].setdefault("engine", {})["sparsePrefill"] = {"enabled": True}
    pool["spec"].setdefault("resources", {})["gpus"] = gpus

    def args() -> list[str]:
        dep = by_kind(b.build_children(pool))["Deployment/smollm2"]
        return dep["spec"]["template"]["spec"]["containers"][0]["args"]

    got = args()
    assert got[got.index("--sparse-prefill-threshold") + 1] == threshold
    pool["spec"]["engine"]["sparsePrefill"]["threshold"] = 4096
    got = args()
    assert got[got.index("--sparse-prefill-threshold") + 1] == "4096"
    pool["spec"]["engine"]["sparsePrefill"]["enabled"] = False
    assert "--sparse-prefill-threshold" not in args()


def test_lora_adapters_become_flags_and_read_only_volumes() -> None:
    """Adapters in the model's volume are found under its mount; others get a volume each (a PVC or an image)."""
    from optimist.engine.config import EngineConfig

    pool = with_identity(load_example("inferencepool.yaml"), uid="u")
    pool["spec"]["model"] = {"source": "pvc", "claimName": "models", "path": "base.gguf", "loraAdapters": [
        {"name": "sql", "path": "adapters/sql"},
        {"name": "chat", "source": "pvc", "claimName": "team-adapters", "path": "chat"},
        {"name": "legal", "source": "image", "image": "ghcr.io/acme/legal-lora:1"},
    ]}  # fmt: skip
    pool["spec"]["engine"] = {"lora": {"maxLoras": 2}}
    pod = by_kind(b.build_children(pool))["Deployment/smollm2"]["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    at = args.index("--lora-modules")
    assert args[at + 1 : at + 4] == [
        f"sql={b.MODEL_DIR}/adapters/sql",
        f"chat={b.LORA_DIR}/1/chat",
        f"legal={b.LORA_DIR}/2",
    ]
    assert args[args.index("--max-loras") + 1] == "2" and "--max-lora-rank" not in args
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["lora-1"] == {"name": "lora-1", "mountPath": f"{b.LORA_DIR}/1", "readOnly": True}
    assert "lora-0" not in mounts and mounts["lora-2"]["readOnly"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["lora-1"]["persistentVolumeClaim"] == {"claimName": "team-adapters", "readOnly": True}
    assert volumes["lora-2"]["image"]["reference"] == "ghcr.io/acme/legal-lora:1"
    # the engine parses what the operator passes, and the CRD's defaults are the engine's
    from optimist.engine.cli import build_parser, engine_config

    config = engine_config(build_parser().parse_args(args))
    assert [n for n, _ in config.lora_modules] == ["sql", "chat", "legal"] and config.max_loras == 2
    defaults = defaulted_spec({"spec": {}})["engine"]["lora"]
    assert defaults == {"maxLoras": EngineConfig.max_loras, "maxLoraRank": EngineConfig.max_lora_rank}
    plain = with_identity(load_example("inferencepool.yaml"), uid="u")
    assert (
        "--lora-modules"
        not in by_kind(b.build_children(plain))["Deployment/smollm2"]["spec"]["template"]["spec"]["containers"][0][
            "args"
        ]
    )
