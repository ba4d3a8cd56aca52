"""The CRD: generated file up to date, names, subresources, and its schema and CEL rules accepting the examples and
rejecting invalid pools (a JSON-schema validator over openAPIV3Schema and a CEL evaluator for the rules)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from optimist.operator.crd import crd_manifest
from optimist.operator.validation import validation_errors

from .conftest import ROOT, load_example

CRD_FILE = ROOT / "charts" / "optimist" / "crds" / "inferencepools.optimist.dev.yaml"


@pytest.fixture(scope="module")
def committed_crd() -> dict[str, Any]:
    data = yaml.safe_load(CRD_FILE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def schema(committed_crd: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = committed_crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return result


def test_committed_crd_is_generated_from_crd_py(committed_crd: dict[str, Any]) -> None:
    source = (ROOT / "scripts" / "gen-crd").read_text()
    module: dict[str, Any] = {"__name__": "gen_crd"}
    exec(compile(source, "scripts/gen-crd", "exec"), module)
    assert CRD_FILE.read_text() == module["render"](), "stale CRD: run scripts/gen-crd"
    assert committed_crd == crd_manifest()


def test_names_subresources_and_columns(committed_crd: dict[str, Any]) -> None:
    spec = committed_crd["spec"]
    assert committed_crd["metadata"]["name"] == "inferencepools.optimist.dev"
    assert spec["group"] == "optimist.dev" and spec["scope"] == "Namespaced"
    names = spec["names"]
    assert names["kind"] == "InferencePool" and names["plural"] == "inferencepools"
    # the Gateway API Inference Extension's InferencePool is `infpool`: ours must not shadow it
    assert "infpool" not in names["shortNames"] and "infpools" not in names["shortNames"]
    assert "ipool" in names["shortNames"]
    assert "all" not in names.get("categories", [])
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Ready"] == ".status.readyReplicas"
    assert columns["Desired"] == ".spec.replicas"
    assert columns["Scheduler"] == ".spec.engine.scheduler"
    assert columns["Age"] == ".metadata.creationTimestamp"


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("inferencepool*.yaml")))
def test_examples_are_valid(example: str, schema: dict[str, Any]) -> None:
    assert validation_errors(load_example(example), schema) == []


def _pool(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "optimist.dev/v1alpha1", "kind": "InferencePool", "metadata": {"name": "p"}, "spec": spec}


INVALID = [
    ({"replicas": "two"}, "spec.replicas: 'two' is not of type 'integer'"),
    ({"replicas": -1}, "spec.replicas: -1 is less than the minimum of 0"),
    ({"engine": {"scheduler": "magic"}}, "spec.engine.scheduler: 'magic' is not one of"),
    ({"engine": {"maxNumSeqs": 0}}, "spec.engine.maxNumSeqs: 0 is less than the minimum of 1"),
    ({"engine": {"kvCacheMemoryFraction": 1.5}}, "spec.engine.kvCacheMemoryFraction: 1.5 is greater than"),
    ({"autoscaling": {"mode": "vpa"}}, "spec.autoscaling.mode: 'vpa' is not one of"),
    ({"autoscaling": {"minReplicas": -2}}, "spec.autoscaling.minReplicas: -2 is less than the minimum of 0"),
    ({"resources": {"gpuResourceName": "amd.com/gpu"}}, "spec.resources.gpuResourceName: 'amd.com/gpu' does not match"),
    ({"resources": {"memory": "lots"}}, "spec.resources.memory"),
    ({"rollout": {"maxSurge": "a lot"}}, "spec.rollout.maxSurge"),
    ({"modle": {}}, "Additional properties are not allowed ('modle' was unexpected)"),
    ({"engine": {"apiKeySecret": {"key": "token"}}}, "spec.engine.apiKeySecret: 'name' is a required property"),
    ({"engine": {"apiKeySecret": {"name": ""}}}, "spec.engine.apiKeySecret.name: '' should be non-empty"),
    # CEL rules (cross-field)
    ({"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}, "autoscaling.minReplicas must not exceed maxReplicas"),
    ({"autoscaling": {"mode": "hpa", "minReplicas": 0}}, "scale to zero) needs mode keda"),
    ({"model": {"source": "pvc", "path": "m.gguf"}}, "model.claimName is required when model.source is pvc"),
    ({"model": {"source": "image", "path": "m.gguf"}}, "model.image is required when model.source is image"),
    ({"model": {"source": "pvc", "claimName": "c"}}, "model.path is required unless model.source is builtin"),
    ({"engine": {"kvCacheTokens": 4096, "kvCacheMemoryFraction": 0.5}}, "not both"),
    ({"rollout": {"maxSurge": 0, "maxUnavailable": "0%"}}, "cannot both be 0"),
    ({"gateway": {"enabled": True}}, "gateway.endpointPickerRef is required"),
    ({"model": {"weights": "fp16"}}, "model.weights fp16 and int4 run on CPU only"),  # gpus defaults to 1
    ({"model": {"weights": "int4"}, "resources": {"gpus": 1}}, "model.weights fp16 and int4 run on CPU only"),
    ({"engine": {"kvCacheDtype": "float16"}}, "engine.kvCacheDtype float32 and float16 are for CPU pods"),
    ({"engine": {"kvCacheDtype": "int8"}, "resources": {"gpus": 0}}, "spec.engine.kvCacheDtype: 'int8' is not one of"),
    ({"engine": {"speculativeDecoding": {"tokens": 17}}}, "spec.engine.speculativeDecoding.tokens: 17 is greater"),
    ({"engine": {"speculativeDecoding": {"ngramMin": 5}}}, "speculativeDecoding.ngramMin must not exceed ngramMax"),
    ({"model": {"loraAdapters": [{"name": "sql"}]}}, "loraAdapters with source model need a model volume"),
    ({"model": {"loraAdapters": [{"name": "a", "source": "pvc"}]}}, "loraAdapters: claimName is required"),
    ({"model": {"loraAdapters": [{"name": "a", "source": "image"}]}}, "loraAdapters: image is required"),
    ({"model": {"loraAdapters": [{"name": "a,b", "source": "image", "image": "x"}]}}, "does not match"),
    ({"model": {"loraAdapters": [{"source": "image", "image": "x"}]}}, "'name' is a required property"),
    ({"engine": {"lora": {"maxLoras": 0}}}, "spec.engine.lora.maxLoras: 0 is less than the minimum of 1"),
]


@pytest.mark.parametrize(("spec", "message"), INVALID, ids=[m for _, m in INVALID])
def test_invalid_pools_are_rejected_with_the_field_named(
    spec: dict[str, Any], message: str, schema: dict[str, Any]
) -> None:
    errors = validation_errors(_pool(spec), schema)
    assert errors, f"accepted: {spec}"
    assert any(message in e for e in errors), errors


def test_valid_variations(schema: dict[str, Any]) -> None:
    base = load_example("inferencepool.yaml")
    for spec in (
        {"autoscaling": {"mode": "keda", "minReplicas": 0, "maxReplicas": 4}},  # scale to zero with KEDA
        {"resources": {"gpus": 0}},
        {"resources": {"gpus": 0}, "model": {"source": "builtin", "weights": "fp16"}},
        {"resources": {"gpus": 0}, "engine": {"kvCacheDtype": "float16"}},
        {"resources": {"gpuResourceName": "nvidia.com/mig-3g.40gb", "memory": 17179869184}},
        {"rollout": {"maxSurge": "25%", "maxUnavailable": 0}},
        {"model": {"source": "image", "image": "ghcr.io/x/y:1", "path": "model.gguf"}},
        {"model": {"loraAdapters": [{"name": "sql", "source": "pvc", "claimName": "adapters", "path": "sql"}]}},
        {"model": {"source": "pvc", "claimName": "m", "path": "m.gguf", "loraAdapters": [{"name": "a", "path": "a"}]}},
    ):
        pool = copy.deepcopy(base)
        pool["spec"].update(spec)
        assert validation_errors(pool, schema) == [], spec


def test_schema_is_structural(schema: dict[str, Any]) -> None:
    """Every property has a type (or is int-or-string / preserve-unknown), as apiextensions v1 requires."""

    def walk(node: dict[str, Any], path: str) -> None:
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        for name, sub in node.get("properties", {}).items():
            walk(sub, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}{{}}")

    walk(schema, "")
