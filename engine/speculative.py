"""Speculative decoding with n-gram drafts (prompt lookup): tokens guessed from the request's own text, checked by
the model in one step.

Outputs that copy from their input (quoting, extracting, editing code or text, summaries that reuse phrases) repeat
runs of tokens the prompt or the answer so far already holds. When the last n tokens occurred before, the tokens
that followed them then are a cheap guess of what follows now. The engine computes the request's next position and
the k guessed ones in one step (k + 1 rows of a decode step: each attends to the cache up to its own position), and
samples every row as it would have sampled it without the guesses. Row j's token is accepted while every earlier
row's sample equalled the guess at its position; the first sample that differs is kept too (it is a sample of the
right distribution: the draft was wrong). So a step yields between 1 and k + 1 tokens.

Why that is exact: a draft from n-gram lookup is a fixed token d, a proposal distribution q with all its mass on d.
Speculative sampling accepts d with probability min(1, p(d) / q(d)) = p(d) and otherwise draws from the residual
max(0, p - q), which is p with d removed and renormalised. Drawing x ~ p and accepting when x == d does exactly that:
it accepts with probability p(d), and x given x != d has the residual's distribution. Greedy rows are the special
case: a guess is kept where it is the argmax. Every token still comes from the distribution (temperature, top-k/p,
min-p, penalties over the text before it, min_tokens) the plain decode step would have used, so greedy answers are
the same and sampled ones follow the same law.

Memory stays the scheduler's: guesses only use free cache slots and never cause a preemption (scheduler.py), and
rejected guesses' K/V are overwritten by the tokens that take their positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .request import Request


@dataclass(frozen=True)
class SpeculativeConfig:
    """n-gram speculation: up to `tokens` drafts per step from the latest earlier occurrence of the request's last
    n tokens, the longest n in [ngram_min, ngram_max] that occurred (vLLM's num_speculative_tokens,
    prompt_lookup_min, prompt_lookup_max)."""

    tokens: int = 0  # 0 = off
    ngram_min: int = 1
    ngram_max: int = 4

    def validate(self) -> str | None:
        """A message naming the bad value, or None."""
        if not 0 <= self.tokens <= 16:
            return f"speculative_tokens must be in [0, 16] (0 = off), got {self.tokens}"
        if not 1 <= self.ngram_min <= self.ngram_max <= 16:
            return (
                f"speculative n-gram sizes must satisfy 1 <= min <= max <= 16, got min {self.ngram_min}, "
                f"max {self.ngram_max}"
            )
        return None


@dataclass
class NgramIndex:
    """For each n-gram size, the end of the latest occurrence of every n-gram of a token sequence, built as the
    sequence grows (one dict entry per position and size)."""

    ngram_min: int
    ngram_max: int
    ends: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> index of its last token
    indexed: int = 0  # n-grams ending before this index are in `ends`

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix of `tokens` (n in
        [ngram_min, ngram_max]) seen before; [] when none occurred."""
        last = len(tokens) - 1
        self._extend(tokens, last)  # every n-gram ending before the suffix's own end
        for n in range(min(self.ngram_max, last), self.ngram_min - 1, -1):
            end = self.ends.get(tuple(tokens[last - n + 1 : last + 1]))
            if end is not None:
                return list(tokens[end + 1 : end + 1 + k])
        return []

    def _extend(self, tokens: Sequence[int], upto: int) -> None:
        for end in range(self.indexed, upto):
            for n in range(self.ngram_min, min(self.ngram_max, end + 1) + 1):
                self.ends[tuple(tokens[end - n + 1 : end + 1])] = end
        self.indexed = max(self.indexed, upto)


def eligible(req: Request) -> bool:
    """Whether a request's decode steps may take drafts: not under a structured output (its tokens come from the
    grammar's masks, and jump-forward already appends the tokens it forces)."""
    return req.matcher is None


def draft_room(req: Request, context_length: int) -> int:
    """The most drafts a step of `req` may carry: each accepted one plus the step's own token must stay within
    max_tokens and the context."""
    return max(0, min(req.params.max_tokens - req.produced - 1, context_length - req.num_tokens - 1))


def propose(req: Request, config: SpeculativeConfig, context_length: int) -> list[int]:
    """The drafts for `req`'s next step (empty when it has no room or no earlier occurrence of its suffix)."""
    k = min(config.tokens, draft_room(req, context_length))
    if k <= 0:
        return []
    if req.ngrams is None:
        req.ngrams = NgramIndex(config.ngram_min, config.ngram_max)
    return req.ngrams.propose(_Tokens(req), k)


def accepted(drafts: Sequence[int], sampled: Sequence[int]) -> int:
    """How many drafts the step kept: sampled[j] is the token row j drew, where row j saw drafts[:j] before it."""
    a = 0
    while a < len(drafts) and sampled[a] == drafts[a]:
        a += 1
    return a


class _Tokens(Sequence[int]):
    """A request's prompt and output as one sequence, without concatenating them every step."""

    def __init__(self, req: Request) -> None:
        self.prompt, self.output = req.prompt_ids, req.output_ids
        self.n = len(self.prompt)

    def __len__(self) -> int:
        return self.n + len(self.output)

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            assert step == 1
            if stop <= self.n:
                return self.prompt[start:stop]
            if start >= self.n:
                return self.output[start - self.n : stop - self.n]
            return self.prompt[start:] + self.output[: stop - self.n]
        return self.prompt[index] if index < self.n else self.output[index - self.n]
