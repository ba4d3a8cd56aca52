"""The `optimist` command: serve, generate, SIGTERM, and start-up errors, as real processes."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from optimist.engine.client import wait_ready

OPTIMIST = [sys.executable, "-m", "optimist.engine.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_with_a_missing_model_exits_with_a_one_line_reason(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*OPTIMIST, "serve", "--model", str(tmp_path / "missing.gguf"), "--port", str(free_port()), "--no-http"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("optimist serve: error:") and "missing.gguf" in last and "does not exist" in last


def test_serve_generate_and_graceful_sigterm(tiny_gguf: Path) -> None:
    port, http_port = free_port(), free_port()
    server = subprocess.Popen(
        [
            *OPTIMIST,
            "serve",
            "--model",
            str(tiny_gguf),
            "--port",
            str(port),
            "--http-port",
            str(http_port),
            "--grace-period",
            "5",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_ready(f"127.0.0.1:{port}", timeout_s=120)
        gen = subprocess.run(
            [*OPTIMIST, "generate", "the", "--server", f"127.0.0.1:{port}", "--max-tokens", "5", "--temperature", "0"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert gen.returncode == 0, gen.stderr
        assert gen.stdout.strip() != ""  # "the" is two tokens of the tiny vocabulary: t + he
        assert "[length; 2 prompt + 5 completion tokens" in gen.stderr
        bad = subprocess.run(
            [*OPTIMIST, "generate", "the", "--server", f"127.0.0.1:{port}", "--max-tokens", "0"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert bad.returncode == 1 and "INVALID_ARGUMENT: sampling.max_tokens" in bad.stderr
        schema = tiny_gguf.parent / "schema.json"
        schema.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}},
                                      "required": ["ok"], "additionalProperties": False}))  # fmt: skip
        shaped = {
            ("--regex", "[a-z]{3}-[0-9]{2}"): lambda out: re.fullmatch("[a-z]{3}-[0-9]{2}", out),
            ("--choice", "yes", "--choice", "no"): lambda out: out in ("yes", "no"),
            ("--json-schema", f"@{schema}"): lambda out: json.loads(out) in ({"ok": True}, {"ok": False}),
        }
        if importlib.util.find_spec("llguidance") is None:  # a dependency; the GPU machine may lack it
            shaped = {}
        for option, holds in shaped.items():
            gen = subprocess.run(
                [*OPTIMIST, "generate", "the", "--server", f"127.0.0.1:{port}", "--max-tokens", "200", *option],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert gen.returncode == 0 and holds(gen.stdout.strip()), (option, gen.stdout, gen.stderr)
            assert "[eos;" in gen.stderr
        bad = subprocess.run(
            [*OPTIMIST, "generate", "the", "--server", f"127.0.0.1:{port}", "--regex", "a(b"],  # refused either way
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert bad.returncode == 1 and "INVALID_ARGUMENT: sampling.structured_output.regex" in bad.stderr
        body = json.dumps({"prompt": "the", "max_tokens": 5, "temperature": 0}).encode()
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/completions", body, timeout=120) as reply:
            answer = json.loads(reply.read())
        assert answer["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7,
                                   "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip
        os.kill(server.pid, signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.stderr is not None
    log = server.stderr.read()
    assert "loading model tensors" in log and f"ready on 127.0.0.1:{port}" in log
    assert f"OpenAI-compatible HTTP on 127.0.0.1:{http_port}" in log


def test_demo_answers_the_readme_question() -> None:
    """`make demo`'s command: the engine on the default model, one question over gRPC, the answer, a clean stop."""
    demo = subprocess.run([*OPTIMIST, "demo", "--max-tokens", "12"], capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert "Paris" in demo.stdout and "prompt +" in demo.stderr


@pytest.mark.parametrize(("content", "named"), [(None, "cannot read"), ("", "must hold one key"),
                                                 ("two words", "must hold one key")])  # fmt: skip
def test_serve_with_a_bad_api_key_file_exits_with_a_one_line_reason(
    tiny_gguf: Path, tmp_path: Path, content: str | None, named: str
) -> None:
    key_file = tmp_path / "key"
    if content is not None:
        key_file.write_text(content)
    proc = subprocess.run(
        [*OPTIMIST, "serve", "--model", str(tiny_gguf), "--port", str(free_port()), "--http-port", "0",
         "--api-key-file", str(key_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("optimist serve: error: --api-key-file:") and named in last and str(key_file) in last


def test_serve_on_a_taken_http_port_exits_with_a_one_line_reason(tiny_gguf: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        http_port = taken.getsockname()[1]
        proc = subprocess.run(
            [*OPTIMIST, "serve", "--model", str(tiny_gguf), "--port", str(free_port()), "--http-port", str(http_port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("optimist serve: error:") and f"cannot listen on 127.0.0.1:{http_port} (HTTP)" in last


def test_operator_without_credentials_exits_with_a_one_line_reason(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*OPTIMIST, "operator", "--kubeconfig", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("optimist operator: error: cannot load Kubernetes credentials") and "nope.yaml" in last


def test_bench_serve_rejects_unknown_names_before_doing_any_work(capsys: Any) -> None:
    """A typo in a baseline or weight mode is an error naming it, not a benchmark silently missing a row."""
    from optimist.engine.cli import build_parser

    parser = build_parser()
    for argv, named in (
        (["bench", "serve", "--baselines", "transformers,llama.cpp"], "unknown baseline llama.cpp"),
        (["bench", "serve", "--weights", "fp16,int8"], "unknown weight mode int8"),
        (["bench", "serve", "--apis", "grpc,rest"], "unknown API rest"),
        (["bench", "serve", "--concurrency", "1,0"], "at least 1"),
        (["bench", "serve", "--concurrency", "8,x"], "whole numbers"),
    ):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(argv)
        assert exc.value.code == 2
        assert named in capsys.readouterr().err
    args = parser.parse_args(["bench", "serve", "--baselines", "", "--weights", "fp16"])
    assert args.baselines == [] and args.weights == ["fp16"]


def test_serve_without_aiohttp_names_it_and_the_way_out(tiny_gguf: Path) -> None:
    """Where the HTTP server's dependency is missing (a bare GPU environment), serve says so in one line."""
    args = ["serve", "--model", str(tiny_gguf), "--port", str(free_port()), "--http-port", "0"]
    code = f"import sys; sys.modules['aiohttp'] = None; from optimist.engine.cli import main; sys.exit(main({args!r}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("optimist serve: error: the OpenAI-compatible API needs aiohttp") and "--no-http" in last
