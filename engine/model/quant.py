"""Reduced-precision weight matmuls on CPU: int4 fed exactly from GGUF's Q4_0, Q4_1 and Q8_0 blocks, and float16.

A decode step on CPU is bound by memory bandwidth: float32 weights of a 135M model are 540 MB read per step.
torch's int4 CPU kernel (`_weight_int4pack_mm_for_cpu`) reads 4-bit weights with a float scale and zero per
group of 32, which is exactly GGUF's Q4_1 block (w = d*q + m, q in 0..15) and Q4_0 block (w = d*(q - 8)); a Q8_0
block (w = d*q, q in -128..127) is two such parts, q = 16*hi + lo. So the weights stay exact; what is approximate
is the kernel's bfloat16 activations and output (its float32 path is unvectorised and ~10x slower), as in
llama.cpp, which rounds activations to 8 bits. `--weights float` keeps the exact float32 path.

`--weights fp16` stores weights as float16 and runs fbgemm's GEMM, which widens them to float32 in registers:
activations, products and sums stay float32, so the only change is the weights' rounding (relative error at
most 2^-11). On AVX2 it is 1.8x float32 at 1 to 32 rows (half the bytes to read; 4x at 8 rows, where MKL's
float32 GEMM is slow), about as fast from 512 rows on, and faster than the int4 kernel at every row count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

GROUP = 32
_Q4_0, _Q4_1, _Q8_0 = 2, 3, 8  # GGML type ids


@dataclass
class Int4Part:
    """w[n, k] = (q - 8) * scale[group] + zero[group], q in 0..15, groups of 32 along k."""

    q: np.ndarray  # uint8 [n, k]
    scale: np.ndarray  # float32 [n, k / 32]
    zero: np.ndarray  # float32 [n, k / 32]

    def dequantize(self) -> np.ndarray:
        n, k = self.q.shape
        w = (self.q.astype(np.float32) - 8).reshape(n, k // GROUP, GROUP) * self.scale[..., None] + self.zero[..., None]
        return w.reshape(n, k)

    def map_rows(self, fn: Callable[[np.ndarray], np.ndarray]) -> Int4Part:
        """Applies one row permutation to every per-row array."""
        return Int4Part(fn(self.q), fn(self.scale), fn(self.zero))


def supported_type(ggml_type: int) -> bool:
    return ggml_type in (_Q4_0, _Q4_1, _Q8_0)


def parts_from_gguf(raw: np.ndarray, ggml_type: int, n: int, k: int) -> list[Int4Part]:
    """Decodes a tensor's raw blocks (uint8 [n, bytes per row]) into one (Q4) or two (Q8_0) exact int4 parts."""
    nb = k // GROUP
    blocks = np.ascontiguousarray(raw).reshape(n, nb, -1)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if ggml_type in (_Q4_0, _Q4_1):
        qs = blocks[..., 4:20] if ggml_type == _Q4_1 else blocks[..., 2:18]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, k)  # low nibbles are elements 0..15
        if ggml_type == _Q4_1:
            m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
            return [Int4Part(q, d, m + 8 * d)]
        return [Int4Part(q, d, np.zeros_like(d))]
    if ggml_type == _Q8_0:
        q8 = blocks[..., 2:34].copy().view(np.int8).astype(np.int16).reshape(n, k)
        lo = q8 & 0x0F
        hi = (q8 - lo) // 16  # -8..7
        return [
            Int4Part((hi + 8).astype(np.uint8), 16 * d, np.zeros_like(d)),
            Int4Part(lo.astype(np.uint8), d, 8 * d),
        ]
    raise ValueError(f"GGML type {ggml_type} has no exact int4 form")


def concat_rows(parts_list: list[list[Int4Part]]) -> list[Int4Part]:
    """Stacks several matrices' parts along the output dimension (for the fused QKV projection)."""
    depth = max(len(p) for p in parts_list)
    if any(len(p) != depth for p in parts_list):
        raise ValueError("cannot fuse matrices with different int4 part counts")
    return [
        Int4Part(
            np.concatenate([p[i].q for p in parts_list]),
            np.concatenate([p[i].scale for p in parts_list]),
            np.concatenate([p[i].zero for p in parts_list]),
        )
        for i in range(depth)
    ]


def int4_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


class Int4Linear(nn.Module):
    """y = x @ W.T with W held as packed int4 parts (CPU only).

    The int4 kernel wins while a step is bound by reading weights (a few rows: decode of a small batch); with more
    rows the float32 GEMM is faster and exact, so given a float `fallback` weight, calls with more than `max_rows`
    rows use it (measured on a 2-core AVX2 machine: int4 1.7x faster at 1 row, 1.1x slower at 32).
    """

    act_dtype = torch.bfloat16

    def __init__(self, parts: list[Int4Part], fallback: torch.Tensor | None = None, max_rows: int = 16) -> None:
        super().__init__()
        self.fallback = fallback
        self.max_rows = max_rows
        self.out_features, self.in_features = parts[0].q.shape
        # (packed weights, scales and zeros) per part; plain tensors, not buffers: this module never leaves the CPU.
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        for part in parts:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(part.q.astype(np.int32)), 1)
            sz = torch.stack([torch.from_numpy(part.scale).t(), torch.from_numpy(part.zero).t()], dim=-1)
            self.parts.append((packed, sz.contiguous().to(self.act_dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fallback is not None and x.shape[0] > self.max_rows:
            return nn.functional.linear(x, self.fallback)
        a = x.contiguous().to(self.act_dtype)
        packed, sz = self.parts[0]
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(a, packed, GROUP, sz).float()
        for packed, sz in self.parts[1:]:
            out += torch.ops.aten._weight_int4pack_mm_for_cpu(a, packed, GROUP, sz).float()
        return out.to(x.dtype)


def fp16_available() -> bool:
    """fbgemm's float16-weight GEMM (x86 CPU builds of torch)."""
    try:
        packed = torch.ops.quantized.linear_prepack_fp16(torch.zeros(1, 1), None)
        torch.ops.quantized.linear_dynamic_fp16(torch.zeros(1, 1), packed)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


class Fp16Linear(nn.Module):
    """y = x @ W.T with W held as float16 and computed in float32 (fbgemm; CPU only). No float32 copy is kept:
    one kernel serves every row count, at half the weight memory."""

    max_rows = 1 << 62  # takes any batch (the model checks this for its head)

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().float().contiguous(), None)
        # The overload itself: each call through torch.ops' packet costs microseconds, and decode is op-bound.
        self.op = torch.ops.quantized.linear_dynamic_fp16.default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and x.is_contiguous():  # the usual case, without no-op conversions
            return self.op(x, self.packed)
        return self.op(x.float().contiguous(), self.packed).to(x.dtype)
