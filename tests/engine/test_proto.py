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
    for name in ("engine_pb2.py", "engine_pb2.pyi", "engine_pb2_grpc.py"):
        assert (tmp_path / name).read_text() == (ROOT / "engine" / "api" / name).read_text(), f"{name} is stale"
