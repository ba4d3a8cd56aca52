"""The engine does all model work, loading included, on its own thread; loading failures still reach the caller."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from optimist.engine.config import ConfigError, EngineConfig
from optimist.engine.engine import Engine
from optimist.engine.outputs import Finished
from optimist.engine.request import SamplingParams


def _generate_recording(engine: Engine, record: Callable[[], object]) -> tuple[list[int], Finished]:
    """Four greedy tokens with `record()` called at every model forward; shuts the engine down."""
    forward = engine.model.forward

    def recording(*args: Any, **kwargs: Any) -> Any:
        record()
        return forward(*args, **kwargs)

    engine.model.forward = recording  # type: ignore[method-assign]
    try:
        ids, _, final = engine.generate(engine.new_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=4)))
    finally:
        engine.shutdown()
    return ids, final


def test_loading_and_steps_run_on_the_engine_thread(tiny_gguf: Path) -> None:
    """One OpenMP team for all model work (see Engine.__init__): loading happens where the steps run."""
    loading: set[str] = set()

    def progress(done: int, total: int) -> None:
        loading.add(threading.current_thread().name)

    engine = Engine(EngineConfig(model=str(tiny_gguf), kv_cache_tokens=256), progress)
    stepping: set[str] = set()
    ids, final = _generate_recording(engine, lambda: stepping.add(threading.current_thread().name))
    assert len(ids) == final.completion_tokens == 4
    assert loading == stepping == {"optimist-engine"}


def _engine_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "optimist-engine" and t.is_alive()}


def test_a_loading_failure_reaches_the_caller(tmp_path: Path) -> None:
    before = _engine_threads()  # other tests' engines may be running
    with pytest.raises(ConfigError, match="kv_cache_tokens"):
        Engine(EngineConfig(model=str(tmp_path / "x.gguf"), kv_cache_tokens=1))
    missing = tmp_path / "missing.gguf"
    with pytest.raises(Exception, match=r"missing\.gguf"):
        Engine(EngineConfig(model=str(missing)))
    assert _engine_threads() == before  # the failed engines' threads have ended


@pytest.mark.gpu
def test_gpu_steps_leave_cudnn_attention_out(tiny_gguf: Path) -> None:
    """cuDNN attention builds a plan per shape and decode shapes change every step (see runner.GPU_ATTENTION):
    model forwards on CUDA run with it disabled, and the rest of the process keeps its own choice."""
    import torch

    engine = Engine(EngineConfig(model=str(tiny_gguf), device="cuda", kv_cache_tokens=256))
    seen: list[bool] = []
    ids, _ = _generate_recording(engine, lambda: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    assert len(ids) == 4 and len(seen) == 4 and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_a_script_that_exits_with_the_engine_working_ends_its_thread_first(tiny_gguf: Path) -> None:
    """No shutdown() in the script: at exit the engine thread is stopped before the interpreter finalizes (a daemon
    thread still in a step then is killed where it next takes the GIL, and inside torch's C++ that aborted the
    process: "terminate called without an active exception", exit status 134)."""
    script = textwrap.dedent(f"""
        import atexit, threading
        from optimist.engine.config import EngineConfig
        from optimist.engine.engine import Engine
        from optimist.engine.request import SamplingParams

        def report():  # registered before the engine's handler, so it runs after it
            alive = [t.name for t in threading.enumerate() if t.name == "optimist-engine" and t.is_alive()]
            print("engine threads at exit:", alive, flush=True)

        atexit.register(report)
        engine = Engine(EngineConfig(model={str(tiny_gguf)!r}, kv_cache_tokens=256))
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        engine.submit(engine.new_request([1, 2, 3], params), lambda event: None)
        print("leaving", flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["leaving", "engine threads at exit: []"], done.stdout
