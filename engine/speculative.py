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

Drafts are not free: each is one more row of the step, and rows cost more as the batch grows (a decode step of a
few sequences reads every weight once whatever its rows; a larger one is bound by arithmetic, which rows multiply).
So the engine keeps only the drafts expected to pay (`choose`): a draft at depth j of a request whose drafts were
kept at rate alpha yields alpha^j tokens in expectation and costs one row; with step time modelled as a + b * rows
(`StepCost`, fitted online from the engine's own decode steps), rows are taken, best first, while each one's
expected tokens exceed what the step already yields per second times the row's time. On a 2-core CPU (a row costs
~0.7 of the rest of a step) one request alone takes drafts kept about 40% of the time or more, a batch of 4 only
those kept three times in four, a batch of 16 nine times in ten; a GPU step, whose rows are nearly free, takes
almost every draft.

Memory stays the scheduler's: guesses only use free cache slots and never cause a preemption (scheduler.py), and
rejected guesses' K/V are overwritten by the tokens that take their positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

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


class NgramIndex:
    """A request's tokens as a growing int32 array, searched for earlier occurrences of its last n tokens.

    Each lookup compares the whole sequence with its last token in numpy (tens of microseconds at 100K tokens) and
    narrows the matches one token back at a time; 4 bytes per token, where a dict of every n-gram would hold ~450
    and take a quarter of a second to build for a 128K-token prompt. The engine looks up only for requests whose
    drafts could pay this step (Speculator.propose)."""

    def __init__(self, ngram_min: int, ngram_max: int) -> None:
        self.ngram_min, self.ngram_max = ngram_min, ngram_max
        self.buf = np.empty(0, dtype=np.int32)
        self.size = 0

    def _sync(self, tokens: Sequence[int]) -> np.ndarray:
        n = len(tokens)
        if n > len(self.buf):
            grown = np.empty(max(n, 2 * len(self.buf), 64), dtype=np.int32)
            grown[: self.size] = self.buf[: self.size]
            self.buf = grown
        if n > self.size:
            self.buf[self.size : n] = tokens[self.size : n]
            self.size = n
        return self.buf[:n]

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix of `tokens` (n in
        [ngram_min, ngram_max]) seen before; [] when none occurred. `tokens` only ever grows between calls."""
        a = self._sync(tokens)
        last = len(a) - 1
        if last < 1:
            return []
        ends = np.flatnonzero(a[:last] == a[last])  # earlier positions matching the last token: n >= 1
        found = ends if self.ngram_min <= 1 else None
        for back in range(1, min(self.ngram_max, last + 1)):  # extend the match one token further back
            ends = ends[ends >= back]
            ends = ends[a[ends - back] == a[last - back]]
            if ends.size == 0:
                break
            if back + 1 >= self.ngram_min:
                found = ends
        if found is None or found.size == 0:
            return []
        end = int(found[-1])
        return a[end + 1 : end + 1 + k].tolist()


class StepCost:
    """Step time as a + b * rows, from recent decode steps (exponentially weighted least squares). While the rows
    seen vary too little to tell a from b, the mean step is split as if a row cost `prior` of the rest."""

    def __init__(self, decay: float = 0.98, prior: float = 0.25) -> None:
        self.decay, self.prior = decay, prior
        self.w = self.sx = self.sy = self.sxx = self.sxy = 0.0

    def observe(self, rows: int, seconds: float) -> None:
        d = self.decay
        self.w = d * self.w + 1.0
        self.sx = d * self.sx + rows
        self.sy = d * self.sy + seconds
        self.sxx = d * self.sxx + rows * rows
        self.sxy = d * self.sxy + rows * seconds

    def coefficients(self) -> tuple[float, float] | None:
        """(a, b) in seconds, or None before any step was seen."""
        if self.w == 0.0:
            return None
        mx, my = self.sx / self.w, self.sy / self.w
        var = self.sxx / self.w - mx * mx
        if var > 0.25:
            b = (self.sxy / self.w - mx * my) / var
            a = my - b * mx
            if a > 0 and b > 0:
                return a, b
        a = my / (1.0 + self.prior * mx)
        return a, self.prior * a


class Speculator:
    """The engine's drafting: proposes each decoding request's drafts and keeps those expected to pay.

    A request's rate of kept drafts is estimated from its own recent steps (each draft tried up to the first
    rejected counts; older steps weigh less, as its text changes) on top of the engine's recent rate over all
    requests (worth two drafts), so a new request starts from what the current workload shows. A request that has
    tried fewer than `EXPLORE` drafts may always try its first one: otherwise, where the engine-wide rate is low,
    no request would draft and the rate would never learn that the workload changed.
    """

    EXPLORE = 2

    def __init__(self, request_decay: float = 0.9, engine_decay: float = 0.995) -> None:
        self.cost = StepCost()
        self.request_decay, self.engine_decay = request_decay, engine_decay
        self.tried = self.kept = 0.0  # engine-wide, decayed

    def engine_rate(self) -> float:
        return (self.kept + 1.0) / (self.tried + 2.0)

    def rate(self, req: Request) -> float:
        return (req.spec_kept + 2.0 * self.engine_rate()) / (req.spec_tried + 2.0)

    def record(self, req: Request, drafts: int, kept: int) -> None:
        """Counts a step's drafts (`kept` of `drafts` were) into the request's rate and the engine's."""
        tried = min(drafts, kept + 1)
        req.spec_tried = self.request_decay * req.spec_tried + tried
        req.spec_kept = self.request_decay * req.spec_kept + kept
        req.spec_explored += tried
        self.tried = self.engine_decay * self.tried + tried
        self.kept = self.engine_decay * self.kept + kept

    def propose(self, running: Sequence[Request], config: SpeculativeConfig, context_length: int) -> None:
        """Sets `draft` of every running request: its n-gram drafts that are expected to pay, or []."""
        bar = self._bar(len(running))
        drafts = {}
        for req in running:
            req.draft = []
            if not (config.tokens and req.num_computed + 1 == req.num_tokens):
                continue
            if req.spec_explored >= self.EXPLORE and self.rate(req) <= bar:
                continue  # not even its first draft could pay: no lookup (a large batch on a CPU skips them all)
            draft = grammar_valid(req, propose(req, config, context_length))
            if draft:
                drafts[req] = req.draft = draft
        self.choose(drafts, len(running))

    def _bar(self, rows: int) -> float:
        """The expected tokens a first draft row must beat in a step of `rows` rows (0 before any step was seen)."""
        coefficients = self.cost.coefficients()
        if coefficients is None:
            return 0.0
        a, b = coefficients
        return b * rows / (a + b * rows)

    def choose(self, drafts: dict[Request, list[int]], rows: int) -> None:
        """Cuts each request's drafts to those expected to pay (in place): `rows` is the step's rows without drafts.

        A draft at depth j of a request with rate alpha yields alpha^j tokens in expectation and one more row of
        the step, whose time is a + b * rows: rows are taken best first while each adds more tokens than the
        step's tokens per second times the row's time b (each taken row raises that bar)."""
        coefficients = self.cost.coefficients()
        if coefficients is None or not drafts:
            return
        a, b = coefficients
        candidates: list[tuple[float, int, int]] = []  # (expected tokens, tie-break, depth)
        for req, draft in drafts.items():
            alpha = self.rate(req)
            candidates.extend((alpha**j, id(req), j) for j in range(1, len(draft) + 1))
        candidates.sort(reverse=True)
        tokens, seconds = float(rows), a + b * rows
        depth = {id(req): 1 for req in drafts if req.spec_explored < self.EXPLORE}
        for req in drafts:
            if id(req) in depth:
                tokens += self.rate(req)
                seconds += b
        for gain, key, j in candidates:
            if gain * seconds <= b * tokens:  # this row and all after it would lower the step's tokens per second
                break
            if depth.get(key, 0) == j - 1:  # (a deeper draft counts only after the shallower ones)
                depth[key] = j
                tokens += gain
                seconds += b
        for req, draft in drafts.items():
            del draft[depth.get(id(req), 0) :]


def grammar_valid(req: Request, draft: list[int]) -> list[int]:
    """The drafts a structured output's language allows (all without one): its rows' masks are computed after
    the drafts before them (structured.Grammars.start_masks), and a draft the language forbids could never be
    sampled."""
    if req.matcher is None or not draft:
        return draft
    return draft[: req.matcher.validate_tokens(draft)]


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
