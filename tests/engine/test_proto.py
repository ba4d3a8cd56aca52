"""The committed Python stubs are what scripts/gen-proto makes from proto/ (regenerate with `make proto`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([str(ROOT / "scripts" / "gen-proto"), str(tmp_path)], check=True, env=env)
    names = [f"{stem}{suffix}" for stem in ("engine_pb2", "grpc_service_pb2") for suffix in (".py", ".pyi", "_grpc.py")]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    for name in names:
        assert (tmp_path / name).read_text() == (ROOT / "engine" / "api" / name).read_text(), f"{name} is stale"
