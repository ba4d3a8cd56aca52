"""Turns one step's logits into next tokens, one row per request, honouring each request's sampling params.

Greedy rows take the argmax. Sampled rows apply temperature, top-k, top-p and min-p, then draw with the
exponential race (argmax of p / E, E ~ Exp(1)): a request with a seed draws E for its n-th output token from its
own generator seeded from (seed, n), so its samples depend neither on which other requests share the batch nor on
how its tokens are grouped into steps (speculative drafts, re-prefill after a preemption).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .model import native
from .request import Request
from .structured import blocked_tokens

if TYPE_CHECKING:
    from .runner import PromptSpan


Logprobs = tuple[float, list[tuple[int, float]]]  # the chosen token's logprob and the top-n (token, logprob)


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[Logprobs | None]  # per row, when asked for


def apply_penalties(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    """Repetition (over prompt and output, Hugging Face style), presence and frequency (over output) in place."""
    for row, req in enumerate(requests):
        p = req.params
        if not p.needs_penalties:
            continue
        vocab = logits.shape[-1]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(req.prompt_ids) | set(req.output_ids)), dtype=torch.long)
            seen = seen.to(logits.device)
            values = logits[row, seen]
            logits[row, seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and req.output_ids:
            out = torch.tensor(req.output_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out, minlength=vocab).to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def mask_early_stops(logits: torch.Tensor, requests: Sequence[Request], eos_ids: Sequence[int]) -> None:
    """Before min_tokens, EOS and stop tokens cannot be chosen (unless nothing else can: a structured output's
    language may be complete, and then it wins)."""
    for row, req in enumerate(requests):
        p = req.params
        if len(req.output_ids) < p.min_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_ids))
            if banned:
                kept = logits[row, banned].clone()
                logits[row, banned] = float("-inf")
                if req.matcher is not None and not bool(torch.isfinite(logits[row]).any()):
                    logits[row, banned] = kept


def mask_grammars(logits: torch.Tensor, rows: Sequence[int], bitmask: torch.Tensor) -> None:
    """Structured outputs: row rows[i] keeps only the tokens whose bits are set in bitmask[i] ([n, words] int32
    on the CPU: bit j of word w is token 32w + j)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.stride(1) == 1 and _native_masks():
        native.mask_logits_(logits, torch.tensor(rows, dtype=torch.int64), bitmask.contiguous())
        return
    blocked = blocked_tokens(bitmask, logits.shape[1], logits.device)  # torch's masked_fill: ~5x slower on a CPU
    for i, row in enumerate(rows):
        width = blocked.shape[1]
        logits[row, :width].masked_fill_(blocked[i], float("-inf"))
        logits[row, width:] = float("-inf")


@functools.cache
def _native_masks() -> bool:
    return native.unavailable_reason() is None


def _filter(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p over the sampled rows; returns probabilities."""
    device = logits.device
    temps = torch.tensor([r.params.temperature for r in requests], device=device, dtype=logits.dtype)
    logits = logits / temps[:, None]
    top_k = [r.params.top_k for r in requests]
    top_p = [r.params.top_p for r in requests]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        vocab = logits.shape[-1]
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ks = torch.tensor([min(k, vocab) if k > 0 else vocab for k in top_k], device=device)
        ranks = torch.arange(vocab, device=device)[None, :]
        remove = ranks >= ks[:, None]
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly above this token
        ps = torch.tensor(top_p, device=device, dtype=probs.dtype)
        remove |= before >= ps[:, None]
        remove[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    min_p = [r.params.min_p for r in requests]
    if any(m > 0 for m in min_p):
        mp = torch.tensor(min_p, device=device, dtype=probs.dtype)
        probs = probs.masked_fill(probs < mp[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs


def position_seed(seed: int, position: int) -> int:
    """The generator seed of a request's draw for output position `position` (SplitMix64 of the two)."""
    z = (seed + (position + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


@torch.inference_mode()  # the model's logits are inference tensors: edited in place only in this mode
def sample(
    logits: torch.Tensor,
    requests: Sequence[Request],
    eos_ids: Sequence[int],
    grammar: tuple[Sequence[int], torch.Tensor] | None = None,
) -> SampleResult:
    """logits: [len(requests), vocab] float32 (may be modified in place). `grammar`: the rows of constrained
    requests and their token bitmasks (structured.Grammars.start_masks); logprobs then describe the constrained
    distribution."""
    apply_penalties(logits, requests)
    if grammar is not None:
        mask_grammars(logits, *grammar)
    mask_early_stops(logits, requests, eos_ids)
    chosen = logits.argmax(dim=-1)
    sampled_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
    if sampled_rows:
        rows = torch.tensor(sampled_rows, device=logits.device)
        probs = _filter(logits[rows], [requests[i] for i in sampled_rows])
        noise = torch.empty_like(probs)
        for j, i in enumerate(sampled_rows):
            req = requests[i]
            if req.generator is not None and req.params.seed is not None:
                # the draw for output position n is the seed's n-th stream: the same however the request's tokens
                # are grouped into steps (drafts, preemption) and whatever shares the batch
                req.generator.manual_seed(position_seed(req.params.seed, len(req.output_ids)))
            noise[j].exponential_(generator=req.generator)
        chosen[rows] = (probs / noise).argmax(dim=-1)
    token_ids: list[int] = chosen.tolist()

    logprobs: list[Logprobs | None] = [None] * len(requests)
    wanted = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    if wanted:
        rows = torch.tensor(wanted, device=logits.device)
        lp = logits[rows].log_softmax(dim=-1)
        n = max(requests[i].params.logprobs or 0 for i in wanted)
        top_v, top_i = lp.topk(max(n, 1), dim=-1)
        for j, i in enumerate(wanted):
            k = requests[i].params.logprobs or 0
            top = list(zip(top_i[j, :k].tolist(), top_v[j, :k].tolist(), strict=True))
            logprobs[i] = (float(lp[j, token_ids[i]]), top)
    return SampleResult(token_ids, logprobs)


def prompt_logprobs(
    logits: torch.Tensor, row: int, span: PromptSpan
) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """(token, logprob, top alternatives) for the prompt tokens `span` scores, from its rows of `logits` (the row
    at position q scores prompt token q + 1)."""
    req, k = span.request, span.request.params.prompt_logprobs or 0
    lp = logits[row : row + span.count].float().log_softmax(dim=-1)
    targets = torch.tensor(req.prompt_ids[span.first : span.first + span.count], device=lp.device)
    chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
    top_v, top_i = lp.topk(max(k, 1), dim=-1)
    tops = [list(zip(i[:k], v[:k], strict=True)) for i, v in zip(top_i.tolist(), top_v.tolist(), strict=True)]
    return list(zip(targets.tolist(), chosen, tops, strict=True))
