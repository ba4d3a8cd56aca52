"""Decode-step matmuls over the GGUF file's own 4- and 8-bit blocks, in C (`native.c`).

A decode step of a few sequences reads every weight once and does little arithmetic with it: it is bound by
bytes read and by the work of widening them. torch has no CPU kernel that reads 4-bit weights with float32
activations (its int4 kernel takes bfloat16 ones), so the float16 path reads 2 bytes per weight where the file
holds 5/8 (Q4_1) or 17/16 (Q8_0). `native.c` reads the blocks as they are, widens each block once for up to four
activation rows (for more, each weight row once per call into a panel that all rows read), and keeps activations,
products and sums in float32: the weights are exactly the file's, and the result differs from the float32 path
only by the order of the sums.

The library is compiled on first use with the machine's C compiler (gcc or clang, `-O3 -march=native -fopenmp`,
then any flags in $OPTIMIST_NATIVE_FLAGS) into a cache folder keyed by the source, the compiler, the flags and the
CPU, and loaded with ctypes; torch must be imported first so that the kernels join torch's OpenMP thread team
instead of starting a second one. Where there is no compiler, or it fails, `library()` raises `NativeUnavailable`
with the reason. Prefill-sized calls widen the blocks to float32 for torch's GEMM (`WIDEN_ROWS`); the chunks of long
prompts can instead round their activations to int8 per block of 32 and sum the products with the 4-bit values as
integers (`linear_int8`, AVX-512 VNNI; llama.cpp's Q4 x Q8 arithmetic; --prefill-gemm). The prefill attention
kernels (dense, sparse tiles, pattern estimation) are here too.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import itertools
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .lora import SLOTS, LoraAdapter, LoraBatch

if TYPE_CHECKING:
    from .llama import Llama

GROUP = 32
_Q4_0, _Q4_1, _Q8_0 = 2, 3, 8  # GGML type ids
SOURCE = Path(__file__).with_name("native.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
# Extra compiler flags, appended (e.g. "-mno-avx512f" to build and test the 8-wide kernels on an AVX-512 machine)
EXTRA_FLAGS_ENV = "OPTIMIST_NATIVE_FLAGS"

# Planar order inside a block (see native.c): element e = 8 * v + lane.
_E = np.arange(GROUP)
_V, _LANE = _E // 8, _E % 8
Q4_BYTE = 4 * (_LANE % 4) + _V
Q4_SHIFT = (4 * (_LANE // 4)).astype(np.uint8)
Q8_BYTE = 4 * _LANE + _V
# the elements whose 4 bits sit in byte b's low and high nibble (sorted by byte, then shift: pairs per byte)
_Q4_ORDER = np.lexsort((Q4_SHIFT, Q4_BYTE))
_Q4_LOW, _Q4_HIGH = _Q4_ORDER[0::2], _Q4_ORDER[1::2]


class NativeUnavailable(RuntimeError):
    """The native kernels cannot be built or loaded here; the message says why."""


def cache_dir() -> Path:
    root = os.environ.get("OPTIMIST_CACHE") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "optimist" / "native"


def _cpu_key() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return platform.machine() + "\n" + "\n".join(sorted(set(lines)))


def _compiler() -> str:
    for name in (os.environ.get("CC", ""), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise NativeUnavailable("no C compiler (cc, gcc or clang) on PATH to build the native CPU kernels")


def build(force: bool = False) -> Path:
    """Compiles native.c into the cache (once per source, compiler and CPU); returns the library's path."""
    cc = _compiler()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeUnavailable(f"C compiler {cc} does not run: {exc}") from exc
    flags = FLAGS + os.environ.get(EXTRA_FLAGS_ENV, "").split()
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(flags), _cpu_key()]).encode()).hexdigest()
    target = cache_dir() / f"native-{key[:16]}.so"
    if target.exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent builders (test workers, engines) never see a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise NativeUnavailable(f"building the native CPU kernels with {cc} failed: {reason}")
        os.replace(tmp, target)
    except subprocess.SubprocessError as exc:
        raise NativeUnavailable(f"building the native CPU kernels with {cc} failed: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def library() -> ctypes.CDLL:
    """The loaded kernels (built on first use); raises NativeUnavailable."""
    path = build()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise NativeUnavailable(f"cannot load the native CPU kernels from {path}: {exc}") from exc
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.native_linear.argtypes = [ctypes.c_int, p, p, p, p, p, i64, i64, i64, p]
    lib.native_linear.restype = ctypes.c_int
    lib.native_widen.argtypes = [ctypes.c_int, p, p, p, i64, i64, p]
    lib.native_widen.restype = None
    lib.native_simd.restype = ctypes.c_int
    lib.native_vnni.restype = ctypes.c_int
    lib.native_rms_norm_rows.argtypes = [p, p, p, i64, i64, ctypes.c_float]
    lib.native_rms_norm_rows.restype = None
    lib.native_rope_rows.argtypes = [p, i64, i64, i64, i64, p, p]
    lib.native_rope_rows.restype = None
    lib.native_silu_mul_rows.argtypes = [p, p, i64]
    lib.native_silu_mul_rows.restype = None
    lib.native_quantize_rows.argtypes = [p, i64, i64, p, p, p]
    lib.native_quantize_rows.restype = None
    lib.native_linear_q8.argtypes = [p, p, p, p, p, p, p, i64, i64, i64]
    lib.native_linear_q8.restype = None
    lib.native_decode.argtypes = [p, p, i64, p, p, p, p, i64, p, p]
    lib.native_decode.restype = ctypes.c_int
    lib.native_decode_workspace.argtypes = [p, i64, i64]
    lib.native_decode_workspace.restype = i64
    lib.native_attention.argtypes = [p, i64, p, p, i64, i64, i64, i64, p, p, i64, p, i64, p, ctypes.c_int]
    lib.native_f16.restype = ctypes.c_int
    lib.native_attention.restype = ctypes.c_int
    lib.native_prefill_attention.argtypes = [p, i64, p, i64, p, i64, i64, i64, i64, i64, i64, p, i64, p]
    lib.native_prefill_attention.restype = ctypes.c_int
    lib.native_sparse_attention.argtypes = [p, i64, p, i64, p, i64, i64, i64, i64, i64, i64, p, i64, i64, i64, p, p,
                                            p, p, i64, ctypes.c_int]  # fmt: skip
    lib.native_sparse_attention.restype = ctypes.c_int
    lib.native_estimate_scores.argtypes = [p, i64, i64, p, i64, i64, i64, i64, i64, p, p, p]
    lib.native_estimate_scores.restype = ctypes.c_int
    lib.native_tile_scores.argtypes = [p, i64, i64, p, i64, i64, i64, i64, i64, i64, i64, p, p, ctypes.c_float, p]
    lib.native_tile_scores.restype = ctypes.c_int
    lib.native_tile_keys.argtypes = [p, p, p, p, i64, i64, i64, i64, i64, i64, i64, p, p, p]
    lib.native_tile_keys.restype = i64
    lib.native_mask_logits.argtypes = [p, i64, p, i64, p, i64, i64]
    lib.native_mask_logits.restype = None
    lib.native_lora.argtypes = [p, i64, i64, i64, p, p, i64, i64, i64]
    lib.native_lora.restype = None
    return lib


# Prefill chunks of at least this many rows run their norms, rotary embedding and SiLU in C, rows in parallel
# (torch's operators run them on one thread here; decode-sized calls are bound by the operator count instead)
ELEMENTWISE_ROWS = 64


def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [m, n] float32 contiguous (CPU) -> x * weight / sqrt(mean(x^2) + eps) per row, in C."""
    y = torch.empty_like(x)
    library().native_rms_norm_rows(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1], eps)
    return y


def rope_rows_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Rotary embedding in place over x [m, H, D] (float32, each row's H * D floats contiguous, rows at any
    stride); cos/sin [m, D] contiguous (model.rope_tables' rows). False (x untouched) where the layout or the head
    size (even, at most 512: the kernel's scratch) does not fit, so the caller can fall back."""
    m, heads, dim = x.shape
    if x.stride(2) != 1 or x.stride(1) != dim or not (cos.is_contiguous() and sin.is_contiguous()):
        return False
    if dim % 2 or dim > 512 or cos.shape != (m, dim) or sin.shape != (m, dim):
        return False
    library().native_rope_rows(x.data_ptr(), x.stride(0), m, heads, dim, cos.data_ptr(), sin.data_ptr())
    return True


def mask_logits_(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Structured outputs: -inf in logits[rows[i]] (float32, CPU, unit column stride) for every token whose bit is
    clear in bitmask[i] ([n, words] int32, contiguous; rows int64)."""
    library().native_mask_logits(
        logits.data_ptr(), logits.stride(0), rows.data_ptr(), rows.numel(), bitmask.data_ptr(), bitmask.shape[1],
        logits.shape[1],
    )  # fmt: skip


def silu_mul_(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """g = silu(g) * u in place (float32, contiguous, same shape). Returns g."""
    if g.shape != u.shape or not (g.is_contiguous() and u.is_contiguous()):
        raise ValueError("silu_mul_: g and u must be contiguous and of one shape")
    library().native_silu_mul_rows(g.data_ptr(), u.data_ptr(), g.numel())
    return g


def kv_float16() -> bool:
    """Whether the decode kernels read a float16 KV cache here (F16C conversions; every AVX2 CPU has them)."""
    try:
        return bool(library().native_f16())
    except NativeUnavailable:
        return False


def kv_dtypes() -> tuple[torch.dtype, ...]:
    """The KV cache element types the native decode kernels read here."""
    return (torch.float32, torch.float16) if kv_float16() else (torch.float32,)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    lens: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Attention of single-token queries over the paged cache, in C: out[r] = attention of q[r] ([heads, D]) over
    the keys and values at slots[r, :lens[r]] of the caches ([slots, kv heads, D]; query head h reads KV head
    h // (heads / kv heads)). All on CPU: q and out float32 (row-strided views with contiguous heads are fine), the
    caches float32, or float16 where `kv_float16()` (converted on load: half the bytes a step reads).

    The torch way gathers every row's K and V out of the cache into padded tensors and then runs SDPA: at 32
    sequences that is ~20 ms of a ~100 ms decode step on 2 cores; this reads the cache where it is.
    """
    m, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    for t in (q, out):
        if t.dtype != torch.float32 or t.device.type != "cpu" or t.stride(2) != 1 or t.stride(1) != dim:
            raise ValueError("decode_attention needs float32 CPU tensors with contiguous heads")
    for t in (k_cache, v_cache):
        if t.dtype != k_cache.dtype or t.device.type != "cpu" or not t.is_contiguous() or t.shape[2] != dim:
            raise ValueError("decode_attention needs contiguous CPU caches of the queries' head size")
    if k_cache.dtype not in kv_dtypes():
        raise ValueError(f"decode_attention takes {' or '.join(map(str, kv_dtypes()))} caches, not {k_cache.dtype}")
    if out.shape != q.shape or slots.shape[0] != m or lens.shape != (m,):
        raise ValueError("decode_attention: queries, outputs, slots and lengths disagree on the number of rows")
    slots, lens = slots.to(torch.int64).contiguous(), lens.to(torch.int64).contiguous()
    scores = torch.empty(m * heads * slots.shape[1], dtype=torch.float32)
    rc = library().native_attention(
        q.data_ptr(),
        q.stride(0),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        m,
        heads,
        kv_heads,
        dim,
        slots.data_ptr(),
        lens.data_ptr(),
        slots.shape[1],
        out.data_ptr(),
        out.stride(0),
        scores.data_ptr(),
        int(k_cache.dtype == torch.float16),
    )
    if rc == -2:
        raise MemoryError("decode_attention: no memory for its scratch")
    if rc != 0:
        raise ValueError("decode_attention: heads not a multiple of KV heads, or a length outside 1..slots")


def _prefill_keys(lanes: int, capability: str) -> int:
    """Longest context for which the engine runs a dense prefill chunk's attention in C (`prefill_attention`; the
    sparse path's dense groups too) rather than torch's flash kernel (bottom-right causal split), given our kernels'
    vector width in floats and torch's CPU capability. `optimist bench cpu-attention` (SmolLM2's 9/3 heads, a
    2,048-row chunk, 2 cores; results/cpu-attention*.md): at the same width (AVX2 both, or AVX-512 both) ours are
    1.8-2x at up to 512 keys, 1.1-1.4x at 2-7K, 0.9-1.07x at 16K; ours 8-wide beside torch's AVX-512 (built with
    OPTIMIST_NATIVE_FLAGS=-mno-avx512f) 1.4-1.5x at up to 512 keys, 0.77x at 2K, 0.62x at 7K."""
    return 1024 if lanes < 16 and capability.startswith("AVX512") else 8192


@functools.cache
def prefill_keys() -> int:
    """`_prefill_keys` for the kernels built here (0 where they cannot be built: the callers fall back anyway)."""
    try:
        lanes = library().native_simd()
    except NativeUnavailable:
        return 0
    return _prefill_keys(lanes, torch.backends.cpu.get_cpu_capability())


def _chunk_tensors_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> bool:
    """What the prefill kernels take: float32 CPU tensors with contiguous heads (rows may be strided), out shaped
    like q [n, heads, D], k and v alike [L, kv heads, D] with 0 < n <= L."""
    dim = q.shape[2]
    for t in (q, k, v, out):
        if t.dtype != torch.float32 or t.device.type != "cpu" or t.stride(2) != 1 or t.stride(1) != dim:
            return False
    return out.shape == q.shape and v.shape == k.shape and k.shape[2] == dim and 0 < q.shape[0] <= k.shape[0]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> bool:
    """Causal attention of a prefill chunk in C: q [n, heads, D] at the last n of the L positions of k/v
    [L, kv heads, D] (query i sees keys 0 .. L - n + i; query head h reads KV head h // (heads / kv heads)),
    written into out [n, heads, D]. float32 CPU tensors with contiguous heads; rows may be strided (views of a
    packed QKV). Returns False, touching nothing, for what the kernel does not take (no AVX2; a head size not a
    multiple of 8 or above 512; more than 12 query heads per KV head), so the caller can fall back."""
    n, heads, dim = q.shape
    length, kv_heads = k.shape[0], k.shape[1]
    if not _chunk_tensors_ok(q, k, v, out):
        return False
    scratch = torch.empty(kv_heads * dim * (-(-length // 16) * 16), dtype=torch.float32)
    rc = library().native_prefill_attention(
        q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), n, length, heads,
        kv_heads, dim, out.data_ptr(), out.stride(0), scratch.data_ptr(),
    )  # fmt: skip
    return rc == 0


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    group: int,
    tile: int,
    keys: torch.Tensor,
    counts: torch.Tensor,
) -> bool:
    """Sparse prefill attention of KV head `group`'s query heads in C: q/k/v/out as `prefill_attention`; the chunk's
    rows in tiles of `tile`, tile t attending to the key positions keys[first[t] : first[t] + counts[t]] (first the
    running sum of counts; ascending, each before the tile's end) with causal masking, written into out's rows for
    those heads. Returns False, touching nothing, for what the kernel does not take."""
    n, heads, dim = q.shape
    length, kv_heads = k.shape[0], k.shape[1]
    if not _chunk_tensors_ok(q, k, v, out):
        return False
    if tile < 1 or not 0 <= group < kv_heads or counts.shape != (-(-n // tile),) or int(counts.sum()) != len(keys):
        return False
    if len(keys) and not (int(keys.min()) >= 0 and int(keys.max()) < length):  # the kernel reads where they point
        return False
    keys, counts = keys.to(torch.int64).contiguous(), counts.to(torch.int64).contiguous()
    first = (torch.cumsum(counts, 0) - counts).contiguous()
    threads = torch.get_num_threads()
    per_thread = 2 * dim * (-(-int(counts.max()) // 16) * 16)  # a tile's keys transposed, then its values
    scratch = torch.empty(threads * per_thread, dtype=torch.float32)
    rc = library().native_sparse_attention(
        q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), n, length, heads,
        kv_heads, dim, out.data_ptr(), out.stride(0), group, tile, first.data_ptr(), counts.data_ptr(),
        keys.data_ptr(), scratch.data_ptr(), per_thread, threads,
    )  # fmt: skip
    return rc == 0


def estimate_scores(
    q_last: torch.Tensor, k: torch.Tensor, slashes: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """`estimate.vertical_slash_scores` (slashes) or `estimate.vertical_scores` in C: q_last [H, m, D] are H query
    heads' vectors at the last m positions of k [L, D] (one KV head); returns (vertical [H, L], slash [H, L] or
    None). float32 CPU tensors with contiguous vectors (strided heads, rows and keys are fine). None, touching
    nothing, for what the kernel does not take, so the caller can fall back.

    The torch way materializes the [H, m, L] scores and probabilities (5.5 MB each at 7K keys) and passes over
    them several times: ~9-12 ms per call for SmolLM2's 3 heads and 64 rows at 7K keys on 2 cores; this ~2.3 ms."""
    heads, m, dim = q_last.shape
    length = k.shape[0]
    for t in (q_last, k):
        if t.dtype != torch.float32 or t.device.type != "cpu" or t.stride(-1) != 1:
            return None
    if k.shape[1] != dim or not 0 < m <= length:
        return None
    vertical = torch.empty((heads, length), dtype=torch.float32)
    slash = torch.empty((heads, length), dtype=torch.float32) if slashes else None
    scratch = torch.empty(dim * (-(-length // 16) * 16), dtype=torch.float32)
    rc = library().native_estimate_scores(
        q_last.data_ptr(), q_last.stride(0), q_last.stride(1), k.data_ptr(), k.stride(0), heads, m, length, dim,
        vertical.data_ptr(), None if slash is None else slash.data_ptr(), scratch.data_ptr(),
    )  # fmt: skip
    return (vertical, slash) if rc == 0 else None


def tile_scores(
    q: torch.Tensor, k: torch.Tensor, tile: int, rows: int, share: float | None = None
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Query-aware estimation in C: q [n, H, D] a prefill chunk's queries (H heads of one KV group, positions
    L - n ..), k [L, D]: per tile of `tile` rows, its last `rows` rows' causal softmax summed over them and the heads,
    [tiles, L] float32; with `share`, per tile also a threshold [tiles]: the scores at or above it hold at least that
    share of the tile's total, and it is within 1/16 of the largest such. None, touching nothing, for what the
    kernel does not take (as estimate_scores)."""
    n, heads, dim = q.shape
    length = k.shape[0]
    for t in (q, k):
        if t.dtype != torch.float32 or t.device.type != "cpu" or t.stride(-1) != 1:
            return None
    if k.shape[1] != dim or not 0 < n <= length or tile < 1 or rows < 1:
        return None
    tiles = -(-n // tile)
    out = torch.empty((tiles, length), dtype=torch.float32)
    thresholds = torch.empty(tiles, dtype=torch.float32) if share is not None else None
    scratch = torch.empty(dim * (-(-length // 16) * 16), dtype=torch.float32)
    rc = library().native_tile_scores(
        q.data_ptr(), q.stride(1), q.stride(0), k.data_ptr(), k.stride(0), heads, n, length - n, dim, tile, rows,
        out.data_ptr(), scratch.data_ptr(), share or 0.0, None if thresholds is None else thresholds.data_ptr(),
    )  # fmt: skip
    return (out, thresholds) if rc == 0 else None


def tile_keys(
    columns: torch.Tensor,
    offsets: torch.Tensor,
    tiles: torch.Tensor | None,
    blocks: torch.Tensor | None,
    block: int,
    q_start: int,
    n: int,
    tile: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """A sparse selection's key lists per tile of a prefill chunk (rows at positions q_start .. q_start + n - 1 of
    L = q_start + n keys), in C: the kept keys of `prefill.key_matrix` tile by tile (columns and offsets bool [L];
    query-aware tiles bool [tiles, L] or None; kept key blocks bool [query blocks, key blocks] of `block` keys, or
    None), as (keys int64, counts int64 [tiles], first int64 [tiles], (row, key) pairs visited with key <= row):
    what `sparse_attention` takes, without the [tiles, L] matrix. None, touching nothing, where the library is
    missing or the arguments do not fit."""
    length = q_start + n
    num_tiles = -(-n // tile) if tile > 0 else 0
    if (
        q_start < 0 or n < 1 or tile < 1 or columns.shape != (length,) or offsets.shape != (length,)
        or (tiles is not None and tiles.shape != (num_tiles, length))
    ):  # fmt: skip
        return None
    try:
        lib = library()
    except NativeUnavailable:
        return None

    def u8(t: torch.Tensor) -> torch.Tensor:
        return t.to(device="cpu", dtype=torch.bool).contiguous().view(torch.uint8)

    flags = [u8(columns), u8(offsets), None if tiles is None else u8(tiles), None if blocks is None else u8(blocks)]
    rows, key_blocks = (0, 0) if blocks is None else blocks.shape
    keys = torch.empty(num_tiles * length, dtype=torch.int64)
    counts, first = torch.empty(num_tiles, dtype=torch.int64), torch.empty(num_tiles, dtype=torch.int64)
    pairs = lib.native_tile_keys(
        *(None if f is None else f.data_ptr() for f in flags), rows, key_blocks, block, length, q_start, n, tile,
        keys.data_ptr(), counts.data_ptr(), first.data_ptr(),
    )  # fmt: skip
    if pairs < 0:
        return None
    return keys[: int(first[-1] + counts[-1])], counts, first, int(pairs)


def widen(weight: NativeWeight) -> torch.Tensor:
    """The matrix as float32 [n, k], widened by the kernels (w = d * q + z per block; d * q is exact in float32, so
    these are the values the gguf package's dequantization gives)."""
    n, k = weight.shape
    q = np.ascontiguousarray(weight.q).view(np.uint8)
    d = np.ascontiguousarray(weight.d, dtype=np.float32)
    z = None if weight.z is None else np.ascontiguousarray(weight.z, dtype=np.float32)
    return _widen(library(), weight.kind, q.ctypes.data, d.ctypes.data, None if z is None else z.ctypes.data, n, k)


def _widen(lib: ctypes.CDLL, kind: int, q: int, d: int, z: int | None, n: int, k: int) -> torch.Tensor:
    """native_widen of the blocks at addresses q, d, z (kind and layouts as native_linear) into a new [n, k]."""
    w = torch.empty((n, k), dtype=torch.float32)
    lib.native_widen(kind, q, d, z, n, k, w.data_ptr())
    return w


def unavailable_reason() -> str | None:
    """None where the vectorised kernels run here, else why not (no compiler, no AVX2/FMA, ...)."""
    try:
        lib = library()
    except NativeUnavailable as exc:
        return str(exc)
    if not lib.native_simd():
        return f"the native CPU kernels have no vectorised path for this CPU ({platform.machine()}; they need AVX2+FMA)"
    return None


def int8_supported(weight: NativeWeight) -> bool:
    """Whether prefill GEMMs over `weight` can take int8 activations here (VNNI, 4-bit blocks, pairs of 16-row
    panels)."""
    return weight.kind == 4 and weight.shape[0] % 32 == 0 and bool(library().native_vnni())


def supported_type(ggml_type: int) -> bool:
    return ggml_type in (_Q4_0, _Q4_1, _Q8_0)


@dataclass
class NativeWeight:
    """W[n, k] in planar blocks: kind 4 (w = d * q + z, q in 0..15) or 8 (w = d * q, q in -128..127)."""

    kind: int
    q: np.ndarray  # uint8 [n, k / 2] (kind 4) or int8 [n, k] (kind 8), planar within each block
    d: np.ndarray  # float32 [n, k / 32]
    z: np.ndarray | None  # float32 [n, k / 32] (kind 4)

    @property
    def shape(self) -> tuple[int, int]:
        return self.d.shape[0], self.d.shape[1] * GROUP

    @classmethod
    def from_gguf(cls, raw: np.ndarray, ggml_type: int, n: int, k: int) -> NativeWeight:
        """From a tensor's raw blocks (uint8 [n, bytes per row]) stored as Q4_0, Q4_1 or Q8_0; exact."""
        if k % GROUP:
            raise ValueError(f"row length {k} is not a multiple of {GROUP}")
        nb = k // GROUP
        blocks = np.ascontiguousarray(raw).reshape(n, nb, -1)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        if ggml_type == _Q8_0:
            q8 = blocks[..., 2:34].copy().view(np.int8)
            planar = np.empty_like(q8)
            planar[..., Q8_BYTE] = q8
            return cls(8, planar.reshape(n, k), d, None)
        if ggml_type not in (_Q4_0, _Q4_1):
            raise ValueError(f"GGML type {ggml_type} has no native kernel (Q4_0, Q4_1 and Q8_0 do)")
        qs = blocks[..., 4:20] if ggml_type == _Q4_1 else blocks[..., 2:18]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # GGUF: low nibbles are elements 0..15
        z = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if ggml_type == _Q4_1 else -8 * d
        return cls.from_q4(q.reshape(n, k), d, z)

    @classmethod
    def from_q4(cls, q: np.ndarray, d: np.ndarray, z: np.ndarray) -> NativeWeight:
        """From 4-bit values q [n, k] (0..15) with w = d * q + z per block of 32."""
        n, k = q.shape
        blocks = q.reshape(n, k // GROUP, GROUP).astype(np.uint8)
        planar = blocks[..., _Q4_LOW] | (blocks[..., _Q4_HIGH] << 4)
        return cls(4, planar.reshape(n, k // 2), d.astype(np.float32), z.astype(np.float32))

    def dequantize(self) -> np.ndarray:
        n, k = self.shape
        nb = k // GROUP
        if self.kind == 8:
            q = self.q.reshape(n, nb, GROUP)[..., Q8_BYTE].astype(np.float32)
            return (q * self.d[..., None]).reshape(n, k)
        q = self.values().reshape(n, nb, GROUP).astype(np.float32)
        assert self.z is not None
        return (q * self.d[..., None] + self.z[..., None]).reshape(n, k)

    def values(self) -> np.ndarray:
        """The 4-bit values q [n, k] (0..15) of a kind-4 matrix, in the file's element order."""
        if self.kind != 4:
            raise ValueError("only 4-bit blocks have 4-bit values")
        n, k = self.shape
        planar = self.q.reshape(n, k // GROUP, GROUP // 2)
        return ((planar[..., Q4_BYTE] >> Q4_SHIFT) & 0x0F).reshape(n, k)

    def map_rows(self, fn: Callable[[np.ndarray], np.ndarray]) -> NativeWeight:
        """Applies one row permutation to every per-row array."""
        return NativeWeight(self.kind, fn(self.q), fn(self.d), None if self.z is None else fn(self.z))

    @staticmethod
    def concat(weights: list[NativeWeight]) -> NativeWeight:
        """Stacks matrices along the output dimension (the fused QKV projection); they must share a kind."""
        kinds = {w.kind for w in weights}
        if len(kinds) != 1:
            raise ValueError("cannot fuse matrices stored with different block types")
        zs = [w.z for w in weights]
        return NativeWeight(
            weights[0].kind,
            np.concatenate([w.q for w in weights]),
            np.concatenate([w.d for w in weights]),
            None if any(z is None for z in zs) else np.concatenate(zs),  # type: ignore[arg-type]
        )


# Calls of at least this many rows (prefill chunks) widen a layer's blocks to float32 for the call and run torch's
# float32 GEMM: widening SmolLM2's largest matrix takes ~0.06 ms, and at 2,048 rows that GEMM (MKL) takes 0.84-0.87
# of fbgemm's float16 one on a 2-core AVX-512 CPU (even at 256-512 rows, behind at 64: 1.3x); on AVX2 they run about
# even from 512 rows. The weights are then exactly the file's, where the float16 copy rounds them.
WIDEN_ROWS = 1024


Q8_ROWS = 6  # activation rows per tile of native_linear_q8 (native.c)


@dataclass
class Int8Panels:
    """A 4-bit matrix packed for native_linear_q8: per panel of 16 output rows and block of 32, 4 x 64 bytes (byte
    4 r + u of vector j: q[r, 4 j + u] in the low nibble, q[r, 16 + 4 j + u] in the high one), and the panel's
    16 scales and offsets per block."""

    q: torch.Tensor  # uint8 [n / 16, k / 32, 4, 64]
    d: torch.Tensor  # float32 [n / 16, k / 32, 16]
    z: torch.Tensor  # float32 [n / 16, k / 32, 16]

    @classmethod
    def pack(cls, weight: NativeWeight) -> Int8Panels:
        n, k = weight.shape
        if weight.kind != 4 or n % 32:
            raise ValueError(f"int8 panels need 4-bit blocks and a multiple of 32 rows, got kind {weight.kind}, {n}")
        assert weight.z is not None
        nb = k // GROUP
        q = weight.values().reshape(n // 16, 16, nb, 2, 4, 4)  # panel, row, block, half, j, u
        packed = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).transpose(0, 2, 3, 1, 4).reshape(n // 16, nb, 4, 64)

        def per_panel(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a.reshape(n // 16, 16, nb).transpose(0, 2, 1), np.float32))

        return cls(torch.from_numpy(np.ascontiguousarray(packed, np.uint8)), per_panel(weight.d), per_panel(weight.z))


def linear_int8(lib: ctypes.CDLL, panels: Int8Panels, x: torch.Tensor) -> torch.Tensor:
    """x [m, k] (float32, contiguous) @ W.T with each block of 32 activations rounded to int8 (native.c)."""
    m, k = x.shape
    n = panels.q.shape[0] * 16
    nb = k // GROUP
    xq = torch.empty(((m + Q8_ROWS - 1) // Q8_ROWS * Q8_ROWS, k), dtype=torch.int8)
    dx = torch.empty((m, nb), dtype=torch.float32)
    sx = torch.empty((m, nb), dtype=torch.float32)
    y = torch.empty((m, n), dtype=torch.float32)
    lib.native_quantize_rows(x.data_ptr(), m, k, xq.data_ptr(), dx.data_ptr(), sx.data_ptr())
    lib.native_linear_q8(
        panels.q.data_ptr(), panels.d.data_ptr(), panels.z.data_ptr(), xq.data_ptr(), dx.data_ptr(), sx.data_ptr(),
        y.data_ptr(), m, n, k,
    )  # fmt: skip
    return y


_int8 = threading.local()


@contextlib.contextmanager
def int8_rows(ranges: list[tuple[int, int]]) -> Iterator[None]:
    """Within: calls of layers with int8 panels round the activations of rows [start, stop) to int8 (the chunks of
    long prompts, Llama.forward); the step's other rows keep their exact path."""
    was = getattr(_int8, "ranges", [])
    _int8.ranges = ranges
    try:
        yield
    finally:
        _int8.ranges = was


class NativeLinear(nn.Module):
    """y = x @ W.T over W's blocks for calls of up to `native_rows` rows (decode steps), `fallback` above that, and
    torch's float32 GEMM over the widened blocks from WIDEN_ROWS rows.

    Up to four rows, each block is widened once for all of them; more rows widen each weight row once into a small
    float panel that every row reads from L1 (native.c). Measured on a 2-core AVX2 CPU with SmolLM2's shapes against
    fbgemm's float16 GEMM: 0.5-0.65x its time at one row, ~0.75x at four and eight, even at 12 to 64, 1.1x at 2,048.
    The engine's decode steps run in the native decoder; this layer serves the torch layers (prefill chunks and
    mixed steps), so calls above four rows go to the fallback by default.
    """

    def __init__(
        self, weight: NativeWeight, fallback: nn.Module | None = None, native_rows: int = 4, int8: bool = False
    ) -> None:
        super().__init__()
        # prefill-sized calls with int8 activations (native_linear_q8) where the CPU has VNNI and the layout fits
        self.panels = Int8Panels.pack(weight) if int8 and int8_supported(weight) else None
        self.lib = library()
        self.out_features, self.in_features = weight.shape
        self.kind = weight.kind
        self.q = torch.from_numpy(np.ascontiguousarray(weight.q).view(np.uint8))
        self.d = torch.from_numpy(np.ascontiguousarray(weight.d, dtype=np.float32))
        self.z = None if weight.z is None else torch.from_numpy(np.ascontiguousarray(weight.z, dtype=np.float32))
        self.fallback = fallback
        self.native_rows = native_rows

    def widened(self) -> torch.Tensor:
        """The weights as float32 [out, in], widened from the blocks now (for one call's GEMM; not kept)."""
        z = None if self.z is None else self.z.data_ptr()
        return _widen(self.lib, self.kind, self.q.data_ptr(), self.d.data_ptr(), z, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ranges = getattr(_int8, "ranges", None)
        if ranges and self.panels is not None and x.dtype == torch.float32 and x.dim() == 2:
            return self._with_int8_rows(x, ranges)
        return self._exact(x)

    def _with_int8_rows(self, x: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
        """int8 activations for rows in `ranges`, the exact path for the others (decodes and short prompts)."""
        assert self.panels is not None
        m = x.shape[0]
        if ranges == [(0, m)]:
            return linear_int8(self.lib, self.panels, x.contiguous())
        y = torch.empty((m, self.out_features), dtype=torch.float32)
        chosen = torch.zeros(m, dtype=torch.bool)
        for start, stop in ranges:
            y[start:stop] = linear_int8(self.lib, self.panels, x[start:stop].contiguous())
            chosen[start:stop] = True
        rest = (~chosen).nonzero().flatten()
        if len(rest):
            y[rest] = self._exact(x[rest])
        return y

    def _exact(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        if m > self.native_rows and self.fallback is not None:
            if m >= WIDEN_ROWS and x.dtype == torch.float32:
                return F.linear(x, self.widened())
            return self.fallback(x)
        if x.dtype != torch.float32 or not x.is_contiguous():
            return self._exact(x.float().contiguous()).to(x.dtype)
        y = torch.empty((m, self.out_features), dtype=torch.float32)
        scratch = torch.empty(m * self.in_features // GROUP, dtype=torch.float32) if self.kind == 4 else None
        rc = self.lib.native_linear(
            self.kind,
            self.q.data_ptr(),
            self.d.data_ptr(),
            None if self.z is None else self.z.data_ptr(),
            x.data_ptr(),
            y.data_ptr(),
            m,
            self.out_features,
            self.in_features,
            None if scratch is None else scratch.data_ptr(),
        )
        if rc != 0:
            raise MemoryError("native_linear: no memory for its weight panels")
        return y


# ------------------------------------------------------------------------------------- whole decode steps

_p, _i64 = ctypes.c_void_p, ctypes.c_int64


class _QWeight(ctypes.Structure):
    _fields_ = [("kind", _i64), ("q", _p), ("d", _p), ("z", _p), ("n", _i64), ("k", _i64)]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("attn_norm", _p),
        ("ffn_norm", _p),
        ("wqkv", _QWeight),
        ("wo", _QWeight),
        ("gate", _QWeight),
        ("up", _QWeight),
        ("down", _QWeight),
        ("k_cache", _p),
        ("v_cache", _p),
    ]


class _LoraPair(ctypes.Structure):
    _fields_ = [("a", _p), ("bt", _p), ("r", _i64)]


class _Lora(ctypes.Structure):
    _fields_ = [("n_adapters", _i64), ("starts", _p), ("rows", _p), ("pairs", ctypes.POINTER(_LoraPair)),
                ("max_rank", _i64), ("t", _p), ("half", _i64)]  # fmt: skip


def _lora_pairs(adapter: LoraAdapter, n_layers: int) -> ctypes.Array[_LoraPair]:
    """An adapter's updates as native_decode reads them ([n_layers][5], lora.SLOTS' order; A and B transposed
    kept contiguous on the adapter, in float16 where the kernels convert it: half the bytes a decode step reads, each
    weight rounded to 11 significant bits, as the float16 KV cache), built once per adapter."""
    if adapter.native is not None:
        return adapter.native[0]
    pairs = (_LoraPair * (n_layers * len(SLOTS)))()
    keep = []
    for layer, updates in enumerate(adapter.weights):
        for i, slot in enumerate(SLOTS):
            if slot in updates:
                a, b = updates[slot]
                dtype = torch.float16 if _lora_half() else torch.float32
                a, bt = a.to(dtype).contiguous(), b.to(dtype).t().contiguous()
                keep += [a, bt]
                pairs[layer * len(SLOTS) + i] = _LoraPair(a.data_ptr(), bt.data_ptr(), a.shape[0])
    adapter.native = (pairs, keep)  # (keep: what the pointers point into)
    return pairs


def _lora_half() -> int:
    """Whether the C decoder keeps adapters in float16 (1) or float32 (0): float16 where F16C converts it."""
    return int(kv_float16())


def _lora_table(batch: LoraBatch, m: int, n_layers: int) -> _Lora | None:
    """The step's adapters as the C updates read them (built once per step, kept on the batch with what its
    pointers point into; the decoder and the torch layers' calls share it), or None where one is not on the CPU."""
    if batch.native is None:
        batch.native = False
        if all(a.device.type == "cpu" for a, _ in batch.parts):
            size = n_layers * len(SLOTS)
            table = (_LoraPair * (size * len(batch.parts)))()
            for index, (adapter, _) in enumerate(batch.parts):
                ctypes.memmove(ctypes.byref(table, index * size * ctypes.sizeof(_LoraPair)),
                               _lora_pairs(adapter, n_layers), size * ctypes.sizeof(_LoraPair))  # fmt: skip
            rows = torch.tensor([i for _, idx in batch.parts for i in idx], dtype=torch.int64)
            starts = torch.tensor([0, *itertools.accumulate(len(idx) for _, idx in batch.parts)], dtype=torch.int64)
            width = max(a.width for a, _ in batch.parts)
            scratch = torch.empty(m * width, dtype=torch.float32)
            pairs = ctypes.cast(table, ctypes.POINTER(_LoraPair))
            lora = _Lora(len(batch.parts), starts.data_ptr(), rows.data_ptr(), pairs, width, scratch.data_ptr(),
                         _lora_half())  # fmt: skip
            batch.native = (lora, [starts, rows, table, scratch])
    return batch.native[0] if batch.native else None


LORA_ROWS = 64  # most rows whose adapter updates LoraLinear runs in C (more: torch's GEMMs, which block the rows)


def lora_linear_(batch: LoraBatch, n_layers: int, layer: int, slot: str, x: torch.Tensor, y: torch.Tensor) -> bool:
    """y += the step's adapter updates of one linear layer, in C (one call for every adapter; the decoder's code
    and float16 weights, so an int4 engine's prefill and decode steps compute the same), where it takes the call:
    CPU float32 contiguous tensors of at most LORA_ROWS rows. Returns whether it did."""
    m = x.shape[0]
    if m > LORA_ROWS or x.dtype != torch.float32 or y.dtype != torch.float32 or x.device.type != "cpu":
        return False
    if not (x.is_contiguous() and y.is_contiguous()):
        return False
    lora = _lora_table(batch, m, n_layers)
    if lora is None:
        return False
    library().native_lora(ctypes.byref(lora), n_layers, layer, SLOTS.index(slot), x.data_ptr(), y.data_ptr(), m,
                          x.shape[1], y.shape[1])  # fmt: skip
    return True


class _Model(ctypes.Structure):
    _fields_ = [
        ("n_layers", _i64),
        ("hidden", _i64),
        ("inter", _i64),
        ("n_heads", _i64),
        ("n_kv", _i64),
        ("head_dim", _i64),
        ("eps", ctypes.c_float),
        ("rope_cos", _p),
        ("rope_sin", _p),
        ("layers", ctypes.POINTER(_Layer)),
        ("kv_half", _i64),
    ]


def _qweight(layer: nn.Module) -> _QWeight:
    assert isinstance(layer, NativeLinear)
    z = layer.z.data_ptr() if layer.z is not None else None
    return _QWeight(layer.kind, layer.q.data_ptr(), layer.d.data_ptr(), z, layer.out_features, layer.in_features)


class NativeDecoder:
    """Runs the layers of a decode step of up to `max_rows` sequences in one C call (`native_decode`).

    At batch 1 the ~20 torch operators of a layer cost more than its matmuls; measured with the default model on a
    2-core CPU, a single stream decodes ~3x faster than with torch's layers over the same kernels.

    Built over a model whose linear layers are all NativeLinear and over the engine's KV cache (float32, CPU): the
    C side holds raw pointers to both, so this object keeps them alive and must be rebuilt if either changes.
    """

    # Measured on a 2-core AVX2 CPU with the default model, time of a decode step at 120 tokens of context against
    # the torch layers (fbgemm's float16 GEMMs, decode attention in C): 0.57-0.65x at 8-12 sequences, 0.77x at 32,
    # 0.86x at 64, even at 128. The engine runs at most max_num_seqs (default 64) sequences per step.
    max_rows = 64

    def __init__(self, model: Llama, kv_cache: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.lib = library()
        config = model.config
        self.kv_cache = kv_cache
        self.model = model
        layers = (_Layer * config.num_layers)()
        kv_dtype = kv_cache[0][0].dtype
        if kv_dtype not in kv_dtypes():
            raise ValueError(
                f"the native decoder takes a {' or '.join(map(str, kv_dtypes()))} KV cache, not {kv_dtype}"
            )
        for i, (block, (k, v)) in enumerate(zip(model.blocks(), kv_cache, strict=True)):
            for t in (k, v, block.attn_norm.weight, block.ffn_norm.weight):
                want = kv_dtype if t is k or t is v else torch.float32
                if t.dtype != want or t.device.type != "cpu" or not t.is_contiguous():
                    raise ValueError("the native decoder needs contiguous CPU tensors: float32 weights, one KV dtype")
            layers[i] = _Layer(
                block.attn_norm.weight.data_ptr(),
                block.ffn_norm.weight.data_ptr(),
                _qweight(block.attn.wqkv),
                _qweight(block.attn.wo),
                _qweight(block.mlp.w_gate),
                _qweight(block.mlp.w_up),
                _qweight(block.mlp.w_down),
                k.data_ptr(),
                v.data_ptr(),
            )
        self.layers = layers
        self.struct = _Model(
            config.num_layers,
            config.hidden_size,
            config.intermediate_size,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            config.rms_norm_eps,
            model.rope_cos.data_ptr(),
            model.rope_sin.data_ptr(),
            layers,
            int(kv_dtype == torch.float16),
        )
        self.ptr = ctypes.byref(self.struct)

    @staticmethod
    def supports(model: Llama) -> bool:
        """Whether every linear layer of `model` reads native blocks (weights=int4 on a fully quantized file)."""
        config = model.config
        if config.head_dim > 512 or config.num_heads % config.num_kv_heads or config.attention_bias:
            return False  # (the C decoder adds no Q/K/V bias)
        linears = [getattr(owner, attr) for b in model.blocks() for owner, attr in b.linears()]
        return all(isinstance(layer, NativeLinear) for layer in linears)

    def run(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        slots: torch.Tensor,
        lens: torch.Tensor,
        lora: LoraBatch | None = None,
    ) -> torch.Tensor | None:
        """x [m, hidden] embeddings -> last hidden states (in place); slots [m, max_len] int64, lens [m] int64;
        `lora`: rows with LoRA adapters. None where the adapters are not ones the C side takes."""
        m, max_len = slots.shape
        table = None
        if lora is not None:
            table = _lora_table(lora, m, self.model.config.num_layers)
            if table is None:
                return None  # (the torch layers take the step)
        work = torch.empty(self.lib.native_decode_workspace(self.ptr, m, max_len), dtype=torch.float32)
        rc = self.lib.native_decode(
            self.ptr,
            x.data_ptr(),
            m,
            positions.data_ptr(),
            slot_mapping.data_ptr(),
            slots.data_ptr(),
            lens.data_ptr(),
            max_len,
            work.data_ptr(),
            ctypes.byref(table) if table is not None else None,
        )
        if rc == -2:
            raise MemoryError("native_decode: no memory for its weight panels or attention scratch")
        if rc != 0:
            raise ValueError("the native decoder does not take this model's shapes")
        return x
