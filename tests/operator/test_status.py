"""Status from the Deployment and the reconcile outcome: Ready is never true mid-rollout."""

from __future__ import annotations

import datetime
from typing import Any

from optimist.operator.crd import defaulted_spec
from optimist.operator.status import Outcome, build_status, status_changed

from .conftest import load_example, with_identity

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
T1 = T0 + datetime.timedelta(minutes=5)


def deployment(generation: int = 1, observed: int = 1, **status: int) -> dict[str, Any]:
    return {"metadata": {"generation": generation}, "status": {"observedGeneration": observed, **status}}


def conds(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


POOL = with_identity(load_example("inferencepool.yaml"))
POOL["spec"]["replicas"] = 2
SPEC = defaulted_spec(POOL)
DONE = {"replicas": 2, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2}


def test_ready_after_the_rollout_finished() -> None:
    st = build_status(POOL, SPEC, deployment(**DONE), Outcome(), T0)
    c = conds(st)
    assert c["Ready"] == ("True", "Ready")
    assert c["Available"] == ("True", "ReplicasReady")
    assert c["Progressing"] == ("False", "RolloutComplete")
    assert c["ScalingReady"] == ("True", "Manual")
    assert c["Degraded"] == ("False", "AsExpected")
    assert "GatewayReady" not in c
    assert (st["replicas"], st["readyReplicas"], st["observedGeneration"]) == (2, 2, 1)
    assert st["selector"] == "app.kubernetes.io/name=optimist,optimist.dev/pool=smollm2"
    assert all(x["lastTransitionTime"] == "2026-01-01T00:00:00Z" for x in st["conditions"])


def test_never_ready_mid_rollout() -> None:
    mid_rollouts = [
        deployment(generation=2, observed=1, **DONE),  # controller has not seen the new template
        deployment(replicas=3, updatedReplicas=1, readyReplicas=2, availableReplicas=2),  # old pods still there
        deployment(replicas=2, updatedReplicas=2, readyReplicas=1, availableReplicas=1),  # new pod not ready
        None,
    ]
    for dep in mid_rollouts:
        c = conds(build_status(POOL, SPEC, dep, Outcome(), T0))
        assert c["Ready"][0] == "False", dep
        assert c["Progressing"] == ("True", "RollingOut"), dep
    # still serving from the old replicas while rolling out: available but not ready
    c = conds(build_status(POOL, SPEC, mid_rollouts[1], Outcome(), T0))
    assert c["Available"][0] == "True" and c["Ready"] == ("False", "RollingOut")


def test_failures_are_degraded_with_a_reason() -> None:
    c = conds(build_status(POOL, SPEC, deployment(**DONE), Outcome(invalid="spec.replicas: bad"), T0))
    assert c["Degraded"] == ("True", "InvalidSpec") and c["Ready"] == ("False", "InvalidSpec")
    missing = Outcome(missing=["needs KEDA"], scaling=(False, "KEDANotInstalled", "install KEDA"))
    c = conds(build_status(POOL, SPEC, deployment(**DONE), missing, T0))
    assert c["Degraded"] == ("True", "MissingCRD")
    assert c["ScalingReady"] == ("False", "KEDANotInstalled")
    assert c["Ready"][0] == "False"
    stuck = deployment(replicas=2, updatedReplicas=1, readyReplicas=1, availableReplicas=1)
    stuck["status"]["conditions"] = [
        {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "too slow"}
    ]
    c = conds(build_status(POOL, SPEC, stuck, Outcome(), T0))
    assert c["Degraded"] == ("True", "ProgressDeadlineExceeded")
    assert c["Progressing"] == ("False", "ProgressDeadlineExceeded")


def test_scaled_to_zero_is_not_available() -> None:
    pool = {**POOL, "spec": {**POOL["spec"], "replicas": 0}}
    st = build_status(pool, defaulted_spec(pool), deployment(), Outcome(), T0)
    assert conds(st)["Available"] == ("False", "ScaledToZero")
    assert conds(st)["Ready"][0] == "False"


def test_transition_times_kept_while_status_holds() -> None:
    first = build_status(POOL, SPEC, deployment(**DONE), Outcome(), T0)
    pool = {**POOL, "status": first}
    again = build_status(pool, SPEC, deployment(**DONE), Outcome(), T1)
    assert again == first
    assert not status_changed(first, again)
    flipped = build_status(pool, SPEC, deployment(replicas=2, updatedReplicas=2), Outcome(), T1)
    times = {c["type"]: c["lastTransitionTime"] for c in flipped["conditions"]}
    assert times["Ready"] == "2026-01-01T00:05:00Z"  # changed
    assert times["ScalingReady"] == "2026-01-01T00:00:00Z"  # unchanged
    assert status_changed(first, flipped)
