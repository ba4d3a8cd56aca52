"""`optimist operator`: the kopf runtime around the reconcile.

Handlers: create, spec update and resume of an InferencePool, plus a drift timer, all run the same idempotent
reconcile; events on the pools' Deployments refresh the pool status (replicas, conditions). Handler progress is kept
in annotations under optimist.dev, so the status holds only what users read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Collection
from typing import Any

import kopf

from . import builders as b
from .crd import GROUP, PLURAL, VERSION
from .kube import Kube, KubeError, load_client
from .reconcile import POOL, failed_status, reconcile, refresh_status

log = logging.getLogger("optimist.operator")


def build_registry(
    kube_factory: Any, drift_interval_s: float = 60.0, kubeconfig: str | None = None, namespaced: bool = False
) -> kopf.OperatorRegistry:
    """The operator's handlers. `kube_factory()` returns the Kube client (called once, at start-up);
    kopf itself logs in with `kubeconfig` when given, else in-cluster credentials, else `$KUBECONFIG`."""
    registry = kopf.OperatorRegistry()
    state: dict[str, Kube] = {}

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        if kubeconfig:
            os.environ["KUBECONFIG"] = kubeconfig  # kopf's kubeconfig reader looks here at call time
            return kopf.login_with_kubeconfig(**kwargs)
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    def kube() -> Kube:
        if "kube" not in state:
            state["kube"] = kube_factory()
        return state["kube"]

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
        settings.peering.standalone = True
        settings.posting.level = logging.INFO
        settings.watching.server_timeout = 300
        settings.watching.inactivity_timeout = 330
        # Watching named namespaces needs no namespace listing (and no cluster-wide RBAC to list them).
        settings.scanning.disabled = namespaced
        kube()

    def run(body: kopf.Body, logger: logging.Logger | logging.LoggerAdapter[Any], why: str) -> None:
        pool = {"metadata": dict(body.metadata), "spec": dict(body.spec), "status": dict(body.status)}
        pool = _plain(pool)
        try:
            result = reconcile(kube(), pool)
        except KubeError as exc:
            logger.error(f"reconcile ({why}) failed: {exc}")
            kopf.warn(body, reason="ReconcileFailed", message=str(exc))
            with contextlib.suppress(KubeError):
                failed_status(kube(), pool, str(exc))
            raise kopf.TemporaryError(str(exc), delay=15) from exc
        for etype, reason, message in result.events:
            kopf.event(body, type=etype, reason=reason, message=message)
        if result.actions:
            logger.info(f"reconcile ({why}): {', '.join(result.actions)}")

    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    def on_create(body: kopf.Body, logger: Any, **_: Any) -> None:
        run(body, logger, "created")

    @kopf.on.update(GROUP, VERSION, PLURAL, field="spec", registry=registry)
    def on_update(body: kopf.Body, logger: Any, **_: Any) -> None:
        run(body, logger, "spec changed")

    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
    def on_resume(body: kopf.Body, logger: Any, **_: Any) -> None:
        run(body, logger, "resumed")

    @kopf.timer(GROUP, VERSION, PLURAL, interval=drift_interval_s, initial_delay=drift_interval_s, registry=registry)
    def on_drift(body: kopf.Body, logger: Any, **_: Any) -> None:
        run(body, logger, "drift check")

    @kopf.on.event(
        "apps", "v1", "deployments", labels={"app.kubernetes.io/managed-by": b.MANAGED_BY}, registry=registry
    )
    def on_deployment(body: kopf.Body, type: str | None, logger: Any, **_: Any) -> None:
        owner = next((ref for ref in body.metadata.get("ownerReferences", []) if ref.get("kind") == POOL.kind), None)
        if owner is None or type == "DELETED":
            return
        pool = kube().get(POOL, body.metadata.namespace or "", owner["name"])
        if pool is None:
            return
        try:
            if refresh_status(kube(), pool):
                logger.debug(f"status of {owner['name']} refreshed from its Deployment")
        except KubeError as exc:
            logger.warning(f"status refresh of {owner['name']} failed: {exc}")

    return registry


def _plain(value: Any) -> Any:
    """kopf's body views as plain dicts and lists."""
    if isinstance(value, dict) or (hasattr(value, "items") and not isinstance(value, list | str)):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


async def serve(
    kube_factory: Any,
    kubeconfig: str | None = None,
    namespaces: Collection[str] = (),
    liveness: str | None = None,
    drift_interval_s: float = 60.0,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
) -> None:
    """Run the operator until stopped: cluster-wide unless namespaces are named."""
    registry = build_registry(kube_factory, drift_interval_s, kubeconfig, namespaced=bool(namespaces))
    await kopf.operator(
        registry=registry,
        clusterwide=not namespaces,
        namespaces=list(namespaces),
        liveness_endpoint=liveness,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
        standalone=True,
    )


def main(kubeconfig: str | None, namespaces: list[str], liveness: str | None, drift_interval_s: float) -> int:
    """Entry point of `optimist operator`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        client = load_client(kubeconfig)  # fail now, with a reason, rather than inside kopf's retries
    except Exception as exc:
        where = kubeconfig or "in-cluster service account or $KUBECONFIG"
        raise RuntimeError(f"cannot load Kubernetes credentials from {where}: {exc}") from exc

    def factory() -> Kube:
        return Kube(client)

    asyncio.run(serve(factory, kubeconfig, namespaces, liveness, drift_interval_s))
    return 0
