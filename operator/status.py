"""The pool's status from its Deployment and the reconcile outcome: a pure function, tested without a cluster.

Conditions: Ready (everything below fine and the rollout finished: never true mid-rollout), Available (at least
one replica serves), Progressing (a rollout is under way), ScalingReady (the autoscaler the spec asks for exists),
GatewayReady (only when a gateway is asked for), Degraded (with the reason of a failure).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

from .builders import model_description, selector_string

Manifest = dict[str, Any]


@dataclass
class Outcome:
    """What a reconcile found besides the Deployment."""

    invalid: str = ""  # the spec is invalid: why
    error: str = ""  # applying the children failed: why
    scaling: tuple[bool, str, str] = (True, "Manual", "autoscaling.mode is none")
    gateway: tuple[bool, str, str] | None = None
    missing: list[str] = field(default_factory=list)  # optional CRDs the spec needs that the cluster lacks


def rollout_state(deployment: Manifest | None, desired: int) -> tuple[bool, int, int, int, str]:
    """(finished, replicas, ready, updated, why-not) of a Deployment against the desired replica count."""
    if deployment is None:
        return False, 0, 0, 0, "the Deployment does not exist yet"
    st = deployment.get("status") or {}
    replicas, ready = st.get("replicas", 0), st.get("readyReplicas", 0)
    updated, available = st.get("updatedReplicas", 0), st.get("availableReplicas", 0)
    generation = deployment.get("metadata", {}).get("generation", 0)
    if st.get("observedGeneration", 0) < generation:
        return False, replicas, ready, updated, "the Deployment controller has not seen the latest spec"
    if updated < desired:
        return False, replicas, ready, updated, f"{updated} of {desired} replicas updated"
    if replicas > updated:
        return False, replicas, ready, updated, f"{replicas - updated} old replicas pending termination"
    if available < desired:
        return False, replicas, ready, updated, f"{available} of {desired} updated replicas available"
    return True, replicas, ready, updated, ""


def _deadline_exceeded(deployment: Manifest | None) -> str:
    for cond in ((deployment or {}).get("status") or {}).get("conditions", []):
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return str(cond.get("message", "the rollout exceeded its progress deadline"))
    return ""


def _condition(ctype: str, ok: bool, reason: str, message: str) -> Manifest:
    return {"type": ctype, "status": "True" if ok else "False", "reason": reason, "message": message}


def build_status(
    pool: Manifest, spec: Manifest, deployment: Manifest | None, outcome: Outcome, now: datetime.datetime | None = None
) -> Manifest:
    name, desired = pool["metadata"]["name"], spec["replicas"]
    finished, replicas, ready, updated, why = rollout_state(deployment, desired)
    deadline = _deadline_exceeded(deployment)

    if desired == 0:
        available = _condition("Available", False, "ScaledToZero", "spec.replicas is 0")
    elif ready > 0:
        available = _condition("Available", True, "ReplicasReady", f"{ready} of {desired} replicas ready")
    else:
        available = _condition("Available", False, "NoReplicaReady", f"0 of {desired} replicas ready")
    if finished:
        progressing = _condition("Progressing", False, "RolloutComplete", f"{updated} replicas up to date")
    elif deadline:
        progressing = _condition("Progressing", False, "ProgressDeadlineExceeded", deadline)
    else:
        progressing = _condition("Progressing", True, "RollingOut", why)
    scaling = _condition("ScalingReady", *outcome.scaling)
    conditions = [available, progressing, scaling]
    if outcome.gateway is not None:
        conditions.append(_condition("GatewayReady", *outcome.gateway))

    problem = next(
        (
            (reason, msg)
            for reason, msg in (
                ("InvalidSpec", outcome.invalid),
                ("ReconcileFailed", outcome.error),
                ("MissingCRD", "; ".join(outcome.missing)),
                ("ProgressDeadlineExceeded", deadline),
            )
            if msg
        ),
        None,
    )
    if problem is None:
        conditions.append(_condition("Degraded", False, "AsExpected", "no failures"))
    else:
        conditions.append(_condition("Degraded", True, *problem))

    blocker = next(
        (c for c in conditions if c["type"] != "Degraded" and c["status"] != "True" and c["type"] != "Progressing"),
        None,
    )
    if problem is not None:
        ready_cond = _condition("Ready", False, problem[0], problem[1])
    elif not finished:
        ready_cond = _condition("Ready", False, "RollingOut", why)
    elif blocker is not None:
        ready_cond = _condition("Ready", False, blocker["reason"], blocker["message"])
    else:
        ready_cond = _condition("Ready", True, "Ready", f"{ready} of {desired} replicas serving")
    conditions.insert(0, ready_cond)

    stamp = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    previous = {c.get("type"): c for c in (pool.get("status") or {}).get("conditions", [])}
    for cond in conditions:
        old = previous.get(cond["type"])
        same = old is not None and old.get("status") == cond["status"] and "lastTransitionTime" in old
        cond["lastTransitionTime"] = old["lastTransitionTime"] if same and old else stamp
        cond["observedGeneration"] = pool["metadata"].get("generation", 0)
    return {
        "observedGeneration": pool["metadata"].get("generation", 0),
        "replicas": replicas,
        "readyReplicas": ready,
        "updatedReplicas": updated,
        "selector": selector_string(name),
        "model": model_description(spec) if not outcome.invalid else "",
        "conditions": conditions,
    }


def status_changed(old: Manifest | None, new: Manifest) -> bool:
    """Whether writing `new` would change anything a user sees (transition times alone do not count)."""

    def strip(st: Manifest | None) -> Manifest:
        st = dict(st or {})
        st["conditions"] = [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in st.get("conditions", [])]
        return st

    return strip(old) != strip({**(old or {}), **new})
