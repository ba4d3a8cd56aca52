"""One idempotent reconcile: desired = build(pool); create what is missing, patch what drifted, prune what the spec
no longer asks for, then write the status. Running it twice in a row writes nothing the second time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from . import builders as b
from .crd import API_VERSION, KIND, PLURAL, defaulted_spec
from .kube import Kube, KubeError
from .status import Outcome, build_status, status_changed
from .validation import validation_errors

Manifest = dict[str, Any]
log = logging.getLogger("optimist.operator")

POOL = b.Kind(API_VERSION, KIND, PLURAL)
# Pod-spec fields the builder sets only when asked: a merge patch must remove them when the pool drops them.
OPTIONAL_POD_FIELDS = ("nodeSelector", "affinity", "runtimeClassName", "priorityClassName", "imagePullSecrets")
_ADDON = {
    b.SCALED_OBJECT.kind: ("KEDA", "spec.autoscaling.mode is keda"),
    b.SERVICE_MONITOR.kind: ("the Prometheus Operator", "spec.monitoring.serviceMonitor is true"),
    b.GATEWAY_POOL.kind: ("the Gateway API Inference Extension", "spec.gateway.enabled is true"),
}


def is_subset(desired: Any, live: Any) -> bool:
    """Whether `live` already has everything `desired` says (the server may add defaults; quantities may be
    returned as strings)."""
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(k in live and is_subset(v, live[k]) for k, v in desired.items())
    if isinstance(desired, list):
        return (
            isinstance(live, list)
            and len(live) == len(desired)
            and all(is_subset(d, lv) for d, lv in zip(desired, live, strict=True))
        )
    if isinstance(desired, bool) or isinstance(live, bool):
        return desired is live
    if (isinstance(desired, int | float) and isinstance(live, str)) or (
        isinstance(desired, str) and isinstance(live, int | float)
    ):
        return str(desired) == str(live)
    return bool(desired == live)


def _patch_body(child: Manifest) -> Manifest:
    body = {k: v for k, v in child.items() if k != "status"}
    if child["kind"] == "Deployment":
        pod = dict(body["spec"]["template"]["spec"])
        for key in OPTIONAL_POD_FIELDS:
            pod.setdefault(key, None)  # merge patch: null deletes
        body = {**body, "spec": {**body["spec"], "template": {**body["spec"]["template"], "spec": pod}}}
    return body


@dataclass
class Result:
    actions: list[str] = field(default_factory=list)  # "created Deployment/x", "patched Service/x", ...
    deployment: Manifest | None = None
    status: Manifest | None = None
    status_written: bool = False
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)


def apply_child(kube: Kube, child: Manifest) -> tuple[str, Manifest]:
    """Create or patch one child; returns (what was done, the live object)."""
    kind, meta = b.kind_of(child), child["metadata"]
    live = kube.get(kind, meta["namespace"], meta["name"])
    if live is None:
        try:
            return "created", kube.create(kind, meta["namespace"], child)
        except KubeError as exc:
            if exc.status != 409:  # someone created it in between: fall through to patching
                raise
            live = kube.get(kind, meta["namespace"], meta["name"])
    if live is not None and is_subset(child, live):
        return "unchanged", live
    return "patched", kube.merge_patch(kind, meta["namespace"], meta["name"], _patch_body(child))


def _owned_by(obj: Manifest, pool: Manifest) -> bool:
    uid = pool["metadata"].get("uid")
    return any(ref.get("uid") == uid for ref in obj.get("metadata", {}).get("ownerReferences", []))


def reconcile(kube: Kube, pool: Manifest) -> Result:
    """Bring the pool's children and status to what its spec says. Raises KubeError when the API fails."""
    result = Result()
    meta = pool["metadata"]
    ns, name = meta["namespace"], meta["name"]
    errors = validation_errors(pool)
    spec = defaulted_spec(pool)
    outcome = Outcome()
    if errors:
        outcome.invalid = "; ".join(errors)
        result.events.append(("Warning", "InvalidSpec", outcome.invalid))
        result.deployment = kube.get(b.DEPLOYMENT, ns, name)
    else:
        desired = b.build_children(pool)
        wanted = {(c["kind"], c["metadata"]["name"]) for c in desired}
        for child in desired:
            kind = b.kind_of(child)
            if kind.optional and not kube.served(kind):
                addon, why = _ADDON[kind.kind]
                outcome.missing.append(
                    f"{why} but the cluster does not serve {kind.api_version} {kind.kind}: install {addon}"
                )
                continue
            before = kube.get(b.DEPLOYMENT, ns, name) if kind is b.DEPLOYMENT else None
            action, live = apply_child(kube, child)
            if action != "unchanged":
                result.actions.append(f"{action} {kind.kind}/{child['metadata']['name']}")
            if kind is b.DEPLOYMENT:
                result.deployment = live
                result.events += _deployment_events(before, child)
        result.actions += _prune(kube, pool, wanted)
        _set_addon_conditions(spec, outcome)
    status = build_status(pool, spec, result.deployment, outcome)
    result.status = status
    if status_changed(pool.get("status"), status):
        kube.merge_patch(POOL, ns, name, {"status": status}, sub="status")
        result.status_written = True
    return result


def _deployment_events(before: Manifest | None, child: Manifest) -> list[tuple[str, str, str]]:
    if before is None:
        return [("Normal", "Created", f"Deployment {child['metadata']['name']} created")]
    events = []
    old_replicas, new_replicas = before.get("spec", {}).get("replicas"), child["spec"]["replicas"]
    if old_replicas != new_replicas:
        events.append(("Normal", "Scaled", f"replicas {old_replicas} -> {new_replicas}"))
    if not is_subset(child["spec"]["template"], before.get("spec", {}).get("template", {})):
        events.append(("Normal", "RollingOut", "the pod template changed; rolling out new replicas"))
    return events


def _set_addon_conditions(spec: Manifest, outcome: Outcome) -> None:
    mode = spec["autoscaling"]["mode"]
    missing = " ".join(outcome.missing)
    if mode == "keda":
        outcome.scaling = (
            (False, "KEDANotInstalled", "the cluster does not serve keda.sh/v1alpha1 ScaledObject: install KEDA")
            if "ScaledObject" in missing
            else (True, "ScaledObjectReady", "KEDA scales the pool through /scale")
        )
    elif mode == "hpa":
        outcome.scaling = (True, "HPAReady", "a HorizontalPodAutoscaler scales the pool through /scale")
    if spec["gateway"]["enabled"]:
        outcome.gateway = (
            (False, "GatewayAPINotInstalled", "the cluster does not serve inference.networking.k8s.io/v1 InferencePool")
            if "inference.networking.k8s.io" in missing
            else (True, "InferencePoolReady", "a Gateway API InferencePool selects the pool's pods")
        )


def _prune(kube: Kube, pool: Manifest, wanted: set[tuple[str, str]]) -> list[str]:
    """Delete children this pool owns that its spec no longer asks for (e.g. the HPA after mode: none)."""
    ns, name = pool["metadata"]["namespace"], pool["metadata"]["name"]
    removed = []
    for kind in (b.HPA, b.SCALED_OBJECT, b.PDB, b.SERVICE_MONITOR, b.GATEWAY_POOL):
        if (kind.kind, name) in wanted or (kind.optional and not kube.served(kind)):
            continue
        live = kube.get(kind, ns, name)
        if live is not None and _owned_by(live, pool):
            kube.request("DELETE", kube.path(kind, ns, name))
            removed.append(f"deleted {kind.kind}/{name}")
    return removed


def refresh_status(kube: Kube, pool: Manifest) -> bool:
    """Recompute the status after the Deployment changed (no children written). Returns whether it was written."""
    ns, name = pool["metadata"]["namespace"], pool["metadata"]["name"]
    errors = validation_errors(pool)
    if errors:
        return False  # the reconcile owns the InvalidSpec status
    spec = defaulted_spec(pool)
    outcome = Outcome()
    # keep what the last reconcile learned about add-ons and failures
    previous = {c.get("type"): c for c in (pool.get("status") or {}).get("conditions", [])}
    for ctype, attr in (("ScalingReady", "scaling"), ("GatewayReady", "gateway")):
        if ctype in previous:
            c = previous[ctype]
            setattr(outcome, attr, (c.get("status") == "True", c.get("reason", ""), c.get("message", "")))
    degraded = previous.get("Degraded", {})
    if degraded.get("status") == "True" and degraded.get("reason") == "MissingCRD":
        outcome.missing = [degraded.get("message", "")]
    elif degraded.get("status") == "True" and degraded.get("reason") == "ReconcileFailed":
        outcome.error = degraded.get("message", "")
    status = build_status(pool, spec, kube.get(b.DEPLOYMENT, ns, name), outcome)
    if not status_changed(pool.get("status"), status):
        return False
    kube.merge_patch(POOL, ns, name, {"status": status}, sub="status")
    return True


def failed_status(kube: Kube, pool: Manifest, error: str) -> None:
    """Record a failed reconcile (the API refused something) as Degraded/ReconcileFailed."""
    spec = defaulted_spec(pool)
    outcome = Outcome(error=error)
    try:
        deployment = kube.get(b.DEPLOYMENT, pool["metadata"]["namespace"], pool["metadata"]["name"])
    except KubeError:
        deployment = None
    status = build_status(pool, spec, deployment, outcome)
    if status_changed(pool.get("status"), status):
        kube.merge_patch(
            POOL, pool["metadata"]["namespace"], pool["metadata"]["name"], {"status": status}, sub="status"
        )
