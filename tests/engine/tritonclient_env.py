"""A virtual environment with NVIDIA's `tritonclient[grpc]`, the real client of the KServe v2 / Triton gRPC protocol,
for the adapter's tests. It cannot share the project's environment (it pins protobuf < 7), so it gets its own,
made once into a cache folder; `kserve_client.py` runs in it.

Run as a script to make it ahead of the tests (`.ci/run` does): python tests/engine/tritonclient_env.py
"""

from __future__ import annotations

import os
import subprocess
import venv
from pathlib import Path

REQUIREMENT = "tritonclient[grpc]==2.73.0"


def env_dir() -> Path:
    root = os.environ.get("OPTIMIST_TOOLS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "optimist", "tools"
    )
    return Path(root) / ("venv-" + REQUIREMENT.replace("[grpc]==", "-"))


def python() -> Path:
    """The environment's interpreter, making the environment first if needed (raises CalledProcessError when pip
    cannot install the client)."""
    target = env_dir()
    exe = target / "bin" / "python"
    done = target / ".installed"
    if done.is_file() and exe.is_file():
        return exe
    venv.EnvBuilder(clear=True, with_pip=True).create(target)
    subprocess.run(
        [str(exe), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", REQUIREMENT],
        check=True,
        cwd=target,  # never the repository root: its operator/ folder must not shadow the stdlib module
    )
    done.touch()
    return exe


if __name__ == "__main__":
    exe = python()
    out = subprocess.run(
        [str(exe), "-c", "import tritonclient.grpc, importlib.metadata as m; print(m.version('tritonclient'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    print("tritonclient", out.stdout.strip(), "in", exe.parent.parent)
