"""Runs one engine step on the model: packs the scheduled requests into one batch and returns logits for the
requests that complete this step (those whose next token gets sampled)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .attention.sparse.config import HeadPattern
from .kv_cache import slots_of
from .model import native
from .model.llama import AttentionMeta, DecodeGroup, Llama, PrefillSpan
from .model.lora import LoraAdapter, LoraBatch
from .request import Request
from .scheduler.scheduler import ScheduledRequest

# Attention backends on CUDA: all but cuDNN's, which PyTorch prefers for bf16/fp16 on Hopper but which builds an
# execution plan per shape. Decode shapes change every step (contexts grow): on an H100 the tiny test model's 200
# greedy tokens took 65.5 ms each with cuDNN on first sight of each shape (1.5 ms once all were seen), 3.0 ms
# without it (2.3 ms repeated).
GPU_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class PromptSpan:
    """`count` logits rows scoring `request`'s prompt tokens from index `first` on."""

    request: Request
    first: int
    count: int


class ModelRunner:
    def __init__(
        self,
        model: Llama,
        kv_cache: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        sparse_threshold: int = 0,
        sparse_patterns: list[list[HeadPattern]] | None = None,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = model.embed.weight.device
        # Prompts longer than this prefill with sparse attention (0 = never); decode stays dense.
        self.sparse_threshold = sparse_threshold if sparse_patterns is not None else 0
        self.sparse_patterns = sparse_patterns
        self.sparse_tokens = 0  # prompt tokens prefilled sparsely, for the load RPC

    def _tensor(self, values: Sequence[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

    @torch.inference_mode()
    def execute(
        self, scheduled: Sequence[ScheduledRequest]
    ) -> tuple[torch.Tensor, list[ScheduledRequest], list[PromptSpan]]:
        """Returns (logits [p + k, vocab] float32, the scheduled requests whose next token is sampled, to which the
        last k rows belong in order, one row each and one more per draft, and the prompt spans the first p rows
        score: requests that asked for prompt logprobs)."""
        bs = self.block_size
        # Prompt chunks first, single-token rows (decodes) last and contiguous. A few output tokens computed at once
        # (speculative drafts, tokens a structured output forced) are decode rows too, one per position: each
        # attends to the cache up to itself (a step stores all rows' K/V before attending), and on CPU the step
        # stays on the all-C decode path.
        decodes: list[ScheduledRequest] = []
        prefills: list[ScheduledRequest] = []
        for s in scheduled:
            (decodes if _decode_rows(s) else prefills).append(s)
        tokens: list[int] = []
        adapters: list[LoraAdapter | None] = []  # each row's LoRA adapter (None = the base model)
        positions: list[int] = []
        slots: list[int] = []
        spans: list[PrefillSpan] = []
        logits_rows: list[int] = []
        owners: list[ScheduledRequest] = []
        prompt_rows: list[int] = []
        prompt_spans: list[PromptSpan] = []
        for s in prefills:
            req, start, end = s.request, s.request.num_computed, s.request.num_computed + s.num_new
            row = len(tokens)
            if req.params.prompt_logprobs is not None:
                # the row at position q scores prompt token q + 1: those not yet scored (a re-prefill after a
                # preemption computes them again), up to the prompt's end
                first, last = max(start, req.prompt_logprobs_next - 1), min(end, req.prompt_len - 1)
                if first < last:
                    prompt_rows.extend(range(row + first - start, row + last - start))
                    prompt_spans.append(PromptSpan(req, first + 1, last - first))
            tokens.extend(req.token_at(t) for t in range(start, end))
            adapters.extend([req.adapter] * (end - start))
            positions.extend(range(start, end))
            slots.extend(slots_of(req.block_table, start, end, bs))
            context = None if start == 0 else self._tensor(slots_of(req.block_table, 0, end, bs))
            # sparse for prompt chunks (and re-prefills) of long prompts; output-only chunks (tokens a structured
            # output forced) run dense, as decode steps do
            sparse = 0 < self.sparse_threshold < req.prompt_len and start < req.prompt_len
            int8 = req.prompt_len >= native.WIDEN_ROWS  # where the layers have int8 panels (--prefill-gemm)
            spans.append(PrefillSpan(row, row + s.num_new, context, end, sparse, int8))
            if sparse:
                self.sparse_tokens += max(0, min(end, req.prompt_len) - start)
            if s.completes:
                logits_rows.append(row + s.num_new - 1)
                owners.append(s)
        groups: list[DecodeGroup] = []
        packed: dict[tuple[int, int], int] = {}  # (id of the scheduled request, position) -> row in the batch
        decode_rows = [DecodeRow(s, s.request.num_computed + j) for s in decodes for j in range(s.num_new)]
        for group in group_by_length(decode_rows):
            # Context slots of each row from a padded block-table tensor (padding hits block 0, masked).
            first = len(tokens)
            lengths = [d.length for d in group]
            max_len = max(lengths)
            max_blocks = -(-max_len // bs)
            blocks = torch.zeros((len(group), max_blocks), dtype=torch.long)
            for i, d in enumerate(group):
                req, pos = d.scheduled.request, d.position
                packed[id(d.scheduled), pos] = first + i
                tokens.append(req.token_at(pos))
                adapters.append(req.adapter)
                positions.append(pos)
                slots.append(req.block_table[pos // bs] * bs + pos % bs)
                n_blocks = -(-(pos + 1) // bs)
                blocks[i, :n_blocks] = torch.tensor(req.block_table[:n_blocks])
            table = (blocks[:, :, None] * bs + torch.arange(bs)).reshape(len(group), -1)[:, :max_len]
            mask = None
            if min(lengths) != max_len:
                lens = self._tensor(lengths)
                mask = (torch.arange(max_len, device=self.device)[None, :] < lens[:, None])[:, None, None, :]
            groups.append(DecodeGroup(first, len(tokens), table.to(self.device), mask, lengths))
        for s in decodes:  # each completing request's sampled rows together: its last token's, then its drafts'
            if s.completes:
                end = s.request.num_computed + s.num_new
                logits_rows.extend(packed[id(s), pos] for pos in range(end - 1 - s.drafts, end))
                owners.append(s)
        meta = AttentionMeta(
            positions=self._tensor(positions),
            slot_mapping=self._tensor(slots),
            prefills=spans,
            decodes=groups,
            logits_rows=self._tensor(prompt_rows + logits_rows),
            sparse_patterns=self.sparse_patterns,
            lora=LoraBatch.of_rows(adapters, self.device),
        )
        with sdpa_kernel(GPU_ATTENTION) if self.device.type == "cuda" else contextlib.nullcontext():
            logits = self.model(self._tensor(tokens), meta, self.kv_cache)
        for s in scheduled:
            s.request.num_computed += s.num_new
        return logits, owners, prompt_spans


OUTPUT_ROWS = 16  # most output tokens of one request a step computes as decode rows (not a prefill chunk)


def _decode_rows(s: ScheduledRequest) -> bool:
    """Whether a scheduled request's tokens run as decode rows: one token, drafts, or a few output tokens."""
    req = s.request
    return s.num_new == 1 or s.drafts > 0 or (req.num_computed >= req.prompt_len and s.num_new <= OUTPUT_ROWS)


@dataclass
class DecodeRow:
    """One single-token row of a decode step: a request's position (its last token's, or a draft's)."""

    scheduled: ScheduledRequest
    position: int

    @property
    def length(self) -> int:
        """The context the row attends to."""
        return self.position + 1


def group_by_length(rows: Sequence[DecodeRow], waste: float = 1.3, slack: int = 64) -> list[list[DecodeRow]]:
    """Splits decode rows into groups of similar context length, longest first.

    A padded batch attends over B x max_len slots; one long sequence among short ones would make every row pay
    for its length. A row joins the current group while the padded area stays within `waste` times the real
    one, or its length is within `slack` of the group's longest.
    """
    ordered = sorted(rows, key=lambda r: r.length, reverse=True)
    groups: list[list[DecodeRow]] = []
    total = 0
    for row in ordered:
        length = row.length
        if groups:
            longest = groups[-1][0].length
            padded = (len(groups[-1]) + 1) * longest
            if padded <= waste * (total + length) or longest - length <= slack:
                groups[-1].append(row)
                total += length
                continue
        groups.append([row])
        total = length
    return groups
