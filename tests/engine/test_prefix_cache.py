"""Prefix caching: full blocks shared by content hash (pure scheduler checks), and the real engine reusing a prefix
with the same outputs as computing it afresh."""

from __future__ import annotations

from pathlib import Path

import pytest

from optimist.engine.config import EngineConfig
from optimist.engine.engine import Engine
from optimist.engine.kv_cache import BlockAllocator, chain_hashes
from optimist.engine.request import Request, SamplingParams
from optimist.engine.scheduler.policies import FCFS
from optimist.engine.scheduler.scheduler import Scheduler

from ..conftest import run_concurrently

BS = 4


def req(tokens: list[int], rid: str) -> Request:
    return Request(id=rid, prompt_ids=list(tokens), params=SamplingParams(max_tokens=8))


def run_step(sched: Scheduler) -> list[str]:
    """One step as the engine runs it: schedule, 'compute' (advance num_computed), register full blocks."""
    plan = sched.schedule()
    for s in plan.scheduled:
        s.request.num_computed += s.num_new
    sched.cache_computed(plan.scheduled)
    return [s.request.id for s in plan.scheduled]


def test_block_hashes_cover_the_whole_prefix() -> None:
    a = chain_hashes(b"", [1, 2, 3, 4, 5, 6, 7, 8], BS)
    b = chain_hashes(b"", [9, 2, 3, 4, 5, 6, 7, 8], BS)
    assert len(a) == 2 and len({*a, *b}) == 4  # the same second block after a different first is another block
    assert chain_hashes(b"", [1, 2, 3, 4, 5, 6, 7, 8, 9], BS) == a  # a partial block has no hash
    assert chain_hashes(b"sparse", [1, 2, 3, 4], BS) != a[:1]  # namespaces never meet


def test_a_finished_prompts_full_blocks_serve_the_next_request_with_that_prefix() -> None:
    sched = Scheduler(FCFS(), BlockAllocator(16, BS, prefix_caching=True), max_num_seqs=8, max_batched_tokens=64)
    first = req(list(range(1, 11)), "first")  # 10 tokens: blocks [1-4], [5-8] full, [9, 10] partial
    sched.add(first)
    assert run_step(sched) == ["first"]
    assert sched.allocator.num_cached == 2
    shared = list(first.block_table[:2])
    sched.remove(first)
    assert sched.allocator.num_used == 0 and sched.allocator.num_cached == 2  # freed, contents kept

    second = req([*range(1, 9), 42, 43, 44], "second")  # the same 8 tokens, then its own
    sched.add(second)
    plan = sched.schedule()
    assert second.block_table[:2] == shared and second.cached_tokens == 8
    assert [(s.request.id, s.num_new) for s in plan.scheduled] == [("second", 3)]  # only its own tokens

    # A prompt that is entirely cached still computes its last token (its logits give the first output).
    third = req(list(range(1, 9)), "third")
    sched.add(third)
    plan = sched.schedule()
    assert third.block_table[0] == shared[0] and third.num_computed == BS
    assert [(s.request.id, s.num_new) for s in plan.scheduled] == [("second", 3), ("third", 4)]
    # Both hold the first block: it is used once however many share it, and freed only when both let go.
    assert sched.allocator.num_used == len({*second.block_table, *third.block_table})
    sched.remove(second)
    assert shared[0] in third.block_table and sched.allocator.num_used == len(third.block_table)
    sched.remove(third)
    assert sched.allocator.num_used == 0


def test_cached_blocks_are_reclaimed_when_memory_is_needed_and_then_miss() -> None:
    sched = Scheduler(FCFS(), BlockAllocator(4, BS, prefix_caching=True), max_num_seqs=8, max_batched_tokens=64)
    first = req(list(range(1, 9)), "first")
    sched.add(first)
    run_step(sched)
    sched.remove(first)
    assert sched.allocator.num_cached == 2 and sched.allocator.num_free == 4
    other = req(list(range(100, 113)), "other")  # 13 tokens: all four blocks, the cached ones too
    sched.add(other)
    assert run_step(sched) == ["other"]
    assert sched.allocator.num_free == 0 and sched.allocator.num_cached == 3  # other's own 3 full blocks
    sched.remove(other)
    again = req(list(range(1, 9)), "again")
    sched.add(again)
    sched.schedule()
    assert again.cached_tokens == 0  # its blocks were overwritten: nothing stale is served


def test_a_preempted_request_resumes_from_its_own_cached_blocks() -> None:
    sched = Scheduler(FCFS(), BlockAllocator(6, BS, prefix_caching=True), max_num_seqs=8, max_batched_tokens=64)
    a, b = req(list(range(1, 8)), "a"), req(list(range(50, 57)), "b")  # 7 tokens, 2 blocks each
    sched.add(a)
    sched.add(b)
    assert run_step(sched) == ["a", "b"]
    for r in (a, b):
        r.output_ids += [9, 9, 9, 9, 9]  # as if sampled: 12 tokens, 11 computed
    a.num_computed = b.num_computed = 11
    plan = sched.schedule()  # each needs a third block: the two free ones
    for s in plan.scheduled:
        s.request.num_computed += s.num_new
    sched.cache_computed(plan.scheduled)  # 12 computed: three full blocks each, all cached
    a.output_ids.append(9)
    b.output_ids.append(9)  # 13 tokens: each needs a fourth block; none is free, the newest (b) is preempted
    plan = sched.schedule()
    assert [r.id for r in plan.preempted] == ["b"] and b.num_computed == 0
    # a's fourth block is one of b's: the tail of a freed sequence goes first, its head stays cached.
    for s in plan.scheduled:
        s.request.num_computed += s.num_new
    sched.cache_computed(plan.scheduled)
    sched.remove(a)
    plan = sched.schedule()  # b returns: its first two blocks are still cached, tokens 8..12 are computed again
    assert [(s.request.id, s.num_new) for s in plan.scheduled] == [("b", 5)]
    assert b.num_computed == 8 and b.cached_tokens == 0  # cached_tokens reports the first admission only


def test_freeing_a_block_twice_is_an_error_not_a_corrupt_free_list() -> None:
    alloc = BlockAllocator(4, BS, prefix_caching=True)
    blocks = alloc.allocate(2)
    alloc.free(blocks)
    with pytest.raises(ValueError, match="freed twice"):
        alloc.free(blocks[:1])
    assert alloc.num_free == 4


@pytest.mark.slow
def test_engine_reuses_a_shared_prefix_with_unchanged_greedy_outputs(model_path: Path) -> None:
    engines = {
        caching: Engine(EngineConfig(model=model_path, kv_cache_tokens=4096, prefix_caching=caching))
        for caching in (True, False)
    }
    try:
        tok = engines[True].tokenizer
        system = "You are a terse assistant. Answer every question in one short sentence, without any preamble. "
        questions = ["What is the capital of France?", "Why is the sky blue?", "Name a prime number above 10."]
        prompts = [tok.encode(system + q) for q in questions]
        common = len(tok.encode(system)) - 1  # token boundaries may differ at the seam
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        outputs = {}
        cached = []
        for caching, eng in engines.items():
            outs = []
            for p in prompts:  # one after another: each later one finds the system prompt cached
                tokens, _, final = eng.generate(eng.new_request(p, params))
                outs.append(tokens)
                if caching:
                    cached.append(final.cached_tokens)
            outputs[caching] = outs
        bs = engines[True].config.kv_block_size
        assert cached[0] == 0
        assert all(c >= common // bs * bs for c in cached[1:]) and all(c % bs == 0 for c in cached)
        assert outputs[True] == outputs[False]
        # Concurrent requests with the same prompt share blocks while they run and agree with each other.
        eng = engines[True]
        many = run_concurrently(eng, [eng.new_request(prompts[0], params) for _ in range(4)], timeout_s=120)
        assert all(m == outputs[False][0] for m in many)
        assert eng.allocator.num_used == 0
    finally:
        for eng in engines.values():
            eng.shutdown()
