"""End to end: the real kopf runtime and the real kubectl against an emulated Kubernetes API over HTTP."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from optimist.operator import builders as b
from optimist.operator.kube import Kube
from optimist.operator.reconcile import POOL

from .conftest import EXAMPLES, Kubectl, wait_for

NS = "default"


def conditions(pool: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in (pool.get("status") or {}).get("conditions", [])}


def finish_rollout(kube: Kube, name: str, namespace: str = NS) -> None:
    """Play the Deployment controller: every desired replica updated, ready and available."""
    dep = kube.get(b.DEPLOYMENT, namespace, name)
    assert dep is not None
    n = dep["spec"]["replicas"]
    status = {
        "observedGeneration": dep["metadata"]["generation"],
        "replicas": n,
        "updatedReplicas": n,
        "readyReplicas": n,
        "availableReplicas": n,
    }
    kube.merge_patch(b.DEPLOYMENT, namespace, name, {"status": status}, sub="status")


def engine_args(kube: Kube, name: str) -> list[str]:
    dep = kube.get(b.DEPLOYMENT, NS, name)
    assert dep is not None
    args: list[str] = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    return args


def test_example_pool_from_kubectl_to_ready(kubectl: Kubectl, kube: Kube, start_operator: Any) -> None:
    start_operator()
    out = kubectl("apply", "--validate=false", "-f", str(EXAMPLES / "inferencepool.yaml"))
    assert "inferencepool.optimist.dev/smollm2 created" in out.stdout
    pool = kube.get(POOL, NS, "smollm2")
    assert pool is not None
    uid = pool["metadata"]["uid"]

    children = [(b.DEPLOYMENT, "smollm2"), (b.SERVICE, "smollm2"), (b.SERVICE, "smollm2-http"),
                (b.SERVICE, "smollm2-metrics"), (b.PDB, "smollm2")]  # fmt: skip
    for kind, name in children:
        child = wait_for(lambda k=kind, n=name: kube.get(k, NS, n), what=f"{kind.kind}/{name}")
        refs = child["metadata"]["ownerReferences"]
        assert [(r["kind"], r["name"], r["uid"], r["controller"]) for r in refs] == [
            ("InferencePool", "smollm2", uid, True)
        ]
    assert kube.get(b.HPA, NS, "smollm2") is None  # autoscaling.mode defaults to none

    pool = wait_for(lambda: (p := kube.get(POOL, NS, "smollm2")) and p.get("status") and p, what="status")
    c = conditions(pool)
    assert c["Ready"] == ("False", "RollingOut")  # pods are not there yet
    assert c["Progressing"][0] == "True"
    assert pool["status"]["selector"] == "app.kubernetes.io/name=optimist,optimist.dev/pool=smollm2"
    assert pool["status"]["observedGeneration"] == pool["metadata"]["generation"]

    finish_rollout(kube, "smollm2")
    pool = wait_for(
        lambda: (p := kube.get(POOL, NS, "smollm2")) and conditions(p).get("Ready") == ("True", "Ready") and p,
        what="Ready",
    )
    assert pool["status"]["readyReplicas"] == 1 and pool["status"]["replicas"] == 1
    # kubectl reads the pool through its short name; events tell what happened
    got = kubectl.get("ipool", "smollm2")
    assert got["status"]["readyReplicas"] == 1
    events = json.loads(kubectl("get", "events", "-n", NS, "-o", "json").stdout)["items"]
    assert any(e.get("reason") == "Created" and e["involvedObject"]["name"] == "smollm2" for e in events), events


def test_spec_changes_and_scale_reach_the_deployment(kubectl: Kubectl, kube: Kube, start_operator: Any) -> None:
    start_operator()
    kubectl("apply", "--validate=false", "-f", str(EXAMPLES / "inferencepool.yaml"))
    dep = wait_for(lambda: kube.get(b.DEPLOYMENT, NS, "smollm2"), what="Deployment")
    dep_uid = dep["metadata"]["uid"]

    patch = {"spec": {"replicas": 3, "model": {"source": "pvc", "claimName": "models", "path": "llama.gguf"}}}
    kubectl("patch", "ipool", "smollm2", "--type", "merge", "-p", json.dumps(patch))
    dep = wait_for(
        lambda: (d := kube.get(b.DEPLOYMENT, NS, "smollm2")) and d["spec"]["replicas"] == 3 and d,
        what="replicas 3",
    )
    assert dep["metadata"]["uid"] == dep_uid  # patched, not recreated
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--model") + 1] == "/models/llama.gguf"
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"]["claimName"] == "models"

    # What HPA, KEDA and `kubectl scale` do: write the pool's /scale subresource.
    out = kubectl("scale", "ipool", "smollm2", "--replicas=5")
    assert "scaled" in out.stdout
    wait_for(lambda: kube.get(b.DEPLOYMENT, NS, "smollm2")["spec"]["replicas"] == 5, what="replicas 5")
    assert kube.get(b.DEPLOYMENT, NS, "smollm2")["metadata"]["uid"] == dep_uid

    # autoscaling on: an HPA appears targeting the pool; off again: it is pruned
    kubectl("patch", "ipool", "smollm2", "--type", "merge", "-p", '{"spec":{"autoscaling":{"mode":"hpa"}}}')
    hpa = wait_for(lambda: kube.get(b.HPA, NS, "smollm2"), what="HPA")
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "InferencePool"
    kubectl("patch", "ipool", "smollm2", "--type", "merge", "-p", '{"spec":{"autoscaling":{"mode":"none"}}}')
    wait_for(lambda: kube.get(b.HPA, NS, "smollm2") is None, what="HPA pruned")


def _versions(kube: Kube) -> dict[str, str]:
    found = {}
    for kind, name in [(b.DEPLOYMENT, "llama3-8b"), (b.SERVICE, "llama3-8b"), (b.SERVICE, "llama3-8b-http"),
                       (b.SERVICE, "llama3-8b-metrics"),
                       (b.HPA, "llama3-8b"), (b.PDB, "llama3-8b"), (b.SERVICE_MONITOR, "llama3-8b"),
                       (b.GATEWAY_POOL, "llama3-8b")]:  # fmt: skip
        obj = kube.get(kind, "serving", name)
        assert obj is not None, f"{kind.kind}/{name} missing"
        found[f"{kind.kind}/{name}"] = obj["metadata"]["resourceVersion"]
    return found


@pytest.mark.addons("prometheus-operator", "gateway-inference")
def test_full_example_and_operator_restart_changes_nothing(
    kubectl: Kubectl, kube: Kube, start_operator: Any, cluster: Any
) -> None:
    op = start_operator()
    kubectl("apply", "--validate=false", "-f", str(EXAMPLES / "inferencepool-full.yaml"))
    wait_for(lambda: kube.get(b.GATEWAY_POOL, "serving", "llama3-8b"), what="gateway pool")
    finish_rollout(kube, "llama3-8b", "serving")
    pool = wait_for(
        lambda: (p := kube.get(POOL, "serving", "llama3-8b")) and conditions(p).get("Ready", ("",))[0] == "True" and p,
        what="Ready",
    )
    c = conditions(pool)
    assert c["ScalingReady"] == ("True", "HPAReady") and c["GatewayReady"] == ("True", "InferencePoolReady")
    before = _versions(kube)
    status_before = pool["status"]
    op.stop()

    requests_before = len(cluster.cluster.log)
    start_operator()
    # the new operator lists the pool, resumes it and reads every child
    wait_for(
        lambda: sum(1 for r in cluster.cluster.log[requests_before:] if "/servicemonitors/llama3-8b" in r.url.path),
        what="the resumed reconcile",
    )
    time.sleep(1.0)
    assert _versions(kube) == before
    writes = [
        f"{r.method} {r.url.path}"
        for r in cluster.cluster.log[requests_before:]
        if str(r.method).upper() in ("POST", "PATCH", "PUT", "DELETE")
        and "/events" not in r.url.path
        and "/inferencepools/llama3-8b" not in r.url.path  # kopf's own bookkeeping annotations on the pool
    ]
    assert writes == []
    assert kube.get(POOL, "serving", "llama3-8b")["status"] == status_before


def test_missing_optional_crd_is_a_condition_not_a_crash(kubectl: Kubectl, kube: Kube, start_operator: Any) -> None:
    op = start_operator()
    kubectl("apply", "--validate=false", "-f", str(EXAMPLES / "inferencepool.yaml"))
    patch = {"spec": {"autoscaling": {"mode": "keda", "minReplicas": 0, "maxReplicas": 2}}}
    kubectl("patch", "ipool", "smollm2", "--type", "merge", "-p", json.dumps(patch))
    pool = wait_for(
        lambda: (p := kube.get(POOL, NS, "smollm2")) and conditions(p).get("ScalingReady", ("",))[0] == "False" and p,
        what="ScalingReady False",
    )
    c = conditions(pool)
    assert c["ScalingReady"] == ("False", "KEDANotInstalled")
    assert c["Degraded"] == ("True", "MissingCRD")
    assert "install KEDA" in next(x["message"] for x in pool["status"]["conditions"] if x["type"] == "Degraded")
    assert kube.get(b.DEPLOYMENT, NS, "smollm2") is not None  # the rest of the pool still runs
    assert op.thread.is_alive() and not op.errors


def test_invalid_pool_gets_invalid_spec_and_no_children(kubectl: Kubectl, kube: Kube, start_operator: Any) -> None:
    start_operator()
    # the emulated API server does not validate; the operator does it again rather than crash
    bad = {"apiVersion": "optimist.dev/v1alpha1", "kind": "InferencePool", "metadata": {"name": "bad", "namespace": NS},
           "spec": {"replicas": 1, "autoscaling": {"minReplicas": 4, "maxReplicas": 2}}}  # fmt: skip
    kube.create(POOL, NS, bad)
    pool = wait_for(lambda: (p := kube.get(POOL, NS, "bad")) and "Degraded" in conditions(p) and p, what="Degraded")
    assert conditions(pool)["Degraded"] == ("True", "InvalidSpec")
    message = next(x["message"] for x in pool["status"]["conditions"] if x["type"] == "Degraded")
    assert "minReplicas must not exceed maxReplicas" in message
    assert kube.get(b.DEPLOYMENT, NS, "bad") is None


def test_drift_is_repaired_and_other_namespaces_ignored(kubectl: Kubectl, kube: Kube, start_operator: Any) -> None:
    start_operator(namespaces=("team-a",), drift_interval_s=1.0)
    pool = json.loads(json.dumps(__import__("yaml").safe_load((EXAMPLES / "inferencepool.yaml").read_text())))
    pool["metadata"]["namespace"] = "team-a"
    kube.create(POOL, "team-a", pool)
    other = {**pool, "metadata": {"name": "elsewhere", "namespace": NS}}
    kube.create(POOL, NS, other)
    dep = wait_for(lambda: kube.get(b.DEPLOYMENT, "team-a", "smollm2"), what="Deployment in team-a")
    # someone edits the Deployment by hand: the drift timer puts it back
    tampered = dep["spec"]["template"]["spec"]["containers"][0]
    kube.merge_patch(
        b.DEPLOYMENT,
        "team-a",
        "smollm2",
        {
            "spec": {
                "replicas": 7,
                "template": {
                    "spec": {
                        "containers": [
                            {**tampered, "image": "evil:latest"},
                            dep["spec"]["template"]["spec"]["containers"][1],
                        ]
                    }
                },
            }
        },
    )
    wait_for(
        lambda: (d := kube.get(b.DEPLOYMENT, "team-a", "smollm2"))["spec"]["replicas"] == 1
        and d["spec"]["template"]["spec"]["containers"][0]["image"] != "evil:latest",
        what="drift repaired",
    )  # fmt: skip
    assert kube.get(b.DEPLOYMENT, NS, "elsewhere") is None
