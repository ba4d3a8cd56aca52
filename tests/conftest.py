"""Shared fixtures: the real default model (loaded once per session), the transformers reference, tiny models,
and a real gRPC server on a loopback port."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors in the interpreter; it must be chosen before triton is first imported
    # (the engine's modules import torch.nn.attention, which imports triton).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from optimist.engine.config import EngineConfig, default_model_path  # noqa: E402
from optimist.engine.engine import Engine  # noqa: E402

from . import tiny_llama  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def engine(model_path: Path) -> Iterator[Engine]:
    """The default model with exact float32 weights and activations (the reference tests compare it with
    transformers token for token; `weights="auto"` would pick float16 weights on CPU, `dtype="auto"` bfloat16 on
    a GPU) and room for the whole suite's concurrency."""
    eng = Engine(
        EngineConfig(model=model_path, weights="float", dtype="float32", kv_cache_tokens=32768, max_num_seqs=64)
    )
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def int4_engine(model_path: Path) -> Iterator[Engine]:
    """The default model as a CPU serves it by default: the file's 4-bit blocks, decode steps in one C call."""
    eng = Engine(EngineConfig(model=model_path, kv_cache_tokens=8192))
    if eng.model.native_decoder is None:
        eng.shutdown()
        pytest.skip("the native decoder does not run here (no C compiler)")
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def hf_model(model_path: Path) -> Any:
    """transformers loading the same GGUF file (the correctness reference)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama.write_hf_dir(tmp_path_factory.mktemp("tiny-hf"), tie=False)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama.write_gguf(tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf", tie=True)


class ServerThread:
    """A real optimist gRPC server in its own thread and event loop, on 127.0.0.1 with a free port (and the OpenAI
    HTTP API on another when `http` is true: `http_url`)."""

    def __init__(
        self,
        config: EngineConfig,
        engine_factory: Callable[[], Engine] | None = None,
        port: int = 0,
        http: bool = False,
        api_key: str | None = None,
    ) -> None:
        from optimist.engine.server import Server

        self.loop = asyncio.new_event_loop()
        self.server = Server(
            config,
            "127.0.0.1",
            port,
            grace_s=5.0,
            engine_factory=engine_factory,
            http_port=0 if http else None,
            api_key=api_key,
        )
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.call(self.server.start())
        self.address = f"127.0.0.1:{self.server.port}"
        self.http_url = f"http://127.0.0.1:{self.server.http.port}" if self.server.http else ""

    def call(self, coro: Any, timeout: float = 120.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        try:
            self.call(self.server.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)


class LoadingServer:
    """A server whose model load is held until `finish_loading()` (it hands over the session engine then)."""

    def __init__(self, engine: Engine, http: bool = False) -> None:
        self.release = threading.Event()

        def held() -> Engine:
            self.release.wait(30)
            return engine

        self.thread = ServerThread(engine.config, engine_factory=held, http=http)
        self.address = self.thread.address
        self.http_url = self.thread.http_url
        self.loading = self.thread.submit(self.thread.server.load())

    def finish_loading(self) -> None:
        self.release.set()
        self.loading.result(30)


@pytest.fixture()
def loading_server(engine: Engine) -> Iterator[LoadingServer]:
    srv = LoadingServer(engine)
    yield srv
    srv.release.set()
    srv.thread.stop()


def serving(engine: Engine, http: bool = False) -> ServerThread:
    """A loaded server in front of an engine the caller owns (stop it with .stop())."""
    srv = ServerThread(engine.config, engine_factory=lambda: engine, http=http)
    srv.call(srv.server.load())
    return srv


@pytest.fixture(scope="session")
def server(engine: Engine) -> Iterator[ServerThread]:
    """A server in front of the shared session engine."""
    srv = serving(engine)
    yield srv
    srv.stop()


def events_of(engine: Engine, request: Any, timeout_s: float = 300) -> list[Any]:
    """Submits one request and returns every event it got, the Finished last."""
    from optimist.engine.outputs import Event, Finished

    events: list[Event] = []
    done = threading.Event()

    def sink(ev: Event) -> None:
        events.append(ev)
        if isinstance(ev, Finished):
            done.set()

    engine.submit(request, sink)
    assert done.wait(timeout_s), "the request did not finish"
    return events


def events_concurrently(engine: Engine, requests: list[Any], timeout_s: float = 600) -> list[list[Any]]:
    """Submits every request at once (they share the engine's steps); each one's events, the Finished last."""
    from optimist.engine.outputs import Event, Finished

    events: list[list[Event]] = [[] for _ in requests]
    done = threading.Semaphore(0)

    def sink_for(i: int) -> Callable[[Event], None]:
        def sink(ev: Event) -> None:
            events[i].append(ev)
            if isinstance(ev, Finished):
                done.release()

        return sink

    for i, req in enumerate(requests):
        engine.submit(req, sink_for(i))
    for _ in requests:
        assert done.acquire(timeout=timeout_s), "a request did not finish"
    return events


def run_concurrently(engine: Engine, requests: list[Any], timeout_s: float = 600) -> list[list[int]]:
    """Submits every request at once (they share the engine's steps); each one's output token ids, once all end."""
    return [[t for ev in evs[:-1] for t in ev.token_ids] for evs in events_concurrently(engine, requests, timeout_s)]
