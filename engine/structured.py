"""Structured output: a request's tokens constrained to a language (a JSON Schema, any JSON object, a regular
expression, a list of choices, a Lark or GBNF grammar).

llguidance (the Rust Earley parser behind vLLM's `guidance` backend) turns each constraint into a matcher over the
model's vocabulary. Every step, the constrained rows' logits are masked to the tokens that can continue a text of
the language (bitmasks the matchers fill on a worker thread while the model runs the step), the sampled token
advances the matcher, and tokens the language forces from there (the rest of a key, a closing quote) are appended
at once: the next step computes them together, as one chunk, instead of one decode step each (jump-forward, as
SGLang does).

Compiled constraints are kept (least recently used out first) and copied for each request, so a service that
sends the same schema with every request compiles it once.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from .model.tokenizer import Tokenizer
from .request import InvalidRequest, Request, StructuredOutput

CACHE_SIZE = 64  # compiled constraints kept
# Whitespace JSON may hold between tokens: none, spaces, or one line break and an indentation, as pretty-printers
# write it. llguidance's default (any run of whitespace) lets a small model emit blank lines until max_tokens; a
# schema's own "x-guidance": {"whitespace_pattern": ...} still overrides this.
JSON_WHITESPACE = r"(\r?\n)?[\x20\x09]{0,32}"
_ERROR_CHARS = 600  # of a compiler message, in the client's error


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as exc:  # the dependency is declared; a hand-made environment may still lack it
        raise InvalidRequest(
            "sampling.structured_output", "this server cannot constrain outputs: the llguidance package is missing"
        ) from exc
    return llguidance


class _Vocabulary:
    """The tokenizer as llguidance's TokenizerWrapper reads it: each token's bytes (special tokens as 0xFF + name),
    padded to the model's logits width, and a text -> ids function."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_ids[0] if tokenizer.eos_ids else None
        self.bos_token_id = tokenizer.bos_id
        tokens: list[bytes] = []
        for i, raw in enumerate(tokenizer.token_bytes[:vocab_size]):
            if i in tokenizer.special_ids or not raw:
                tokens.append(b"\xff" + (tokenizer.token_text(i) or f"<[{i}]>").encode("utf-8"))
            else:
                tokens.append(raw)
        tokens.extend(b"\xff" + f"<[{i}]>".encode() for i in range(len(tokens), vocab_size))
        self.tokens = tokens
        self.special_token_ids = [i for i, t in enumerate(tokens) if t.startswith(b"\xff")]

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("text only")  # llguidance then passes valid UTF-8 text and handles the bytes around it
        ids: list[int] = self._tokenizer.backend.encode(text, add_special_tokens=False).ids
        return ids


def grammar_text(llg: Any, constraint: StructuredOutput) -> str:
    """The llguidance grammar for a constraint (not yet checked)."""
    matcher, kind, spec = llg.LLMatcher, constraint.kind, constraint.spec
    pattern = JSON_WHITESPACE if constraint.whitespace is None else constraint.whitespace
    defaults = {"whitespace_pattern": pattern}
    if kind == "json_schema":
        return str(matcher.grammar_from_json_schema(spec, defaults=defaults))
    if kind == "json_object":
        return str(matcher.grammar_from_json_schema('{"type": "object"}', defaults=defaults))
    if kind == "regex":
        return str(matcher.grammar_from_regex(spec))
    if kind == "choice":
        return str(matcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(spec))))
    return str(llg.grammar_from("grammar", spec))  # Lark, or GBNF converted to Lark


class Grammars:
    """One engine's compiler of constraints and computer of token masks."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._source = tokenizer
        self.vocab_size = vocab_size
        self._lock = threading.Lock()
        self._tokenizer: Any = None  # llguidance.LLTokenizer, built on first use (~0.1 s for 49K tokens)
        self._executor: Any = None
        self._cache: OrderedDict[StructuredOutput, Any] = OrderedDict()
        self._worker: ThreadPoolExecutor | None = None

    def _ll_tokenizer(self, llg: Any) -> Any:
        if self._tokenizer is None:
            wrapper = llg.TokenizerWrapper(_Vocabulary(self._source, self.vocab_size))
            eos = list(self._source.eos_ids) or None
            self._tokenizer = llg.LLTokenizer(wrapper, n_vocab=self.vocab_size, eos_token=eos)
            self._executor = llg.LLExecutor()
        return self._tokenizer

    def matcher(self, constraint: StructuredOutput) -> Any:
        """A fresh matcher for `constraint`; raises InvalidRequest naming the field when it does not compile."""
        llg = _llguidance()
        with self._lock:
            template = self._cache.get(constraint)
            if template is None:
                tokenizer = self._ll_tokenizer(llg)
                try:
                    grammar = grammar_text(llg, constraint)
                except ValueError as exc:
                    raise InvalidRequest(constraint.field, _short(str(exc))) from exc
                template = llg.LLMatcher(tokenizer, grammar, log_level=0)
                if template.is_error():
                    raise InvalidRequest(constraint.field, _short(template.get_error()))
                self._cache[constraint] = template
                if len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(constraint)
            return template.deep_copy()

    def start_masks(
        self, requests: Sequence[Request], drafts: Sequence[Sequence[int]] | None = None
    ) -> Future[torch.Tensor]:
        """Fills the requests' token bitmasks ([rows, ceil(vocab / 32)] int32) on a worker thread, so it overlaps
        the step's model work; the matchers must not change until it is done. Each request has one row, then with
        speculative `drafts` (valid ones: Speculator.propose checks them) one more per draft, the mask after the
        drafts before it. Rows after a draft that ends the language allow every token (they are never kept)."""
        drafts = drafts if drafts is not None else [()] * len(requests)
        rows = sum(1 + len(d) for d in drafts)
        # The tensor is made here: a torch operator on the worker would give it an OpenMP team of its own, and
        # more OpenMP threads than cores slow every operator of the step (see Engine.__init__).
        bitmask = torch.full((rows, (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="optimist-grammar")
        jobs = [(r.matcher, list(d)) for r, d in zip(requests, drafts, strict=True)]
        return self._worker.submit(self._fill, jobs, bitmask)

    def _fill(self, jobs: list[tuple[Any, list[int]]], bitmask: torch.Tensor) -> torch.Tensor:
        row_bytes, rows = bitmask.shape[1] * 4, bitmask.shape[0]
        plain, drafted = [], []  # (llguidance takes drafts only in a call where every matcher has some)
        k = 0
        for matcher, draft in jobs:
            if draft:
                drafted.append((matcher, k, draft))
            else:
                plain.append((matcher, k))
            k += 1 + len(draft)
        if plain:
            self._executor.unsafe_compute_mask_ptr(plain, bitmask.data_ptr(), row_bytes, rows)
        if drafted:
            self._executor.unsafe_compute_mask_ptr_with_draft_token(drafted, bitmask.data_ptr(), row_bytes, rows)
        return bitmask

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)


_BITS: dict[torch.device, torch.Tensor] = {}


def blocked_tokens(bitmask: torch.Tensor, vocab_size: int, device: torch.device) -> torch.Tensor:
    """[n, vocab] bool, True where a token may not come next, from [n, words] int32 bitmasks (bit j of word w:
    token 32w + j allowed); tokens beyond the bitmask's width are blocked."""
    words = bitmask.to(device, non_blocking=True)
    if device not in _BITS:
        _BITS[device] = torch.tensor([1 << j for j in range(31)] + [-(1 << 31)], dtype=torch.int32, device=device)
    blocked = ((words[:, :, None] & _BITS[device]) == 0).reshape(words.shape[0], -1)[:, :vocab_size]
    if blocked.shape[1] < vocab_size:
        pad = torch.ones(blocked.shape[0], vocab_size - blocked.shape[1], dtype=torch.bool, device=device)
        blocked = torch.cat([blocked, pad], dim=1)
    return blocked


def failure(matcher: Any) -> str | None:
    """Why a matcher can go no further (its grammar outgrew the parser's limits, say), or None."""
    return _short(matcher.get_error()) if matcher.is_error() else None


def _short(message: str) -> str:
    message = message.strip()
    return message if len(message) <= _ERROR_CHARS else message[:_ERROR_CHARS] + " ..."
