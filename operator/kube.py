"""A small generic Kubernetes API client for the operator: get, create, merge-patch and discovery for any kind.

Built on the official client's transport (credentials from `$KUBECONFIG`/a given file, or in-cluster), but speaking
plain JSON so one code path serves Deployments, custom resources and add-on CRDs alike.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import kubernetes

from .builders import Kind

Manifest = dict[str, Any]


class KubeError(RuntimeError):
    """An API request failed; the message carries the method, path, status and the server's reason."""

    def __init__(self, method: str, path: str, status: int, message: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {message}")
        self.status = status


def load_client(kubeconfig: str | None = None) -> kubernetes.client.ApiClient:
    """Credentials from the given kubeconfig, else in-cluster when running in a pod, else `$KUBECONFIG`/~/.kube."""
    config = kubernetes.client.Configuration()
    if kubeconfig:
        kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=config)
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        kubernetes.config.load_incluster_config(client_configuration=config)
    else:
        path = os.environ.get("KUBECONFIG", os.path.expanduser("~/.kube/config")).split(os.pathsep)[0]
        kubernetes.config.load_kube_config(config_file=path, client_configuration=config)
    return kubernetes.client.ApiClient(config)


class Kube:
    def __init__(self, client: kubernetes.client.ApiClient, discovery_ttl_s: float = 60.0) -> None:
        self.client = client
        self.discovery_ttl_s = discovery_ttl_s
        self._discovery: dict[str, tuple[float, set[str]]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def path(kind: Kind, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
        base = f"/api/{kind.version}" if not kind.group else f"/apis/{kind.api_version}"
        parts = [base]
        if namespace:
            parts += ["namespaces", namespace]
        parts.append(kind.plural)
        if name:
            parts.append(name)
        if sub:
            parts.append(sub)
        return "/".join(parts)

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        _, url, headers, payload, _ = self.client.param_serialize(
            method=method, resource_path=path, header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        response = self.client.call_api(method, url, header_params=headers, body=payload, _request_timeout=30)
        data = response.read()
        text = data.decode() if isinstance(data, bytes) else str(data or "")
        if not 200 <= response.status < 300:
            try:
                message = json.loads(text).get("message", text)
            except (ValueError, AttributeError):
                message = text
            raise KubeError(method, path, response.status, str(message)[:500])
        return json.loads(text) if text else None

    def get(self, kind: Kind, namespace: str, name: str) -> Manifest | None:
        try:
            result: Manifest = self.request("GET", self.path(kind, namespace, name))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return result

    def create(self, kind: Kind, namespace: str, body: Manifest) -> Manifest:
        result: Manifest = self.request("POST", self.path(kind, namespace), body)
        return result

    def merge_patch(self, kind: Kind, namespace: str, name: str, body: Manifest, sub: str | None = None) -> Manifest:
        result: Manifest = self.request(
            "PATCH", self.path(kind, namespace, name, sub), body, "application/merge-patch+json"
        )
        return result

    def served(self, kind: Kind) -> bool:
        """Whether the cluster serves this kind (discovery, cached for a while): add-on CRDs may be missing."""
        now = time.monotonic()
        with self._lock:
            cached = self._discovery.get(kind.api_version)
        if cached is None or now - cached[0] > self.discovery_ttl_s:
            base = f"/api/{kind.version}" if not kind.group else f"/apis/{kind.api_version}"
            try:
                listing = self.request("GET", base)
                plurals = {r["name"] for r in listing.get("resources", []) if "/" not in r["name"]}
            except KubeError as exc:
                if exc.status != 404:
                    raise
                plurals = set()
            cached = (now, plurals)
            with self._lock:
                self._discovery[kind.api_version] = cached
        return kind.plural in cached[1]
