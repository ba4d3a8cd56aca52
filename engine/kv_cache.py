"""Paged KV cache: fixed-size blocks, a free list, and the per-layer K/V tensors they index.

A request owns a block table (a list of block ids); token t of the request lives in slot
`block_table[t // block_size] * block_size + t % block_size` of every layer's cache tensor.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import torch

from .config import ModelConfig


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, blocks: Iterable[int]) -> None:
        self._free.extend(blocks)


def slots_of(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Cache slots of token positions [start, end) of a request."""
    return [block_table[t // block_size] * block_size + t % block_size for t in range(start, end)]


def allocate_cache(
    config: ModelConfig, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (K, V) pair per layer, each [num_blocks * block_size, kv_heads, head_dim]."""
    shape = (num_blocks * block_size, config.num_kv_heads, config.head_dim)
    return [
        (torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
        for _ in range(config.num_layers)
    ]
