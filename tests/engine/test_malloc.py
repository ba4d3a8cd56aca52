"""The allocator settings: large activation blocks come from the heap and stay there once freed, so engine steps
reuse mapped pages instead of page-faulting fresh ones (the speed effect is in engine/malloc.py's docstring)."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys

import pytest

from optimist.engine.malloc import keep_freed_memory


def _glibc() -> bool:
    try:
        ctypes.CDLL(None).mallinfo2  # noqa: B018 - glibc >= 2.33
    except (OSError, AttributeError):
        return False
    return sys.platform.startswith("linux")


# In a fresh interpreter: one step's worth of activations (ten 16 MB blocks alive at once), then freed.
SCRIPT = """
import ctypes, json, sys
from optimist.engine.malloc import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
import torch
class MallInfo2(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
blocks = [torch.ones(4 << 20) for _ in range(10)]
mapped = libc.mallinfo2().hblkhd
del blocks
print(json.dumps({"mapped_mb": mapped >> 20, "free_in_heap_mb": libc.mallinfo2().fordblks >> 20}))
"""


def _run(mode: str) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _glibc(), reason="glibc only")
def test_large_blocks_come_from_the_heap_and_stay_there() -> None:
    default, tuned = _run("default"), _run("tuned")
    # glibc's default: 16 MB blocks are mmap()ed and unmapped on free (the next step faults them in again)
    assert default["mapped_mb"] >= 150, default
    # tuned: from the heap, and the 160 MB freed stays there for the next step
    assert tuned["mapped_mb"] < 16, tuned
    assert tuned["free_in_heap_mb"] >= 150, tuned


@pytest.mark.skipif(_glibc(), reason="checks the fallback where the C library is not glibc")
def test_other_platforms_are_left_alone() -> None:
    assert keep_freed_memory() is False
