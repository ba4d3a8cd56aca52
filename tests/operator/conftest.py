"""Fixtures for the operator tests: the example pools, an emulated cluster on a real port, the operator running
against it in its own thread and event loop (as kopf requires), and the real kubectl/helm binaries."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from optimist.operator.kube import Kube, load_client
from optimist.operator.main import serve

from .cluster import ClusterThread
from .k8s_tools import tool

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def load_example(name: str) -> dict[str, Any]:
    data = yaml.safe_load((EXAMPLES / name).read_text())
    assert isinstance(data, dict)
    return data


def with_identity(pool: dict[str, Any], uid: str = "uid-1", generation: int = 1) -> dict[str, Any]:
    pool = json.loads(json.dumps(pool))
    pool["metadata"].setdefault("namespace", "default")
    pool["metadata"].update(uid=uid, generation=generation)
    return pool


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as exc:  # not there yet
            last = exc
        else:
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


class Kubectl:
    def __init__(self, kubeconfig: Path) -> None:
        self.base = [tool("kubectl"), "--kubeconfig", str(kubeconfig)]

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=60)
        if check and out.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {out.stderr}")
        return out

    def get(self, resource: str, name: str, namespace: str = "default") -> dict[str, Any]:
        data = json.loads(self("get", resource, name, "-n", namespace, "-o", "json").stdout)
        assert isinstance(data, dict)
        return data


class OperatorThread:
    def __init__(self, kubeconfig: Path, namespaces: tuple[str, ...] = (), drift_interval_s: float = 60.0) -> None:
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.errors: list[BaseException] = []
        kc = str(kubeconfig)

        def run() -> None:
            try:
                asyncio.run(
                    serve(
                        lambda: Kube(load_client(kc)),
                        kc,
                        namespaces,
                        None,
                        drift_interval_s,
                        stop_flag=self.stop_flag,
                        ready_flag=self.ready_flag,
                    )
                )
            except BaseException as exc:  # surfaced by the test
                self.errors.append(exc)

        self.thread = threading.Thread(target=run, daemon=True)

    def start(self) -> OperatorThread:
        self.thread.start()
        if not self.ready_flag.wait(30):
            raise RuntimeError(f"the operator did not start: {self.errors}")
        return self

    def stop(self) -> None:
        self.stop_flag.set()
        self.thread.join(20)
        assert not self.thread.is_alive(), "the operator did not stop"


@pytest.fixture()
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ClusterThread]:
    marker = request.node.get_closest_marker("addons")
    addons = tuple(marker.args) if marker else ()
    c = ClusterThread(tmp_path, addons).start()
    yield c
    c.stop()


@pytest.fixture()
def kubectl(cluster: ClusterThread) -> Kubectl:
    return Kubectl(cluster.kubeconfig)


@pytest.fixture()
def kube(cluster: ClusterThread) -> Kube:
    return Kube(load_client(str(cluster.kubeconfig)))


@pytest.fixture()
def start_operator(cluster: ClusterThread) -> Iterator[Callable[..., OperatorThread]]:
    running: list[OperatorThread] = []

    def start(**kwargs: Any) -> OperatorThread:
        op = OperatorThread(cluster.kubeconfig, **kwargs).start()
        running.append(op)
        return op

    yield start
    for op in running:
        if op.thread.is_alive():
            op.stop()
