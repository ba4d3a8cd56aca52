"""The Helm chart with the real helm v4: lint, template for default and full values, every rendered manifest valid
against the Kubernetes schemas (kubernetes-validate) for 1.33 and 1.35, RBAC covering exactly what the operator
writes."""

from __future__ import annotations

import subprocess
from typing import Any

import kubernetes_validate
import pytest
import yaml

from optimist.operator import builders as b
from optimist.operator.reconcile import POOL
from optimist.operator.validation import validation_errors

from .conftest import ROOT
from .k8s_tools import tool

CHART = ROOT / "charts" / "optimist"
FULL = CHART / "ci" / "full-values.yaml"
VALUE_SETS = {"default": [], "full": ["-f", str(FULL)]}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([tool("helm"), *args], capture_output=True, text=True, timeout=120)
    if check and out.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out


def render(*values: str) -> list[dict[str, Any]]:
    out = helm("template", "opt", str(CHART), "--namespace", "ops", "--include-crds", *values)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(*VALUE_SETS[request.param])


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_helm_lint(values: str) -> None:
    out = helm("lint", "--strict", str(CHART), *VALUE_SETS[values])
    assert "1 chart(s) linted, 0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("version", ["1.33.0", "1.35.0"])
def test_every_manifest_validates(rendered: tuple[str, list[dict[str, Any]]], version: str) -> None:
    name, docs = rendered
    kinds = set()
    for doc in docs:
        kinds.add(doc["kind"])
        if doc["apiVersion"] == POOL.api_version:
            assert validation_errors(doc) == [], doc  # our CRD's own schema and rules
        elif doc["apiVersion"].startswith("monitoring.coreos.com/"):
            assert doc["kind"] == "ServiceMonitor"  # a third-party CRD: no schema in kubernetes-validate
        else:
            kubernetes_validate.validate(doc, version, strict=True)
    expected = {"CustomResourceDefinition", "ServiceAccount", "Deployment"}
    expected |= {"ClusterRole", "ClusterRoleBinding"} if name == "default" else {"Role", "RoleBinding"}
    if name == "full":
        expected |= {"ServiceMonitor", "ConfigMap", "InferencePool"}
    assert expected <= kinds, kinds


def _by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_operator_deployment() -> None:
    docs = render(*VALUE_SETS["full"])
    (dep,) = _by_kind(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/optimist-serving/operator:0.1.0-test"
    assert container["args"] == [
        "operator",
        "--liveness=http://0.0.0.0:8080/healthz",
        "--drift-interval=30",
        "--namespace=serving",
        "--namespace=team-a",
    ]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["serviceAccountName"] == "opt-optimist"
    assert pod["imagePullSecrets"] == [{"name": "ghcr"}]
    # the default image tag follows the chart's appVersion
    (dep,) = _by_kind(render(), "Deployment")
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":0.1.0")


def _grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def test_rbac_grants_what_the_operator_writes_and_no_more() -> None:
    (role,) = _by_kind(render(), "ClusterRole")
    grants = _grants(role["rules"])
    for kind in b.CHILD_KINDS:
        for verb in ("get", "create", "patch"):
            assert (kind.group, kind.plural, verb) in grants, (kind, verb)
    for kind in (b.HPA, b.PDB, b.SCALED_OBJECT, b.SERVICE_MONITOR, b.GATEWAY_POOL):  # pruned when switched off
        assert (kind.group, kind.plural, "delete") in grants
    assert ("optimist.dev", "inferencepools", "watch") in grants
    assert ("optimist.dev", "inferencepools/status", "patch") in grants
    assert ("apps", "deployments", "watch") in grants
    assert ("", "events", "create") in grants
    # least privilege: nothing on pods or secrets, no wildcards, no deleting Deployments or Services
    assert not any(r in ("pods", "secrets", "*") or v == "*" or g == "*" for g, r, v in grants)
    assert ("apps", "deployments", "delete") not in grants and ("", "services", "delete") not in grants
    (binding,) = _by_kind(render(), "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "opt-optimist", "namespace": "ops"}]


def test_watching_named_namespaces_uses_roles_only() -> None:
    docs = render(*VALUE_SETS["full"])
    assert not _by_kind(docs, "ClusterRole") and not _by_kind(docs, "ClusterRoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in _by_kind(docs, "Role")) == ["serving", "team-a"]
    assert sorted(r["metadata"]["namespace"] for r in _by_kind(docs, "RoleBinding")) == ["serving", "team-a"]


def test_crd_in_chart_is_the_generated_one() -> None:
    (crd,) = _by_kind(render(), "CustomResourceDefinition")
    from optimist.operator.crd import crd_manifest

    assert crd == crd_manifest()


def test_optional_parts() -> None:
    docs = render(*VALUE_SETS["full"])
    (monitor,) = _by_kind(docs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/component": "metrics",
        "app.kubernetes.io/managed-by": b.MANAGED_BY,
    }
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["serving", "team-a"]}
    maps = {m["metadata"]["name"]: m for m in _by_kind(docs, "ConfigMap")}
    import json

    dashboard = json.loads(maps["opt-optimist-dashboard"]["data"]["optimist.json"])
    assert dashboard["panels"] and all(p["targets"] for p in dashboard["panels"])
    rules = yaml.safe_load(maps["opt-optimist-adapter-rules"]["data"]["config.yaml"])
    assert {r["name"]["as"] for r in rules["rules"]} == set(b.METRIC_SERIES.values())
    (pool,) = _by_kind(docs, "InferencePool")
    assert pool["spec"]["replicas"] == 2 and pool["metadata"]["namespace"] == "ops"
    assert not {"ServiceMonitor", "ConfigMap", "InferencePool"} & {d["kind"] for d in render()}


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("operator.driftIntervalSeconds=1", "driftIntervalSeconds"),
        ("operator.image.pullPolicy=Sometimes", "pullPolicy"),
        ("operator.watchNamespaces[0]=Bad_NS", "watchNamespaces"),
        ("examplePool.gpus=-1", "gpus"),
        ("unknownKey=1", "unknownKey"),
    ],
)
def test_values_schema_rejects_bad_values(setting: str, message: str) -> None:
    out = helm("template", "opt", str(CHART), "--set", setting, check=False)
    assert out.returncode != 0
    assert message in out.stderr
