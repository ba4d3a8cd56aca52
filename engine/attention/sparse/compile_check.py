"""Compiles the sparse-attention Triton kernels for an NVIDIA GPU architecture on a machine without one.

Triton's compiler and `ptxas` (shipped in the triton wheel) need no GPU: with a compile-only driver that names
the target (`compile_only`), a warm-up run of the JIT function (compile, do not launch) takes the launcher's real
arguments through Triton's specialization (pointer alignment, strides divisible by 16) and every stage to a cubin.
`check_kernels` does that for every configuration the launchers autotune over and reports shared memory,
pipelining, registers and spills, so a kernel that would not compile, or whose every configuration needs more
shared memory than the GPU has, shows here rather than at a pod's first long prompt. `precompile` is the same
compilation on a real GPU, which the engine runs at start.

`optimist check-kernels` prints the table. Run it with TRITON_INTERPRET unset (the interpreter replaces the
compiler); the test suite runs it in a subprocess.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

# Largest shared memory one program may use (the opt-in limit per block), bytes, by compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
log = logging.getLogger(__name__)
KERNELS = ("vertical_slash", "block_sparse")
# an asynchronous copy of a 2-D tile of floats (keys or values) into shared memory: the key loop is pipelined
_TILE_COPY = re.compile(r"async_copy_global_to_local .*: tensor<\d+x\d+x!tt\.ptr<(bf16|f16|f32)>")


@dataclass
class Compiled:
    kernel: str  # vertical_slash (nested or flat loop) or block_sparse
    config: str  # the autotuning candidate
    shared: int  # bytes of shared memory the program needs (-1 if it did not compile)
    fits: bool  # compiled, and within the architecture's shared-memory limit
    pipelined: bool  # loads issued asynchronously ahead of use (software pipelining took the key loop)
    seconds: float
    error: str = ""
    registers: int = -1  # per thread (255 is the most; more live values spill to the stack)
    stack: int = -1  # bytes of stack per thread: spilled registers (0 is what a fast kernel has)


def _driver_class(arch: int) -> type:
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class CompileOnly(DriverBase):  # Triton's abstract driver: compile only
        """Names the target; launching and timing are refused (there is nothing to launch on)."""

        @classmethod
        def is_active(cls) -> bool:
            return True

        def map_python_to_cpp_type(self, ty: str) -> str:
            return ty

        def get_current_target(self) -> Any:
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self) -> torch.device:
            return torch.device("cpu")

        def get_benchmarker(self) -> Any:
            raise RuntimeError("compile-only driver: nothing to time without a GPU")

        def get_current_device(self) -> int:
            return 0

        def get_current_stream(self, device: int | None = None) -> int:
            return 0

        def get_device_interface(self) -> Any:
            raise RuntimeError("compile-only driver: no device")

    return CompileOnly


@contextlib.contextmanager
def compile_only(arch: int) -> Iterator[None]:
    """Within: Triton compiles for compute capability `arch` (90 = H100/H200) and launches nothing."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 runs kernels in the interpreter: unset it to compile for a GPU")
    if arch not in SHARED_LIMIT:
        raise ValueError(f"unknown compute capability {arch} (one of {sorted(SHARED_LIMIT)})")
    from triton.runtime.driver import driver

    previous = driver._active
    driver.set_active(_driver_class(arch)())
    try:
        yield
    finally:
        driver._active = previous


def launches(
    kernel: str,
    dtype: torch.dtype,
    head_dim: int,
    n: int,
    q_start: int = 0,
    heads: tuple[int, int] = (32, 8),
    device: torch.device | str = "cpu",
    block: int | None = None,
) -> tuple[Any, tuple[int, int], tuple[Any, ...], dict[str, Any]]:
    """(JIT function, grid, arguments, constexprs) of one launch over a chunk of n queries after q_start cached keys
    in the engine's packed layout, built by the launcher's own argument code; `heads`: query and KV heads (default
    Llama-3-8B's 32 on 8). The index is a small valid one (its values do not change what compiles)."""
    from . import triton_kernels as tk
    from .gpu import BLOCK
    from .index import build_block_sparse_index, build_vertical_slash_index

    block = BLOCK if block is None else block  # the engine's query rows per program
    hq, hkv = heads
    length = q_start + n
    q = torch.zeros(n, hq, head_dim, dtype=dtype, device=device)
    k = torch.zeros(length, hkv, head_dim, dtype=dtype, device=device)
    v = torch.zeros_like(k)
    out = torch.empty_like(q)
    if kernel == "vertical_slash":
        g = torch.Generator().manual_seed(0)
        cols = torch.stack([torch.randperm(length, generator=g)[: min(64, length)] for _ in range(hq)])
        near = torch.arange(min(block, length))
        far = [block + torch.randperm(max(length - block, 0), generator=g)[:64] for _ in range(hq)]
        offs = torch.stack([torch.cat([near, f]) for f in far])
        index = build_vertical_slash_index(cols.to(device), offs.to(device), q_start, n, block)
        grid, args, consts = tk.vertical_slash_launch(q, k, v, index, None, out, "auto", tk.AUTO_TILE_N)
        return tk._vertical_slash_kernel, grid, args, consts
    if kernel == "block_sparse":
        nq = -(-n // block)
        own = q_start // block + torch.arange(nq, device=device)
        kept = torch.stack([own, torch.zeros_like(own)], dim=1)[None].expand(hq, -1, -1).contiguous()
        counts = torch.where(own == 0, 1, 2)[None, :].expand(hq, -1).contiguous()
        bs = build_block_sparse_index(kept, counts, q_start, n, block)
        grid, args, consts = tk.block_sparse_launch(q, k, v, bs, None, out)
        return tk._block_sparse_kernel, grid, args, consts
    raise ValueError(f"unknown kernel {kernel!r} (one of {', '.join(KERNELS)})")


def candidates(kernel: str) -> list[Any]:
    """The launch configurations the launcher autotunes over on a GPU (vertical-slash: loop="auto"'s, which hold
    the nested loop's and the flat loop's)."""
    from . import triton_kernels as tk

    return list(tk._TUNE_AUTO if kernel == "vertical_slash" else tk._TUNE_BS)


def _describe(kernel: str, config: Any) -> tuple[str, str]:
    kw = dict(config.kwargs)
    name = kernel
    if "FLAT" in kw:
        name += " flat" if kw.pop("FLAT") else " nested"
    parts = [f"{k}={v}" for k, v in kw.items()] + [f"warps={config.num_warps}", f"stages={config.num_stages}"]
    return name, " ".join(parts)


def compile_one(
    kernel: str,
    config: Any,
    dtype: torch.dtype,
    head_dim: int,
    n: int,
    q_start: int = 0,
    heads: tuple[int, int] = (32, 8),
    device: torch.device | str = "cpu",
) -> Any:
    """Compiles (launches nothing) one configuration for one chunk shape, for the active driver's GPU (a real one,
    or the target of `compile_only`), exactly as the autotuner will ask for it: the same keyword arguments in the
    same order (options are part of Triton's cache key, so a different order would compile again). Returns
    Triton's CompiledKernel."""
    fn, grid, args, consts = launches(kernel, dtype, head_dim, n, q_start, heads, device)
    return fn.run(*args, grid=grid, warmup=True, **dict(consts, **config.all_kwargs()))


def programs(kernel: str) -> int:
    """How many programs of `kernel` this process has compiled (all devices)."""
    from . import triton_kernels as tk

    fn = tk._vertical_slash_kernel if kernel == "vertical_slash" else tk._block_sparse_kernel
    return sum(len(caches[0]) for caches in fn.device_caches.values())


def precompile(
    dtype: torch.dtype,
    head_dim: int,
    heads: tuple[int, int],
    device: torch.device | str,
    kernels: Sequence[str] = KERNELS,
    which: slice = slice(None),
    threads: int | None = None,
) -> int:
    """Compiles every configuration the launchers autotune over for this model's heads on `device`'s GPU, so that
    a long prompt's first sparse chunk only times them (20 programs, 1-2 s each to compile here, would otherwise
    stall that prompt); chunk sizes are not specialized on, so these are all the programs serving needs. Compiles
    on `threads` threads (default: the CPUs, at most 8; Triton's compiler and ptxas leave the GIL: 20 programs took
    32 s on one thread and 18 s on four on a 2-core machine). A configuration that does not compile is left to the
    autotuner (which skips what does not fit). Returns how many programs this call compiled."""
    from concurrent.futures import ThreadPoolExecutor

    from triton.runtime._async_compile import AsyncCompileMode

    for kernel in kernels:  # heads the kernels cannot take: the launcher's ValueError, before anything compiles
        launches(kernel, dtype, head_dim, 1, 0, heads, "cpu")
    before = sum(programs(k) for k in kernels)
    workers = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool, AsyncCompileMode(pool, ignore_errors=True):
        for kernel in kernels:
            for config in candidates(kernel)[which]:
                compile_one(kernel, config, dtype, head_dim, 256, 64, heads, device)
    done = sum(programs(k) for k in kernels) - before
    wanted = sum(len(candidates(k)[which]) for k in kernels)
    if done < wanted:
        log.info("sparse attention: %d of %d configurations did not compile here (the autotuner skips them)",
                 wanted - done, wanted)  # fmt: skip
    return done


def check_kernels(
    arch: int = 90,
    dtype: torch.dtype = torch.bfloat16,
    head_dim: int = 128,
    kernels: Sequence[str] = KERNELS,
    which: slice = slice(None),
) -> list[Compiled]:
    """Compiles each kernel's autotuning candidates (`which` of them) for compute capability `arch`."""
    rows = []
    with compile_only(arch):  # refuses an unknown architecture or the interpreter before anything compiles
        for kernel in kernels:
            for config in candidates(kernel)[which]:
                name, text = _describe(kernel, config)
                t = time.perf_counter()
                try:
                    compiled = compile_one(kernel, config, dtype, head_dim, n=1000, q_start=24)
                except Exception as exc:  # a compiler error is this row's result
                    error = f"{type(exc).__name__}: {exc}"
                    rows.append(Compiled(name, text, -1, False, False, time.perf_counter() - t, error))
                    continue
                shared = int(compiled.metadata.shared)
                pipelined = bool(_TILE_COPY.search(compiled.asm["ttgir"]))
                seconds = time.perf_counter() - t
                fits = shared <= SHARED_LIMIT[arch]
                regs, stack = _resources(compiled.asm["cubin"])
                rows.append(Compiled(name, text, shared, fits, pipelined, seconds, "", regs, stack))
    return rows


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) per thread of the program in `cubin`, from cuobjdump (shipped with Triton)."""
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            done = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, timeout=60)
        except OSError:
            return -1, -1
    regs, stack = re.search(r"REG:(\d+)", done.stdout), re.search(r"STACK:(\d+)", done.stdout)
    return (int(regs.group(1)) if regs else -1), (int(stack.group(1)) if stack else -1)


def summary(rows: Sequence[Compiled]) -> list[str]:
    """Problems a user would meet: a kernel with no configuration that compiles and fits."""
    problems = []
    for kernel in dict.fromkeys(r.kernel for r in rows):
        if not any(r.fits for r in rows if r.kernel == kernel):
            problems.append(f"{kernel}: no configuration compiles within the shared-memory limit")
    return problems


def table(rows: Sequence[Compiled], arch: int) -> str:
    lines = [
        f"| kernel (sm_{arch}) | configuration | shared KiB | fits | pipelined | registers | stack B | compile s "
        "| error |",
        "|---|---|---:|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        shared = f"{r.shared / 1024:.1f}" if r.shared >= 0 else "-"
        lines.append(
            f"| {r.kernel} | {r.config} | {shared} | {'yes' if r.fits else 'no'} | {'yes' if r.pipelined else 'no'} "
            f"| {r.registers} | {r.stack} | {r.seconds:.1f} | {r.error[:120]} |"
        )
    return "\n".join(lines)


def as_json(rows: Sequence[Compiled]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
