"""A CPU KV cache takes memory as it fills, not all at start: allocating one costs (almost) no resident memory,
reads zeros, and keeps what is written; and one larger than the memory the process may use is refused at start
(rather than the process being killed for it under load)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from optimist.engine.config import ModelConfig
from optimist.engine.kv_cache import allocate_cache, memory_limit

STATUS = Path("/proc/self/status")
pytestmark = pytest.mark.skipif(not STATUS.exists(), reason="reads resident memory from /proc (Linux)")


def resident_mb() -> float:
    for line in STATUS.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


CONFIG = ModelConfig(
    name="cache-only", vocab_size=32, hidden_size=64, intermediate_size=128, num_layers=8, num_heads=4,
    num_kv_heads=2, head_dim=64, rope_theta=10000.0, rms_norm_eps=1e-5, context_length=4096, tie_embeddings=True,
)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_large_cache_costs_memory_only_where_written(dtype: torch.dtype) -> None:
    blocks, block_size = 8192, 16  # 131,072 tokens: 8 layers x K/V x 131,072 x 2 x 64 = 1 GiB in float32
    before = resident_mb()
    cache = allocate_cache(CONFIG, blocks, block_size, torch.device("cpu"), dtype)
    size_mb = sum(t.numel() * t.element_size() for pair in cache for t in pair) / 2**20
    assert size_mb >= 512
    assert resident_mb() - before < 64  # torch.zeros made all of it resident at once
    k, v = cache[3]
    assert k.shape == (blocks * block_size, 2, 64) and k.dtype == dtype and k.is_contiguous()
    assert k.data_ptr() != v.data_ptr()
    slots = torch.tensor([5, 70_000, blocks * block_size - 1])
    assert not k[slots].any() and not v[slots].any()  # never-written slots read zero
    k[slots] = 1.5
    v[slots[1]] = -2.0
    assert (k[slots] == 1.5).all() and (v[slots[1]] == -2.0).all() and not v[slots[0]].any()
    assert not cache[2][0][slots].any()  # layers do not share memory
    touched = resident_mb()
    cache[0][0][: 4096 * block_size].fill_(1.0)  # 64K tokens of one layer's keys: 32 MB (float32)
    assert resident_mb() - touched > 0.8 * 4096 * block_size * 2 * 64 * k.element_size() / 2**20


def test_a_cache_larger_than_the_machine_is_refused_at_start_with_what_fits(model_path: Path) -> None:
    from optimist.engine.config import ConfigError, EngineConfig
    from optimist.engine.engine import Engine

    # 50M tokens of SmolLM2's float32 K/V: 2.1 TiB, more than any machine this runs on
    with pytest.raises(ConfigError) as err:
        Engine(EngineConfig(model=model_path, kv_cache_tokens=50_000_000))
    message = str(err.value)
    assert "lower --kv-cache-tokens" in message and "2145.77 GiB" in message, message
    fit = int(message.split("about ")[1].split()[0])
    limit = min(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), memory_limit() or 2**62)
    assert 0 < fit < limit // (2 * 30 * 192 * 4)  # below the machine's memory over 46 KB a token
