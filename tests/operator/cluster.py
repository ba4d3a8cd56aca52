"""A Kubernetes API for the end-to-end tests: kmock's emulator over real HTTP, with what the operator, kopf and
kubectl need from a real API server filled in here (the Kubernetes API itself cannot run on this machine).

Added on top of kmock: uid/resourceVersion/generation/creationTimestamp stamping, generateName, `kind` on lists,
the status subresource writing only status (and the main resource ignoring status), the scale subresource
(autoscaling/v1 Scale), PUT as a replace.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import threading
import uuid
from pathlib import Path
from typing import Any

import attrs
import kmock
from kmock._internal import enums

from optimist.operator.crd import SHORT_NAMES

RESOURCES = {
    # plural path: (kind, namespaced, subresources, short names)
    "v1/namespaces": ("Namespace", False, (), ("ns",)),
    "v1/events": ("Event", True, (), ("ev",)),
    "v1/services": ("Service", True, (), ("svc",)),
    "apps/v1/deployments": ("Deployment", True, ("status", "scale"), ("deploy",)),
    "autoscaling/v2/horizontalpodautoscalers": ("HorizontalPodAutoscaler", True, ("status",), ("hpa",)),
    "policy/v1/poddisruptionbudgets": ("PodDisruptionBudget", True, ("status",), ("pdb",)),
    "optimist.dev/v1alpha1/inferencepools": ("InferencePool", True, ("status", "scale"), tuple(SHORT_NAMES)),
}
ADDONS = {
    "keda": {"keda.sh/v1alpha1/scaledobjects": ("ScaledObject", True, ("status",), ("so",))},
    "prometheus-operator": {"monitoring.coreos.com/v1/servicemonitors": ("ServiceMonitor", True, (), ())},
    "gateway-inference": {
        "inference.networking.k8s.io/v1/inferencepools": ("InferencePool", True, ("status",), ("infpool",))
    },
}


@attrs.define(kw_only=True)
class Cluster(kmock.KubernetesEmulator):
    _versions: Any = attrs.field(factory=lambda: itertools.count(1000), init=False)
    _kinds: dict[Any, tuple[str, str]] = attrs.field(factory=dict, init=False)
    _with_status: set[Any] = attrs.field(factory=set, init=False)

    def declare(
        self, path: str, kind: str, namespaced: bool, subresources: tuple[str, ...], shortnames: tuple[str, ...] = ()
    ) -> None:
        self.resources[path] = kmock.ResourceInfo(
            kind=kind,
            namespaced=namespaced,
            subresources=set(subresources),
            shortnames=set(shortnames),
            singular=kind.lower(),
            verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
        )
        res = kmock.resource(path)
        group, _, version = path.rpartition("/")[0].rpartition("/")
        self._kinds[res] = (kind, f"{group}/{version}" if group else version)
        if "status" in subresources:
            self._with_status.add(res)

    def _key(self, request: kmock.Request) -> Any:
        return (request.resource, request.namespace, request.name)

    def _now(self) -> str:
        return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    @property
    def log(self) -> list[kmock.Request]:
        """Every request served so far (a snapshot)."""
        return list(self._requests)

    def _replace(self, old: kmock.Request, **changes: Any) -> kmock.Request:
        """A changed copy of a request, standing in for it in the request log (kmock's filters look there)."""
        new = attrs.evolve(old, **changes)
        for i, seen in enumerate(self._requests):
            if seen is old:
                self._requests[i] = new
        return new

    async def _handle(self, request: kmock.Request) -> Any:
        if request.resource is None:
            return await super()._handle(request)
        if request.subresource == "scale" and request.name is not None:
            return await self._scale(request)
        if request.method == enums.method.PUT and request.name is not None:
            request = self._replace(request, action=enums.action.UPDATE)
        if request.action == enums.action.CREATE:
            request = self._replace(request, data=self._stamp_new(request))
        elif request.action == enums.action.UPDATE and request.name is not None:
            request = self._replace(request, data=self._stamp_update(request))
        return await super()._handle(request)

    def _stamp_new(self, request: kmock.Request) -> dict[str, Any]:
        data = _plain(request.data)
        meta = data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if request.namespace and self._kinds.get(request.resource, ("", ""))[0] != "Namespace":
            meta.setdefault("namespace", request.namespace)
        meta.update(
            uid=str(uuid.uuid4()),
            resourceVersion=str(next(self._versions)),
            generation=1,
            creationTimestamp=self._now(),
        )
        kind, api_version = self._kinds.get(request.resource, (data.get("kind"), data.get("apiVersion")))
        data.setdefault("kind", kind)
        data.setdefault("apiVersion", api_version)
        return data

    def _stamp_update(self, request: kmock.Request) -> dict[str, Any]:
        data = _plain(request.data) or {}
        key = self._key(request)
        current = self.objects[key] if key in self.objects else None  # noqa: SIM401 (no .get on kmock's array)
        live = current.raw if current is not None and not current.deleted else {}
        if isinstance(data, list):  # RFC 6902 JSON patch (kopf uses it): as the merge patch giving the same result
            data = _merge_diff(live, _json_patch(live, data))
        if request.subresource == "status":
            data = {"status": data.get("status")}
        elif request.resource in self._with_status:
            data.pop("status", None)
        meta = data.setdefault("metadata", {}) or {}
        data["metadata"] = meta
        meta.pop("uid", None)
        meta.pop("creationTimestamp", None)
        meta["resourceVersion"] = str(next(self._versions))
        if "spec" in data and request.subresource != "status":
            merged = _merged(live.get("spec", {}), data["spec"])
            if merged != live.get("spec", {}):
                meta["generation"] = live.get("metadata", {}).get("generation", 1) + 1
        return data

    async def _scale(self, request: kmock.Request) -> Any:
        """autoscaling/v1 Scale of a resource, as HPA, KEDA and `kubectl scale` use it."""
        if request.method in (enums.method.PATCH, enums.method.PUT):
            replicas = (request.data or {}).get("spec", {}).get("replicas")
            patch = self._replace(
                request,
                subresource=None,
                action=enums.action.UPDATE,
                method=enums.method.PATCH,
                data={"spec": {"replicas": replicas}},
            )
            patch = self._replace(patch, data=self._stamp_update(patch))
            await super()._handle(patch)
        obj = self.objects[self._key(request)].raw
        return await self._render_payload(
            request,
            {
                "apiVersion": "autoscaling/v1",
                "kind": "Scale",
                "metadata": {k: obj["metadata"].get(k) for k in ("name", "namespace", "uid", "resourceVersion")},
                "spec": {"replicas": obj.get("spec", {}).get("replicas", 0)},
                "status": {
                    "replicas": obj.get("status", {}).get("replicas", 0),
                    "selector": obj.get("status", {}).get("selector", ""),
                },
            },
        )

    async def _render_payload(self, request: kmock.Request, payload: dict[str, Any]) -> Any:
        import aiohttp.web

        return aiohttp.web.json_response(payload)

    async def _serve_version(self, request: kmock.Request) -> Any:
        result = await super()._serve_version(request)
        result["groupVersion"] = result["groupVersion"].lstrip("/")  # the core group is "v1", not "/v1"
        for res in result["resources"]:
            if res["name"].endswith("/scale"):
                res.update(kind="Scale", group="autoscaling", version="v1", shortNames=[], categories=[])
            elif "/" in res["name"]:
                res.update(shortNames=[], categories=[])
        return result

    async def _serve_list(self, request: kmock.Request) -> Any:
        result = await super()._serve_list(request)
        kind, api_version = self._kinds.get(request.resource, ("", ""))
        return {"kind": f"{kind}List", "apiVersion": api_version, **result}


def _plain(value: Any) -> Any:
    """kmock's request data as plain JSON values."""
    return json.loads(json.dumps(value, default=dict)) if value is not None else None


def _json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    doc = json.loads(json.dumps(doc))
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent.setdefault(p, {})
        last = parts[-1]
        if op["op"] in ("add", "replace"):
            if isinstance(parent, list):
                idx = len(parent) if last == "-" else int(last)
                if op["op"] == "add":
                    parent.insert(idx, op["value"])
                else:
                    parent[idx] = op["value"]
            else:
                parent[last] = op["value"]
        elif op["op"] == "remove":
            if isinstance(parent, list):
                parent.pop(int(last))
            else:
                parent.pop(last, None)
        elif op["op"] == "test":
            pass
        else:
            raise ValueError(f"unsupported JSON patch op {op['op']!r}")
    return doc


def _merge_diff(old: Any, new: Any) -> Any:
    """The merge patch turning `old` into `new`."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    out: dict[str, Any] = {k: None for k in old if k not in new}
    for k, v in new.items():
        if k not in old or old[k] != v:
            out[k] = _merge_diff(old.get(k), v)
    return out


def _merged(base: Any, patch: Any) -> Any:
    if not isinstance(base, dict) or not isinstance(patch, dict):
        return patch
    out = dict(base)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merged(base.get(k), v)
    return out


class ClusterThread:
    """The emulator on a real port, in its own thread and event loop, with a kubeconfig pointing at it."""

    def __init__(self, folder: Path, addons: tuple[str, ...] = ()) -> None:
        self.folder = folder
        self.addons = addons
        self.kubeconfig = folder / "kubeconfig"
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.cluster: Cluster | None = None
        self.url = ""
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with Cluster() as cluster, kmock.Server(cluster) as server:
            for path, spec in RESOURCES.items():
                cluster.declare(path, *spec)
            for addon in self.addons:
                for path, spec in ADDONS[addon].items():
                    cluster.declare(path, *spec)
            self.cluster = cluster
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def start(self) -> ClusterThread:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the emulated cluster did not start")
        self.kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
                    "users": [{"name": "test", "user": {"token": "test-token"}}],
                    "contexts": [
                        {"name": "kmock", "context": {"cluster": "kmock", "user": "test", "namespace": "default"}}
                    ],
                    "current-context": "kmock",
                }
            )
        )
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
