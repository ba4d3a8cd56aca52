"""Compiles the sparse-attention Triton kernels for an NVIDIA GPU architecture on a machine without one.

Triton's compiler and `ptxas` (shipped in the triton wheel) need no GPU: with a compile-only driver that names
the target (`compile_only`), a warm-up run of the JIT function (compile, do not launch) takes the launcher's real
arguments through Triton's specialization (pointer alignment, strides divisible by 16) and every stage to a cubin.
`check_kernels` does that for every configuration the launchers autotune over and reports shared memory,
pipelining, registers and spills, so a kernel that would not compile, or whose every configuration needs more
shared memory than the GPU has, shows here rather than at a pod's first long prompt. `precompile` is the same
compilation on a real GPU, which the engine runs at start.

It also counts, in the machine code (SASS, from cuobjdump), the instructions one thread issues per key tile in
each key loop: the range loop's fewest (an interior tile: no mask) and most (a tile that needs the causal or range
mask), and the gathered-column loop's. With the tensor cores doing the products, attention is bound by these
(softmax, masks, addresses, pipelining), so the count is the no-GPU measure of a kernel change: the run time per
tile is only to be had on a GPU.

`optimist check-kernels` prints the table. Run it with TRITON_INTERPRET unset (the interpreter replaces the
compiler); the test suite runs it in a subprocess.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

# Largest shared memory one program may use (the opt-in limit per block), bytes, by compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
log = logging.getLogger(__name__)
KERNELS = ("vertical_slash", "block_sparse")
_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", re.M)  # /*0a30*/  INSTRUCTION ... ;
_BRANCH = re.compile(r"^(@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+(?:!?U?P\w+,\s*)?(0x[0-9a-f]+)")
_MMA = ("HGMMA", "HMMA")  # warpgroup (Hopper) or warp matrix multiply-accumulate
_ASYNC_COPY = ("LDGSTS", "UTMALDG", "UBLKCP")  # global-to-shared copies that do not wait: cp.async, TMA, bulk
_PREDICATE = re.compile(r"^@!?U?P\w+\s+")


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
    # SASS instructions a thread issues per key tile: the range (or key-block) loop's fewest and most (interior
    # tile / masked tile), the gathered-column loop's most (-1: no such loop found)
    range_tile: int = -1
    range_tile_masked: int = -1
    column_tile: int = -1


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
    block: int | None = None,
) -> Any:
    """Compiles (launches nothing) one configuration for one chunk shape, for the active driver's GPU (a real one,
    or the target of `compile_only`), exactly as the autotuner will ask for it: the same keyword arguments in the
    same order (options are part of Triton's cache key, so a different order would compile again). Returns
    Triton's CompiledKernel. block: query rows per program (default: the engine's)."""
    fn, grid, args, consts = launches(kernel, dtype, head_dim, n, q_start, heads, device, block)
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
    block: int | None = None,
) -> int:
    """Compiles every configuration the launchers autotune over for this model's heads on `device`'s GPU, so that
    a long prompt's first sparse chunk only times them (26 programs, 1-2 s each to compile here, would otherwise
    stall that prompt); chunk sizes are not specialized on, so these are all the programs serving needs. Compiles
    on `threads` threads (default: the CPUs, at most 8; Triton's compiler and ptxas leave the GIL: 20 programs took
    32 s on one thread and 18 s on four on a 2-core machine). A configuration that does not compile is left to the
    autotuner (which skips what does not fit). block: query rows per program (default: the engine's). Returns how
    many programs this call compiled."""
    from concurrent.futures import ThreadPoolExecutor

    from triton.runtime._async_compile import AsyncCompileMode

    for kernel in kernels:  # heads the kernels cannot take: the launcher's ValueError, before anything compiles
        launches(kernel, dtype, head_dim, 1, 0, heads, "cpu")
    before = sum(programs(k) for k in kernels)
    workers = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool, AsyncCompileMode(pool, ignore_errors=True):
        for kernel in kernels:
            for config in candidates(kernel)[which]:
                compile_one(kernel, config, dtype, head_dim, 256, 64, heads, device, block)
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
    block: int | None = None,
) -> list[Compiled]:
    """Compiles each kernel's autotuning candidates (`which` of them) for compute capability `arch`, with `block`
    query rows per program (default: the engine's; block-sparse keeps key blocks of as many keys)."""
    rows = []
    with compile_only(arch):  # refuses an unknown architecture or the interpreter before anything compiles
        for kernel in kernels:
            for config in candidates(kernel)[which]:
                name, text = _describe(kernel, config)
                t = time.perf_counter()
                try:
                    compiled = compile_one(kernel, config, dtype, head_dim, n=1000, q_start=24, block=block)
                except Exception as exc:  # a compiler error is this row's result
                    error = f"{type(exc).__name__}: {exc}"
                    rows.append(Compiled(name, text, -1, False, False, time.perf_counter() - t, error))
                    continue
                shared = int(compiled.metadata.shared)
                seconds = time.perf_counter() - t
                fits = shared <= SHARED_LIMIT[arch]
                regs, stack = _resources(compiled.asm["cubin"])
                loops = key_loops(_cuobjdump("-sass", compiled.asm["cubin"]))
                # pipelined: every key loop issues asynchronous copies into shared memory for tiles to come
                pipelined = bool(loops) and all(loop.async_copies for loop in loops)
                paths = loops[0].paths if loops else [-1]
                column = max(loops[-1].paths) if len(loops) > 1 else -1
                rows.append(
                    Compiled(name, text, shared, fits, pipelined, seconds, "", regs, stack, paths[0], paths[-1], column)
                )
    return rows


@dataclass
class KeyLoop:
    start: int  # address of the loop's first instruction
    paths: list[int]  # instructions issued through one iteration, each way through its branches (ascending)
    async_copies: bool  # global-to-shared copies that run ahead of use (software pipelining)


def key_loops(sass: str) -> list[KeyLoop]:
    """The innermost loops of a kernel's SASS that multiply on the tensor cores (its key-tile loops), in program
    order, with the instruction count of every path through one iteration (forward branches taken or not, at most
    2^10 ways; a path ends at the loop's backward branch)."""
    code = [(int(a, 16), text) for a, text in _SASS_LINE.findall(sass)]
    loops = []
    for i, (addr, text) in enumerate(code):
        m = _BRANCH.match(text)
        if m and int(m.group(2), 16) < addr:  # a backward branch closes a loop
            head = int(m.group(2), 16)
            body = [(a, t) for a, t in code[: i + 1] if a >= head]
            if any(_PREDICATE.sub("", t).startswith(_MMA) for _, t in body):
                loops.append(body)
    inner = [b for b in loops if not any(o is not b and b[0][0] <= o[0][0] and o[-1][0] <= b[-1][0] for o in loops)]
    return [
        KeyLoop(body[0][0], _paths(body), any(_PREDICATE.sub("", t).startswith(_ASYNC_COPY) for _, t in body))
        for body in sorted(inner, key=lambda b: b[0][0])
    ]


def _paths(body: list[tuple[int, str]]) -> list[int]:
    where = {a: i for i, (a, _) in enumerate(body)}
    last = body[-1][0]
    forks = [a for a, t in body if (m := _BRANCH.match(t)) and m.group(1) and a < int(m.group(2), 16) <= last]
    counts = set()
    for taken in itertools.islice(itertools.product((False, True), repeat=len(forks)), 1024):
        take, i, n = dict(zip(forks, taken, strict=True)), 0, 0
        while i < len(body):
            addr, text = body[i]
            n += 1
            m = _BRANCH.match(text)
            if addr == last:
                break
            if m and int(m.group(2), 16) > addr and (not m.group(1) or take.get(addr)):
                target = int(m.group(2), 16)
                if target > last or target not in where:  # leaves the loop
                    break
                i = where[target]
                continue
            i += 1
        counts.add(n)
    return sorted(counts)


def _cuobjdump(option: str, cubin: bytes) -> str:
    """cuobjdump's (shipped with Triton) output for `cubin`; empty if it cannot run."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            return subprocess.run([tool, option, f.name], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired):
            return ""


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) per thread of the program in `cubin`."""
    out = _cuobjdump("--dump-resource-usage", cubin)
    regs, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
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
        f"| kernel (sm_{arch}) | configuration | shared KiB | fits | pipelined | registers | stack B "
        "| range tile: instructions interior / masked | column tile | compile s | error |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        shared = f"{r.shared / 1024:.1f}" if r.shared >= 0 else "-"
        lines.append(
            f"| {r.kernel} | {r.config} | {shared} | {'yes' if r.fits else 'no'} | {'yes' if r.pipelined else 'no'} "
            f"| {r.registers} | {r.stack} | {r.range_tile} / {r.range_tile_masked} | {r.column_tile} "
            f"| {r.seconds:.1f} | {r.error[:120]} |"
        )
    return "\n".join(lines)


def as_json(rows: Sequence[Compiled]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
