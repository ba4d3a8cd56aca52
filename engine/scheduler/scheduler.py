"""The engine's per-step scheduler: decides which requests run this step and how many tokens each computes.

Every running request has `num_computed` tokens in the cache and `num_tokens` in total; a step computes
`num_tokens - num_computed` of them (capped by the step's token budget), so a decode is simply a request one token
behind, and a long prompt is prefilled in chunks over several steps. The policy decides admission order,
admission and preemption victims; this module only enforces memory and budget.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from ..kv_cache import BlockAllocator, chain_hashes
from ..request import Request, Status
from .policies import Policy


@dataclass
class ScheduledRequest:
    request: Request
    num_new: int  # tokens computed this step, starting at request.num_computed (drafts included)
    drafts: int = 0  # of them, speculative tokens after the request's last one (request.draft[:drafts])

    @property
    def completes(self) -> bool:
        """After this step every token of the request is cached: its next token gets sampled."""
        return self.request.num_computed + self.num_new - self.drafts == self.request.num_tokens


@dataclass
class StepPlan:
    scheduled: list[ScheduledRequest]
    preempted: list[Request]


class Scheduler:
    def __init__(
        self,
        policy: Policy,
        allocator: BlockAllocator,
        max_num_seqs: int,
        max_batched_tokens: int,
        max_loras: int = 0,
    ) -> None:
        self.policy = policy
        self.max_loras = max_loras  # most distinct LoRA adapters among the running requests; 0 = no limit
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.evictions_total = 0
        self._seq = itertools.count()
        self._admitted_seq = itertools.count()

    def add(self, request: Request) -> None:
        request.seq = next(self._seq)
        request.status = Status.WAITING
        self.waiting.append(request)

    def on_token(self, request: Request) -> None:
        """After a running request produced a token and did not finish: A_min's bound may rise."""
        if request.produced >= request.bound:
            self.policy.on_bound_reached(request)

    def remove(self, request: Request, completed: bool = True) -> None:
        """Takes a request out (finished, or aborted: not `completed`) and frees its blocks."""
        if completed:
            self.policy.on_finished(request)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._release(request)
        request.status = Status.FINISHED

    def _release(self, request: Request) -> None:
        self.allocator.free(request.block_table)
        request.block_table = []
        request.num_computed = 0
        request.registered_blocks = 0
        request.draft = []

    def _hashes(self, request: Request, n_blocks: int) -> list[bytes]:
        """The content hashes of the request's first `n_blocks` full blocks (extended as tokens arrive)."""
        have = len(request.block_hashes)
        if n_blocks > have:
            bs = self.allocator.block_size
            parent = request.block_hashes[-1] if have else request.hash_root
            tokens = [request.token_at(t) for t in range(have * bs, n_blocks * bs)]
            request.block_hashes.extend(chain_hashes(parent, tokens, bs))
        return request.block_hashes[:n_blocks]

    def _take_cached_prefix(self, request: Request) -> None:
        """Starts a request that holds no blocks from the longest prefix of it already in the cache.

        At least the last token is always computed: its logits give the next token.
        """
        if not self.allocator.prefix_caching or request.block_table:
            return
        hits = self.allocator.lookup(self._hashes(request, (request.num_tokens - 1) // self.allocator.block_size))
        self.allocator.take(hits)
        request.block_table = list(hits)
        request.registered_blocks = len(hits)
        request.num_computed = len(hits) * self.allocator.block_size

    def cache_computed(self, scheduled: list[ScheduledRequest]) -> None:
        """After a step: registers the blocks that step filled, so later requests can share them."""
        if not self.allocator.prefix_caching:
            return
        bs = self.allocator.block_size
        for s in scheduled:
            req = s.request
            full = req.num_computed // bs
            if full > req.registered_blocks and req.block_table:
                hashes = self._hashes(req, full)
                for i in range(req.registered_blocks, full):
                    self.allocator.register(req.block_table[i], hashes[i])
                req.registered_blocks = full

    def _grow(self, request: Request, num_tokens: int) -> bool:
        """Makes the block table cover `num_tokens` tokens; False if the free list is short."""
        need = self.allocator.blocks_for(num_tokens) - len(request.block_table)
        if need <= 0:
            return True
        if need > self.allocator.num_free:
            return False
        request.block_table.extend(self.allocator.allocate(need))
        return True

    def _drafts(self, request: Request, num_new: int, budget: int) -> int:
        """How many of a decoding request's drafts this step computes: within the token budget, in cache slots its
        blocks have spare, and in new blocks only while no request waits for memory. Never a preemption."""
        if not request.draft or num_new != 1 or request.num_computed + 1 != request.num_tokens:
            return 0
        want = min(len(request.draft), budget)
        bs = self.allocator.block_size
        blocks = len(request.block_table) + (0 if self.waiting else self.allocator.num_free)
        want = max(0, min(want, blocks * bs - request.num_tokens))
        if want and not self._grow(request, request.num_tokens + want):
            return 0  # (cannot happen: the blocks were counted free)
        return want

    def trim(self, request: Request) -> None:
        """Frees the blocks past what a request's tokens need (drafts that were not kept may leave one)."""
        keep = self.allocator.blocks_for(request.num_tokens)
        if len(request.block_table) > keep:
            self.allocator.free(request.block_table[keep:])
            del request.block_table[keep:]

    def _no_adapter_slot(self, request: Request, running: set[int]) -> bool:
        """Whether admitting `request` would put more distinct LoRA adapters in the batch than max_loras."""
        adapter = request.adapter
        full = bool(self.max_loras) and len(running) >= self.max_loras
        return full and adapter is not None and adapter.id not in running

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)
        self.policy.on_evicted(request)
        request.status = Status.WAITING
        request.evictions += 1
        self.evictions_total += 1
        self.waiting.append(request)

    def schedule(self) -> StepPlan:
        """This step's work: running requests first (preempting for memory as the policy picks), then admissions,
        then the running requests' speculative drafts where room is left."""
        budget = self.max_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []

        # Running requests first, oldest admission first, so preemption hits the ones the policy picks.
        for req in sorted(self.running, key=lambda r: r.admitted_seq):
            if req not in self.running or budget == 0:
                continue
            num_new = min(_chunk(req), budget)
            while not self._grow(req, req.num_computed + num_new):
                victim = self.policy.victim(self.running)
                preempted.append(victim)
                scheduled = [s for s in scheduled if s.request is not victim]
                budget = self.max_batched_tokens - sum(s.num_new for s in scheduled)
                self._preempt(victim)
                if victim is req:
                    break
            if req in self.running:
                scheduled.append(ScheduledRequest(req, num_new))
                budget -= num_new

        # Admissions, in the policy's order, only when nothing had to be preempted this step.
        if not preempted:
            capacity = self.allocator.num_blocks
            self.policy.prepare(self.waiting, self.running)
            adapters = {r.adapter.id for r in self.running if r.adapter is not None}
            adapter_blocked = False
            for req in sorted(self.waiting, key=self.policy.waiting_key):
                if budget == 0 or len(self.running) >= self.max_num_seqs:
                    break
                if req.adapter is not None and (adapter_blocked or self._no_adapter_slot(req, adapters)):
                    # waits for an adapter slot; later requests of running adapters wait behind it (or a stream
                    # of them would keep the slot forever), base-model ones may still go
                    adapter_blocked = True
                    continue
                if not self.policy.admit(self.running, req, capacity, self.allocator.blocks_for):
                    break
                self._take_cached_prefix(req)
                num_new = min(_chunk(req), budget)
                if not self._grow(req, req.num_computed + num_new):
                    self._release(req)  # gives the cached blocks back (they stay cached)
                    break
                if req.evictions == 0:  # first admission: what the client is told was cached
                    req.cached_tokens = req.num_computed
                self.waiting.remove(req)
                self.running.append(req)
                req.status = Status.RUNNING
                req.admitted_seq = next(self._admitted_seq)
                if req.adapter is not None:
                    adapters.add(req.adapter.id)
                scheduled.append(ScheduledRequest(req, num_new))
                budget -= num_new

        # Speculative drafts last: in what budget and memory every request's own tokens and the admissions left.
        for s in scheduled:
            drafts = self._drafts(s.request, s.num_new, budget)
            if drafts:
                s.num_new += drafts
                s.drafts = drafts
                budget -= drafts
        return StepPlan(scheduled, preempted)


PROMPT_LOGPROBS_CHUNK = 512  # prefill rows per step of a request scoring its prompt: each row's logits are a vocabulary


def _chunk(req: Request) -> int:
    """Tokens `req` has left to compute, capped where its prompt is being scored (every row's logits are kept)."""
    left = req.num_tokens - req.num_computed
    if req.params.prompt_logprobs is not None and req.num_computed < req.prompt_len:
        return min(left, PROMPT_LOGPROBS_CHUNK)
    return left
