"""The InferencePool CustomResourceDefinition: the one source of truth for the chart, the operator and the tests.

`crd_manifest()` builds the CRD; `scripts/gen-crd` writes it to `charts/optimist/crds/` (a test fails when the
committed file is stale). The operator reads pools through `with_defaults()`, which applies the schema's defaults
the way the API server does, so a default lives in exactly one place: here.
"""

from __future__ import annotations

import copy
from typing import Any

GROUP = "optimist.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "InferencePool"
PLURAL = "inferencepools"
SINGULAR = "inferencepool"
# The Gateway API Inference Extension's InferencePool owns `infpool`; ours must never clash with it.
SHORT_NAMES = ["ipool", "optpool"]
CATEGORIES = ["optimist"]

SCHEDULERS = ["amin", "amin-learned", "amax", "fcfs"]
SCALE_METRICS = ["lowerBoundDemand", "queueDepth", "kvUsage"]
ENGINE_PORT = 50051
HTTP_PORT = 8000  # the engine's OpenAI-compatible HTTP API (and /metrics, where the endpoint picker scrapes)
METRICS_PORT = 9090
DEFAULT_ENGINE_IMAGE = "ghcr.io/optimist-serving/engine:0.1.0"

Schema = dict[str, Any]


def _int(desc: str, *, minimum: int | None = None, maximum: int | None = None, default: int | None = None) -> Schema:
    s: Schema = {"type": "integer", "description": desc}
    if minimum is not None:
        s["minimum"] = minimum
    if maximum is not None:
        s["maximum"] = maximum
    if default is not None:
        s["default"] = default
    return s


def _str(desc: str, *, default: str | None = None, enum: list[str] | None = None, **extra: Any) -> Schema:
    s: Schema = {"type": "string", "description": desc, **extra}
    if enum is not None:
        s["enum"] = enum
    if default is not None:
        s["default"] = default
    return s


def _bool(desc: str, default: bool) -> Schema:
    return {"type": "boolean", "description": desc, "default": default}


def _int_or_string(desc: str, default: int | str | None = None, pattern: str | None = None) -> Schema:
    s: Schema = {"x-kubernetes-int-or-string": True, "description": desc}
    if pattern is not None:
        s["anyOf"] = [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": pattern}]
    if default is not None:
        s["default"] = default
    return s


def _obj(
    desc: str,
    props: dict[str, Schema],
    *,
    required: list[str] | None = None,
    rules: list[tuple[str, str]] | None = None,
    default: bool = True,
) -> Schema:
    s: Schema = {"type": "object", "description": desc, "properties": props}
    if required:
        s["required"] = required
    if rules:
        s["x-kubernetes-validations"] = [{"rule": rule, "message": msg} for rule, msg in rules]
    if default:  # an absent block gets its members' defaults, like an empty one
        s["default"] = {}
    return s


_QUANTITY = r"^([+]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
_PERCENT_OR_INT = r"^[0-9]+%$"


def _volume_fields(what: str) -> dict[str, Schema]:
    """Where a volume of weights comes from, for sources pvc and image."""
    return {
        "claimName": _str(f"PersistentVolumeClaim holding the {what} (source pvc)", minLength=1),
        "image": _str(f"OCI image holding the {what} (source image)", minLength=1),
    }


def _relative_path(desc: str) -> Schema:
    return _str(desc, default="", pattern=r"^(|[^/].*)$", maxLength=4096)


def _model() -> Schema:
    return _obj(
        "Where the weights come from.",
        {
            "source": _str(
                "builtin: the default model baked into the engine image; pvc: a file or folder on a "
                "PersistentVolumeClaim; image: an OCI image mounted as a volume (Kubernetes image volumes)",
                enum=["builtin", "pvc", "image"],
                default="builtin",
            ),
            **_volume_fields("model"),
            "path": _relative_path("path of the .gguf file or Hugging Face folder inside the volume"),
            "format": _str("weights format", enum=["gguf", "safetensors"], default="gguf"),
            "weights": _str(
                "auto: int4 (GGUF) or fp16 on CPU pods, float on GPU pods; float: dequantize at load; fp16: float16 "
                "weights, float32 math (CPU only); int4: GGUF Q4/Q8 blocks read by native kernels, float32 math "
                "(CPU only)",
                enum=["auto", "float", "fp16", "int4"],
                default="auto",
            ),
            "contextLength": _int(
                "largest prompt plus output, tokens (default: the model's own)", minimum=16, maximum=1 << 24
            ),
            "servedName": _str("model name reported to clients (default: the model's own)", maxLength=253),
            "loraAdapters": {
                "type": "array",
                "description": "LoRA adapters (PEFT directories) served beside the model: a request picks one by "
                "its name as the model (OpenAI `model`, gRPC `adapter`); requests of several adapters and of the "
                "model share batches",
                "maxItems": 64,
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["name"],
                "items": _obj(
                    "one adapter",
                    {
                        "name": _str("the name requests use", minLength=1, maxLength=253, pattern=r"^[^,\s\"\\]+$"),
                        "source": _str(
                            "model: a folder inside the model's own volume; pvc: on a PersistentVolumeClaim; image: "
                            "an OCI image mounted as a volume",
                            enum=["model", "pvc", "image"],
                            default="model",
                        ),
                        **_volume_fields("adapter"),
                        "path": _relative_path("the adapter's folder inside its volume (empty: the volume's root)"),
                    },
                    required=["name"],
                    rules=[
                        (
                            "self.source != 'pvc' || has(self.claimName)",
                            "loraAdapters: claimName is required for source pvc",
                        ),
                        (
                            "self.source != 'image' || has(self.image)",
                            "loraAdapters: image is required for source image",
                        ),
                    ],
                    default=False,
                ),
            },
        },
        rules=[
            (
                "!has(self.loraAdapters) || self.source != 'builtin' || self.loraAdapters.all(a, a.source != 'model')",
                "loraAdapters with source model need a model volume (model.source pvc or image)",
            ),
            ("self.source != 'pvc' || has(self.claimName)", "model.claimName is required when model.source is pvc"),
            ("self.source != 'image' || has(self.image)", "model.image is required when model.source is image"),
            ("self.source == 'builtin' || self.path != ''", "model.path is required unless model.source is builtin"),
        ],
    )


def _engine() -> Schema:
    return _obj(
        "Engine settings.",
        {
            "scheduler": _str("admission and eviction policy", enum=SCHEDULERS, default="amin"),
            "kvCacheTokens": _int("KV cache capacity in tokens", minimum=16),
            "kvCacheDtype": _str(
                "KV cache element type: auto (the model's: float32 on CPU pods, bfloat16 on GPU pods); float16 (CPU "
                "pods): half the bytes per token, faster decode at long contexts, each K/V value rounded to float16",
                enum=["auto", "float32", "float16"],
                default="auto",
            ),
            "kvCacheMemoryFraction": {
                "type": "number",
                "exclusiveMinimum": True,
                "minimum": 0,
                "maximum": 1,
                "description": "KV cache as a fraction of the GPU memory left after loading weights",
            },
            "maxNumSeqs": _int("largest running batch", minimum=1, maximum=4096, default=64),
            "maxBatchedTokens": _int(
                "tokens per engine step (prefill chunks plus decodes)", minimum=16, maximum=1 << 20, default=2048
            ),
            "sparsePrefill": _obj(
                "MInference-style sparse attention for long prompts' prefill",
                {
                    "enabled": _bool("use sparse prefill for long prompts", False),
                    "threshold": _int(
                        "prompts longer than this many tokens use it (default: 32768 on GPU pods, where sparse "
                        "attention starts to pay near 32K tokens; 8192 on CPU pods)",
                        minimum=1,
                    ),
                },
            ),
            "speculativeDecoding": _obj(
                "n-gram speculative decoding (prompt lookup): decode steps also compute tokens guessed from earlier "
                "occurrences of a request's last tokens, kept only where the engine expects them to pay; greedy and "
                "seeded answers are unchanged",
                {
                    "tokens": _int("most guessed tokens per decode step (0 = off)", minimum=0, maximum=16, default=4),
                    "ngramMin": _int("shortest suffix looked up, in tokens", minimum=1, maximum=16, default=1),
                    "ngramMax": _int("longest suffix looked up, in tokens", minimum=1, maximum=16, default=4),
                },
                rules=[("self.ngramMin <= self.ngramMax", "speculativeDecoding.ngramMin must not exceed ngramMax")],
            ),
            "lora": _obj(
                "LoRA adapters (model.loraAdapters)",
                {
                    "maxLoras": _int(
                        "most distinct adapters among the running requests (requests of another wait for a slot)",
                        minimum=1,
                        maximum=64,
                        default=4,
                    ),
                    "maxLoraRank": _int("adapters of a higher rank are refused", minimum=1, maximum=1024, default=64),
                },
            ),
            "startupSeconds": _int(
                "time allowed for loading the model before the pod is restarted", minimum=10, maximum=86400, default=900
            ),
            "apiKeySecret": _obj(
                "a Secret in the pool's namespace holding the key the OpenAI-compatible API's /v1 routes require "
                "(Authorization: Bearer KEY); mounted as a file, never passed on the command line",
                {
                    "name": _str("the Secret's name", minLength=1, maxLength=253),
                    "key": _str(
                        "the Secret's data key holding the API key", default="api-key", minLength=1, maxLength=253
                    ),
                },
                required=["name"],
                default=False,
            ),
            "extraArgs": {
                "type": "array",
                "items": {"type": "string"},
                "maxItems": 64,
                "description": "more `optimist serve` arguments",
            },
        },
        rules=[
            (
                "!(has(self.kvCacheTokens) && has(self.kvCacheMemoryFraction))",
                "set engine.kvCacheTokens or engine.kvCacheMemoryFraction, not both",
            )
        ],
    )


def _autoscaling() -> Schema:
    return _obj(
        "Autoscaling of the pool through its /scale subresource.",
        {
            "mode": _str(
                "none, hpa (HPA v2 on custom metrics via prometheus-adapter) or keda (ScaledObject)",
                enum=["none", "hpa", "keda"],
                default="none",
            ),
            "minReplicas": _int("fewest replicas (0 only with keda)", minimum=0, maximum=1000, default=1),
            "maxReplicas": _int("most replicas", minimum=1, maximum=1000, default=4),
            "metric": _str(
                "lowerBoundDemand: the scheduler's predicted KV demand over capacity; queueDepth: waiting "
                "requests per replica; kvUsage: KV blocks in use (0-1)",
                enum=SCALE_METRICS,
                default="lowerBoundDemand",
            ),
            "target": {
                "type": "number",
                "minimum": 0,
                "exclusiveMinimum": True,
                "description": "target value per replica (default 0.9, 4 or 0.6 for the three metrics)",
            },
            "scaleUpStabilizationSeconds": _int(
                "scale-up stabilisation window (0: act on each recommendation, as the HPA's default)",
                minimum=0,
                maximum=3600,
                default=0,
            ),
            "scaleDownStabilizationSeconds": _int(
                "scale-down stabilisation window (model loading makes flapping expensive)",
                minimum=0,
                maximum=3600,
                default=300,
            ),
            "prometheusAddress": _str(
                "Prometheus the KEDA trigger queries",
                default="http://prometheus-operated.monitoring.svc:9090",
                pattern=r"^https?://",
            ),
        },
        rules=[
            ("self.minReplicas <= self.maxReplicas", "autoscaling.minReplicas must not exceed maxReplicas"),
            (
                "self.minReplicas > 0 || self.mode == 'keda'",
                "autoscaling.minReplicas 0 (scale to zero) needs mode keda, something must hold requests",
            ),
        ],
    )


def _toleration() -> Schema:
    return {
        "type": "object",
        "properties": {
            "key": {"type": "string"},
            "operator": {"type": "string", "enum": ["Exists", "Equal"]},
            "value": {"type": "string"},
            "effect": {"type": "string", "enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
            "tolerationSeconds": {"type": "integer"},
        },
    }


def _resources() -> Schema:
    return _obj(
        "Where and with what each replica runs.",
        {
            "gpus": _int("GPUs per pod (0: CPU only)", minimum=0, maximum=16, default=1),
            "gpuResourceName": _str(
                "extended resource for GPUs: nvidia.com/gpu or a MIG profile",
                default="nvidia.com/gpu",
                pattern=r"^nvidia\.com/(gpu|mig-[0-9]+g\.[0-9]+gb(\.[a-z0-9+]+)?)$",
            ),
            "cpu": _int_or_string("CPU request", default="4", pattern=_QUANTITY),
            "memory": _int_or_string("memory request and limit", default="16Gi", pattern=_QUANTITY),
            "shmSize": _int_or_string("size of /dev/shm (memory-backed)", default="1Gi", pattern=_QUANTITY),
            "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
            "tolerations": {
                "type": "array",
                "items": _toleration(),
                "default": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            },
            "affinity": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "runtimeClassName": _str("RuntimeClass (e.g. nvidia)", maxLength=253),
            "priorityClassName": _str("PriorityClass of the pods", maxLength=253),
        },
    )


def _images() -> Schema:
    return _obj(
        "Container images.",
        {
            "engine": _str("engine image", default=DEFAULT_ENGINE_IMAGE, minLength=1),
            "sidecar": _str("sidecar image (default: the engine image)", minLength=1),
            "pullPolicy": _str("image pull policy", enum=["Always", "IfNotPresent", "Never"], default="IfNotPresent"),
            "pullSecrets": {"type": "array", "items": {"type": "string"}, "description": "image pull secrets"},
        },
    )


def _is_zero(field: str) -> str:
    """CEL: an int-or-string field is 0 or '0%'."""
    return f"(type({field}) == int ? {field} == 0 : {field} == '0%')"


def _rollout() -> Schema:
    pct = r"^[0-9]+%$"
    return _obj(
        "How new pods replace old ones.",
        {
            "maxSurge": _int_or_string("extra pods during a rollout (GPUs rarely allow any)", 0, pct),
            "maxUnavailable": _int_or_string("pods down during a rollout", 1, pct),
            "podDisruptionBudget": _obj(
                "PodDisruptionBudget for voluntary disruptions",
                {
                    "enabled": _bool("create a PodDisruptionBudget", True),
                    "maxUnavailable": _int_or_string("pods a drain may take down at once", 1, pct),
                },
            ),
        },
        rules=[
            (
                f"!({_is_zero('self.maxSurge')} && {_is_zero('self.maxUnavailable')})",
                "rollout.maxSurge and rollout.maxUnavailable cannot both be 0",
            )
        ],
    )


def _monitoring() -> Schema:
    return _obj(
        "Metrics.",
        {
            "serviceMonitor": _bool("create a Prometheus Operator ServiceMonitor", False),
            "interval": _str("scrape interval", default="15s", pattern=r"^[0-9]+(ms|s|m)$"),
            "vllmCompatibility": _bool("also export vllm:* series (Gateway API Inference Extension)", True),
        },
    )


def _gateway() -> Schema:
    return _obj(
        "A Gateway API Inference Extension InferencePool (inference.networking.k8s.io/v1) for our pods.",
        {
            "enabled": _bool("create the Gateway API InferencePool", False),
            "appProtocol": _str(
                "which port the gateway routes to: http = the engine's OpenAI-compatible API on 8000 (what the "
                "endpoint picker parses, and where it scrapes /metrics); kubernetes.io/h2c = the gRPC port 50051 "
                "(needs a picker that parses optimist.v1 requests)",
                enum=["http", "kubernetes.io/h2c"],
                default="http",
            ),
            "endpointPickerRef": _obj(
                "the endpoint picker extension",
                {
                    "group": _str("API group of the referent", default=""),
                    "kind": _str("kind of the referent", default="Service"),
                    "name": _str("name of the referent", minLength=1, maxLength=253),
                    "port": _obj(
                        "port of the picker",
                        {"number": _int("port", minimum=1, maximum=65535)},
                        required=["number"],
                        default=False,
                    ),
                    "failureMode": _str(
                        "what the gateway does when the picker fails",
                        enum=["FailOpen", "FailClose"],
                        default="FailClose",
                    ),
                },
                required=["name"],
                default=False,
            ),
        },
        rules=[
            (
                "!self.enabled || has(self.endpointPickerRef)",
                "gateway.endpointPickerRef is required when gateway.enabled is true",
            )
        ],
    )


def _condition() -> Schema:
    return {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": {"type": "string"},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string"},
            "message": {"type": "string"},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
            "observedGeneration": {"type": "integer"},
        },
    }


def spec_schema() -> Schema:
    return _obj(
        "What the pool serves and how.",
        {
            "replicas": _int(
                "desired replicas (the autoscaler writes this through /scale)", minimum=0, maximum=1000, default=1
            ),
            "model": _model(),
            "engine": _engine(),
            "autoscaling": _autoscaling(),
            "resources": _resources(),
            "images": _images(),
            "rollout": _rollout(),
            "monitoring": _monitoring(),
            "gateway": _gateway(),
        },
        rules=[
            (
                "!has(self.model) || !has(self.model.weights) || self.model.weights in ['auto', 'float'] || "
                "(has(self.resources) && has(self.resources.gpus) && self.resources.gpus == 0)",
                "model.weights fp16 and int4 run on CPU only: set resources.gpus to 0",
            ),
            (
                "!has(self.engine) || !has(self.engine.kvCacheDtype) || self.engine.kvCacheDtype == 'auto' || "
                "(has(self.resources) && has(self.resources.gpus) && self.resources.gpus == 0)",
                "engine.kvCacheDtype float32 and float16 are for CPU pods (GPU pods keep the model's): set "
                "resources.gpus to 0",
            ),
        ],
    )


def status_schema() -> Schema:
    return {
        "type": "object",
        "properties": {
            "observedGeneration": {"type": "integer"},
            "replicas": {"type": "integer"},
            "readyReplicas": {"type": "integer"},
            "updatedReplicas": {"type": "integer"},
            "selector": {"type": "string"},
            "model": {"type": "string", "description": "what the pool serves (for printing)"},
            "conditions": {
                "type": "array",
                "items": _condition(),
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
        },
    }


def open_api_schema() -> Schema:
    return {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema(),
            "status": status_schema(),
        },
    }


def crd_manifest() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "optimist", "app.kubernetes.io/part-of": "optimist"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": CATEGORIES,
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": open_api_schema()},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": [
                        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
                        {"name": "Desired", "type": "integer", "jsonPath": ".spec.replicas"},
                        {"name": "Model", "type": "string", "jsonPath": ".status.model"},
                        {"name": "Scheduler", "type": "string", "jsonPath": ".spec.engine.scheduler"},
                        {
                            "name": "Status",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                }
            ],
        },
    }


def with_defaults(schema: Schema, value: Any) -> Any:
    """`value` with the schema's defaults filled in, as the API server's structural defaulting does."""
    value = copy.deepcopy(value)
    _default_into(schema, value)
    return value


def _default_into(schema: Schema, value: Any) -> None:
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                _default_into(sub, value[name])
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            _default_into(schema["items"], item)


def defaulted_spec(pool: dict[str, Any]) -> dict[str, Any]:
    """The pool's spec with every default applied (a missing spec is an empty one)."""
    spec = with_defaults(spec_schema(), pool.get("spec") or {})
    assert isinstance(spec, dict)
    return spec
