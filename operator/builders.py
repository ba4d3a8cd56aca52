"""Pure functions from an InferencePool to the objects it owns. No cluster access: unit-testable field by field.

`build_children(pool)` returns every child the pool's spec asks for, each adopted by the pool (ownerReferences),
in the order the operator applies them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .crd import API_VERSION, ENGINE_PORT, HTTP_PORT, KIND, METRICS_PORT, defaulted_spec

Manifest = dict[str, Any]

MANAGED_BY = "optimist-operator"
POOL_LABEL = "optimist.dev/pool"
MODEL_DIR = "/models"
API_KEY_DIR = "/etc/optimist/api-key"  # the apiKeySecret volume
LORA_DIR = "/lora"  # LoRA adapters on volumes of their own: LORA_DIR/<index in model.loraAdapters>
UID = 10001  # the images' non-root user
# sparse prefill's threshold when a pool does not set one: on an H200 (Llama-3-8B heads) sparse attention is about
# as fast as SDPA's flash at 32K tokens and 2.8x faster at 128K; on CPU it pays from a few thousand (benchmarks/README)
SPARSE_THRESHOLD_GPU, SPARSE_THRESHOLD_CPU = 32768, 8192
SIDECAR_RESOURCES = {"requests": {"cpu": "50m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}}
# Default scale targets per metric: a replica near KV exhaustion by its own prediction, 4 waiting requests, or
# 80% of its KV blocks in use.
DEFAULT_TARGETS = {"lowerBoundDemand": 0.9, "queueDepth": 4.0, "kvUsage": 0.6}  # kvUsage: see docs/autoscaling.md
METRIC_SERIES = {
    "lowerBoundDemand": "optimist_lower_bound_kv_demand_ratio",
    "queueDepth": "optimist_requests_waiting",
    "kvUsage": "optimist_kv_cache_usage_ratio",
}


@dataclass(frozen=True)
class Kind:
    """Where a child lives in the API."""

    api_version: str
    kind: str
    plural: str
    optional: bool = False  # an add-on CRD that may be missing from the cluster

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]


DEPLOYMENT = Kind("apps/v1", "Deployment", "deployments")
SERVICE = Kind("v1", "Service", "services")
HPA = Kind("autoscaling/v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers")
PDB = Kind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets")
SCALED_OBJECT = Kind("keda.sh/v1alpha1", "ScaledObject", "scaledobjects", optional=True)
SERVICE_MONITOR = Kind("monitoring.coreos.com/v1", "ServiceMonitor", "servicemonitors", optional=True)
GATEWAY_POOL = Kind("inference.networking.k8s.io/v1", "InferencePool", "inferencepools", optional=True)
CHILD_KINDS = (DEPLOYMENT, SERVICE, HPA, PDB, SCALED_OBJECT, SERVICE_MONITOR, GATEWAY_POOL)


def kind_of(manifest: Manifest) -> Kind:
    for k in CHILD_KINDS:
        if (k.api_version, k.kind) == (manifest["apiVersion"], manifest["kind"]):
            return k
    raise ValueError(f"not a child kind: {manifest['apiVersion']} {manifest['kind']}")


def selector_labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "optimist", POOL_LABEL: name}


def labels(name: str, component: str = "engine") -> dict[str, str]:
    return {
        **selector_labels(name),
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def selector_string(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector_labels(name).items())


def owner_reference(pool: Manifest) -> Manifest:
    meta = pool["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(pool: Manifest, name: str, component: str = "engine") -> Manifest:
    return {
        "name": name,
        "namespace": pool["metadata"]["namespace"],
        "labels": labels(pool["metadata"]["name"], component),
        "ownerReferences": [owner_reference(pool)],
    }


# ---------------------------------------------------------------------------------------------- Deployment


def engine_args(spec: Manifest) -> list[str]:
    """`optimist serve` arguments for the pool's engine container."""
    model, engine, res = spec["model"], spec["engine"], spec["resources"]
    args = ["serve", "--host", "0.0.0.0", "--port", str(ENGINE_PORT), "--http-port", str(HTTP_PORT)]
    gpu = res["gpus"] > 0
    args += ["--device", "cuda" if gpu else "cpu"]
    if model["source"] != "builtin":
        args += ["--model", f"{MODEL_DIR}/{model['path']}"]
    if model["weights"] != "auto":
        args += ["--weights", model["weights"]]
    if "servedName" in model:
        args += ["--served-model-name", model["servedName"]]
    if "contextLength" in model:
        args += ["--max-model-len", str(model["contextLength"])]
    args += ["--scheduler", engine["scheduler"]]
    if "kvCacheTokens" in engine:
        args += ["--kv-cache-tokens", str(engine["kvCacheTokens"])]
    if engine.get("kvCacheDtype", "auto") != "auto":
        args += ["--kv-cache-dtype", engine["kvCacheDtype"]]
    if "kvCacheMemoryFraction" in engine:
        args += ["--kv-cache-memory-fraction", str(engine["kvCacheMemoryFraction"])]
    args += ["--max-num-seqs", str(engine["maxNumSeqs"]), "--max-batched-tokens", str(engine["maxBatchedTokens"])]
    if engine["sparsePrefill"]["enabled"]:
        threshold = engine["sparsePrefill"].get("threshold", SPARSE_THRESHOLD_GPU if gpu else SPARSE_THRESHOLD_CPU)
        args += ["--sparse-prefill-threshold", str(threshold)]
    # speculative decoding: only what differs from the engine's defaults (which the CRD's defaults mirror: tested)
    spec_flags = (("tokens", "--speculative-tokens", 4), ("ngramMin", "--speculative-ngram-min", 1),
                  ("ngramMax", "--speculative-ngram-max", 4))  # fmt: skip
    args += _differing(engine.get("speculativeDecoding", {}), spec_flags)
    adapters = model.get("loraAdapters", [])
    if adapters:
        args += ["--lora-modules", *(f"{a['name']}={_adapter_dir(model, i, a)}" for i, a in enumerate(adapters))]
        args += _differing(
            engine.get("lora", {}), (("maxLoras", "--max-loras", 4), ("maxLoraRank", "--max-lora-rank", 64))
        )
    if "apiKeySecret" in engine:
        args += ["--api-key-file", f"{API_KEY_DIR}/api-key"]
    return args + list(engine.get("extraArgs", []))


def _differing(block: Manifest, flags: tuple[tuple[str, str, int], ...]) -> list[str]:
    """The flags for a block's (key, flag, engine default) whose value differs from the engine's default."""
    return [
        part for key, flag, default in flags if block.get(key, default) != default for part in (flag, str(block[key]))
    ]


def _adapter_dir(model: Manifest, index: int, adapter: Manifest) -> str:
    """Where a LoRA adapter's folder is in the engine container: in the model's volume, or in its own."""
    root = MODEL_DIR if adapter.get("source", "model") == "model" else f"{LORA_DIR}/{index}"
    return f"{root}/{adapter.get('path', '')}".rstrip("/")


def _container_security() -> Manifest:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _engine_container(spec: Manifest) -> Manifest:
    res, images, engine = spec["resources"], spec["images"], spec["engine"]
    # quantities as strings, as the API server returns them (so drift checks compare like with like)
    requests: Manifest = {"cpu": str(res["cpu"]), "memory": str(res["memory"])}
    limits: Manifest = {"memory": str(res["memory"])}
    if res["gpus"] > 0:
        requests[res["gpuResourceName"]] = str(res["gpus"])
        limits[res["gpuResourceName"]] = str(res["gpus"])
    mounts: list[Manifest] = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}]
    if spec["model"]["source"] != "builtin":
        mounts.append({"name": "model", "mountPath": MODEL_DIR, "readOnly": True})
    for i, adapter in enumerate(spec["model"].get("loraAdapters", [])):
        if adapter.get("source", "model") != "model":
            mounts.append({"name": f"lora-{i}", "mountPath": f"{LORA_DIR}/{i}", "readOnly": True})
    if "apiKeySecret" in engine:
        mounts.append({"name": "api-key", "mountPath": API_KEY_DIR, "readOnly": True})
    probe = {"grpc": {"port": ENGINE_PORT}}
    return {
        "name": "engine",
        "image": images["engine"],
        "imagePullPolicy": images["pullPolicy"],
        "command": ["optimist"],
        "args": engine_args(spec),
        "env": [
            {"name": "HOME", "value": "/tmp"},  # caches (tokenizer, Triton) need a writable home
            {"name": "TRITON_CACHE_DIR", "value": "/tmp/triton"},
        ],
        "ports": [
            {"name": "grpc", "containerPort": ENGINE_PORT, "protocol": "TCP"},
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
        ],
        # grpc.health.v1 answers NOT_SERVING while the model loads and while draining.
        "startupProbe": {**probe, "periodSeconds": 10, "failureThreshold": math.ceil(engine["startupSeconds"] / 10)},
        "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {**probe, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3},
        "resources": {"requests": requests, "limits": limits},
        "volumeMounts": mounts,
        "securityContext": _container_security(),
    }


def _sidecar_container(name: str, spec: Manifest) -> Manifest:
    images = spec["images"]
    args = ["sidecar", "--engine", f"127.0.0.1:{ENGINE_PORT}", "--port", str(METRICS_PORT), "--pool", name]
    if not spec["monitoring"]["vllmCompatibility"]:
        args.append("--no-vllm-metrics")
    return {
        "name": "sidecar",
        "image": images.get("sidecar", images["engine"]),
        "imagePullPolicy": images["pullPolicy"],
        "command": ["optimist"],
        "args": args,
        "env": [{"name": "HOME", "value": "/tmp"}],
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": METRICS_PORT}, "periodSeconds": 10},
        "resources": SIDECAR_RESOURCES,
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": _container_security(),
    }


def _volumes(spec: Manifest) -> list[Manifest]:
    volumes: list[Manifest] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": str(spec["resources"]["shmSize"])}},
        {"name": "tmp", "emptyDir": {}},
    ]
    model = spec["model"]
    if model["source"] == "pvc":
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": model["claimName"], "readOnly": True}})
    elif model["source"] == "image":
        pull = spec["images"]["pullPolicy"]
        volumes.append({"name": "model", "image": {"reference": model["image"], "pullPolicy": pull}})
    for i, adapter in enumerate(model.get("loraAdapters", [])):
        if adapter.get("source", "model") == "pvc":
            claim = {"claimName": adapter["claimName"], "readOnly": True}
            volumes.append({"name": f"lora-{i}", "persistentVolumeClaim": claim})
        elif adapter.get("source") == "image":
            pull = spec["images"]["pullPolicy"]
            volumes.append({"name": f"lora-{i}", "image": {"reference": adapter["image"], "pullPolicy": pull}})
    secret = spec["engine"].get("apiKeySecret")
    if secret:  # readable by the pod's group (fsGroup) only
        items = [{"key": secret["key"], "path": "api-key"}]
        volumes.append(
            {"name": "api-key", "secret": {"secretName": secret["name"], "items": items, "defaultMode": 0o440}}
        )
    return volumes


def pod_template(pool: Manifest, spec: Manifest) -> Manifest:
    name = pool["metadata"]["name"]
    res = spec["resources"]
    pod: Manifest = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 45,  # the engine drains for 30 s on SIGTERM
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_engine_container(spec), _sidecar_container(name, spec)],
        "volumes": _volumes(spec),
        "tolerations": res["tolerations"],
    }
    for key in ("nodeSelector", "affinity", "runtimeClassName", "priorityClassName"):
        if key in res:
            pod[key] = res[key]
    if spec["images"].get("pullSecrets"):
        pod["imagePullSecrets"] = [{"name": s} for s in spec["images"]["pullSecrets"]]
    return {
        "metadata": {
            "labels": labels(name),
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(METRICS_PORT),
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": pod,
    }


def build_deployment(pool: Manifest, spec: Manifest) -> Manifest:
    name = pool["metadata"]["name"]
    rollout = spec["rollout"]
    return {
        "apiVersion": DEPLOYMENT.api_version,
        "kind": DEPLOYMENT.kind,
        "metadata": _meta(pool, name),
        "spec": {
            # The pool's spec.replicas (written by users, HPA or KEDA through /scale) is the only source.
            "replicas": spec["replicas"],
            "selector": {"matchLabels": selector_labels(name)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": rollout["maxSurge"], "maxUnavailable": rollout["maxUnavailable"]},
            },
            "revisionHistoryLimit": 5,
            "progressDeadlineSeconds": max(600, spec["engine"]["startupSeconds"] + 300),
            "template": pod_template(pool, spec),
        },
    }


# ------------------------------------------------------------------------------------------------ Services


def build_grpc_service(pool: Manifest) -> Manifest:
    """Headless: gRPC keeps long-lived HTTP/2 connections, so clients balance over the pod addresses."""
    name = pool["metadata"]["name"]
    return {
        "apiVersion": SERVICE.api_version,
        "kind": SERVICE.kind,
        "metadata": _meta(pool, name),
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(name),
            "ports": [
                {
                    "name": "grpc",
                    "port": ENGINE_PORT,
                    "targetPort": "grpc",
                    "protocol": "TCP",
                    "appProtocol": "kubernetes.io/h2c",
                }
            ],
        },
    }


def build_http_service(pool: Manifest) -> Manifest:
    """The OpenAI-compatible API behind one virtual IP (`<name>-http:8000`): HTTP/1.1 clients open short or
    pooled connections, which kube-proxy spreads over the ready pods."""
    port = {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"}
    return _cluster_ip_service(pool, "http", "api", port)


def build_metrics_service(pool: Manifest) -> Manifest:
    port = {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}
    return _cluster_ip_service(pool, "metrics", "metrics", port)


def _cluster_ip_service(pool: Manifest, suffix: str, component: str, port: Manifest) -> Manifest:
    name = pool["metadata"]["name"]
    return {
        "apiVersion": SERVICE.api_version,
        "kind": SERVICE.kind,
        "metadata": _meta(pool, f"{name}-{suffix}", component),
        "spec": {"type": "ClusterIP", "selector": selector_labels(name), "ports": [port]},
    }


# ------------------------------------------------------------------------------------------- Autoscaling


def scale_target(pool: Manifest) -> Manifest:
    """Autoscalers scale the pool through its /scale subresource, never the Deployment."""
    return {"apiVersion": API_VERSION, "kind": KIND, "name": pool["metadata"]["name"]}


def scale_target_value(autoscaling: Manifest) -> float:
    return float(autoscaling.get("target", DEFAULT_TARGETS[autoscaling["metric"]]))


def quantity(value: float) -> str:
    """A Kubernetes quantity string for a non-negative number ("4", "900m")."""
    if value == int(value):
        return str(int(value))
    milli = round(value * 1000)
    return f"{milli}m"


def _behavior(autoscaling: Manifest) -> Manifest:
    """Up as fast as the HPA's own default (double, or 4 more pods, every 15 s), down after the window as far as the
    signal says. `optimist bench autoscale` (engine/scheduler/fleet.py, benchmarks/README.md) measured the gentler
    2 pods per 60 s up and 1 pod per 120 s down keeping 4-7% fewer requests on time through bursts at about the
    same cost: the time a burst waits for capacity is the loss, and loading a model does not make it shorter."""
    return {
        "scaleUp": {
            "stabilizationWindowSeconds": autoscaling["scaleUpStabilizationSeconds"],
            "selectPolicy": "Max",
            "policies": [
                {"type": "Percent", "value": 100, "periodSeconds": 15},
                {"type": "Pods", "value": 4, "periodSeconds": 15},
            ],
        },
        "scaleDown": {
            "stabilizationWindowSeconds": autoscaling["scaleDownStabilizationSeconds"],
            "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}],
        },
    }


def build_hpa(pool: Manifest, spec: Manifest) -> Manifest:
    """HPA v2 on a Pods custom metric served by prometheus-adapter (rules in deploy/autoscaling/)."""
    name, autoscaling = pool["metadata"]["name"], spec["autoscaling"]
    return {
        "apiVersion": HPA.api_version,
        "kind": HPA.kind,
        "metadata": _meta(pool, name, "autoscaler"),
        "spec": {
            "scaleTargetRef": scale_target(pool),
            "minReplicas": autoscaling["minReplicas"],
            "maxReplicas": autoscaling["maxReplicas"],
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": METRIC_SERIES[autoscaling["metric"]]},
                        "target": {"type": "AverageValue", "averageValue": quantity(scale_target_value(autoscaling))},
                    },
                }
            ],
            "behavior": _behavior(autoscaling),
        },
    }


def keda_query(pool: Manifest, metric: str) -> str:
    """PromQL summing the metric over the pool's replicas (KEDA: desired = ceil(query / threshold))."""
    series = METRIC_SERIES[metric]
    match = f'namespace="{pool["metadata"]["namespace"]}",pool="{pool["metadata"]["name"]}"'
    agg = "max_over_time" if metric == "lowerBoundDemand" else "avg_over_time"
    return f"sum({agg}({series}{{{match}}}[1m]))"


def build_scaled_object(pool: Manifest, spec: Manifest) -> Manifest:
    name, autoscaling = pool["metadata"]["name"], spec["autoscaling"]
    return {
        "apiVersion": SCALED_OBJECT.api_version,
        "kind": SCALED_OBJECT.kind,
        "metadata": _meta(pool, name, "autoscaler"),
        "spec": {
            "scaleTargetRef": scale_target(pool),
            "minReplicaCount": autoscaling["minReplicas"],
            "maxReplicaCount": autoscaling["maxReplicas"],
            "pollingInterval": 15,
            "cooldownPeriod": autoscaling["scaleDownStabilizationSeconds"],
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": _behavior(autoscaling)}},
            "triggers": [
                {
                    "type": "prometheus",
                    "metadata": {
                        "serverAddress": autoscaling["prometheusAddress"],
                        "query": keda_query(pool, autoscaling["metric"]),
                        "threshold": f"{scale_target_value(autoscaling):g}",
                    },
                }
            ],
        },
    }


def build_pdb(pool: Manifest, spec: Manifest) -> Manifest:
    name = pool["metadata"]["name"]
    return {
        "apiVersion": PDB.api_version,
        "kind": PDB.kind,
        "metadata": _meta(pool, name),
        "spec": {
            "maxUnavailable": spec["rollout"]["podDisruptionBudget"]["maxUnavailable"],
            "selector": {"matchLabels": selector_labels(name)},
        },
    }


def build_service_monitor(pool: Manifest, spec: Manifest) -> Manifest:
    name = pool["metadata"]["name"]
    return {
        "apiVersion": SERVICE_MONITOR.api_version,
        "kind": SERVICE_MONITOR.kind,
        "metadata": _meta(pool, name, "metrics"),
        "spec": {
            "selector": {"matchLabels": {**selector_labels(name), "app.kubernetes.io/component": "metrics"}},
            "endpoints": [{"port": "metrics", "path": "/metrics", "interval": spec["monitoring"]["interval"]}],
        },
    }


def build_gateway_pool(pool: Manifest, spec: Manifest) -> Manifest:
    """The Gateway API Inference Extension's InferencePool (same name, other group) selecting our pods. With
    appProtocol http (the default) the gateway routes to the OpenAI-compatible port, whose request bodies the
    endpoint picker parses and whose /metrics it scrapes (it scrapes the first target port)."""
    name, gateway = pool["metadata"]["name"], spec["gateway"]
    picker = gateway["endpointPickerRef"]
    ref: Manifest = {
        "group": picker["group"],
        "kind": picker["kind"],
        "name": picker["name"],
        "failureMode": picker["failureMode"],
    }
    if "port" in picker:
        ref["port"] = {"number": picker["port"]["number"]}
    return {
        "apiVersion": GATEWAY_POOL.api_version,
        "kind": GATEWAY_POOL.kind,
        "metadata": _meta(pool, name, "gateway"),
        "spec": {
            "selector": {"matchLabels": selector_labels(name)},
            "targetPorts": [{"number": HTTP_PORT if gateway["appProtocol"] == "http" else ENGINE_PORT}],
            "appProtocol": gateway["appProtocol"],
            "endpointPickerRef": ref,
        },
    }


def build_children(pool: Manifest) -> list[Manifest]:
    """Every object the pool owns, given its spec (defaults applied here)."""
    spec = defaulted_spec(pool)
    children = [
        build_deployment(pool, spec),
        build_grpc_service(pool),
        build_http_service(pool),
        build_metrics_service(pool),
    ]
    mode = spec["autoscaling"]["mode"]
    if mode == "hpa":
        children.append(build_hpa(pool, spec))
    elif mode == "keda":
        children.append(build_scaled_object(pool, spec))
    if spec["rollout"]["podDisruptionBudget"]["enabled"]:
        children.append(build_pdb(pool, spec))
    if spec["monitoring"]["serviceMonitor"]:
        children.append(build_service_monitor(pool, spec))
    if spec["gateway"]["enabled"]:
        children.append(build_gateway_pool(pool, spec))
    return children


def model_description(spec: Manifest) -> str:
    """What the pool serves, for `kubectl get` (status.model)."""
    model = spec["model"]
    if "servedName" in model:
        return str(model["servedName"])
    if model["source"] == "builtin":
        return "builtin (SmolLM2-135M-Instruct)"
    where = model["claimName"] if model["source"] == "pvc" else model["image"]
    return f"{where}:{model['path']}"
