"""What the engine reports about a request (to the server's stream) and the per-request output state:
incremental detokenization and stop detection, including stop strings that span token boundaries."""

from __future__ import annotations

from dataclasses import dataclass, field

from .model.tokenizer import IncrementalDetokenizer, Tokenizer
from .request import FinishReason, Request


@dataclass
class Chunk:
    token_ids: list[int]
    text: str
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    # with prompt_logprobs: (prompt token, its logprob, top alternatives) for prompt tokens 1.. in order
    prompt_logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)


@dataclass
class Finished:
    reason: FinishReason
    stop: str
    prompt_tokens: int
    completion_tokens: int
    queue_s: float
    ttft_s: float
    total_s: float
    evictions: int
    cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    error: str | None = None  # set when the engine failed the request: the server reports INTERNAL, or with
    invalid: bool = False  # set, INVALID_ARGUMENT (the request's own input failed it: a grammar past its limits)


Event = Chunk | Finished


class OutputState:
    """Per-request text state. Text that might still turn out to be the start of a stop string is held back."""

    def __init__(self, request: Request, tokenizer: Tokenizer) -> None:
        self.params = request.params
        self.tokenizer = tokenizer
        self.detok = IncrementalDetokenizer(tokenizer)
        self.text = ""
        self.emitted = 0
        self.holdback = max((len(s) for s in self.params.stop), default=1) - 1

    def append(self, request: Request, token_id: int) -> tuple[str, FinishReason | None, str]:
        """Records a new (already appended) token; returns (text to emit, finish reason, matched stop)."""
        p = self.params
        n_out = len(request.output_ids)
        if token_id in p.stop_token_ids:  # masked by the sampler before min_tokens
            return self.flush(), FinishReason.STOP, self.tokenizer.token_text(token_id)
        if not p.ignore_eos and token_id in self.tokenizer.eos_ids:
            return self.flush(), FinishReason.EOS, ""
        before = len(self.text)
        self.text += self.detok.add(token_id)
        if p.stop and n_out >= p.min_tokens:
            start = max(0, before - self.holdback)
            hits = [(i, s) for s in p.stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                index, stop = min(hits)
                self.text = self.text[:index]
                return self._take(len(self.text)), FinishReason.STOP, stop
        if n_out >= p.max_tokens:
            return self.flush(), FinishReason.LENGTH, ""
        return self._take(len(self.text) - self.holdback), None, ""

    def _take(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta

    def flush(self) -> str:
        self.text += self.detok.flush()
        return self._take(len(self.text))
