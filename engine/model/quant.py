"""Float16-weight matmuls on CPU (the GGUF blocks' own kernels are in native.py).

A decode step on CPU is bound by memory bandwidth: float32 weights of a 135M model are 540 MB read per step.
`--weights fp16` stores weights as float16 and runs fbgemm's GEMM, which widens them to float32 in registers:
activations, products and sums stay float32, so the only change is the weights' rounding (relative error at
most 2^-11). On AVX2 it is 1.8x float32 at 1 to 32 rows (half the bytes to read; 4x at 8 rows, where MKL's
float32 GEMM is slow), about as fast from 512 rows on.
"""

from __future__ import annotations

import torch
from torch import nn


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
