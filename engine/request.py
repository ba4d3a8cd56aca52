"""A request's parameters (validated once on arrival) and its mutable state inside the engine."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

GREEDY_TEMPERATURE = 1e-5


class InvalidRequest(ValueError):
    """A request field is invalid; `field` names it (the server returns INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


STRUCTURED_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
MAX_STRUCTURED_CHARS = 256 * 1024  # a constraint's text (schema, regex, grammar, the choices as JSON)


@dataclass(frozen=True)
class StructuredOutput:
    """The language a request's output is constrained to (engine/structured.py compiles it)."""

    kind: str  # one of STRUCTURED_KINDS
    spec: str = ""  # the JSON Schema, regex or grammar text; for `choice` the choices as a JSON list; json_object: ""
    whitespace: str | None = None  # JSON kinds: a regex of the whitespace between tokens ("" none); None: default

    @property
    def field(self) -> str:
        return f"sampling.structured_output.{self.kind}"

    @classmethod
    def choices(cls, options: list[str] | tuple[str, ...]) -> StructuredOutput:
        return cls("choice", json.dumps(list(options)))

    def validate(self) -> None:
        """What can be checked without compiling: the kind, the size, JSON where JSON is due, the choices."""
        if self.kind not in STRUCTURED_KINDS:
            raise InvalidRequest("sampling.structured_output", f"unknown kind {self.kind!r}")
        if len(self.spec) > MAX_STRUCTURED_CHARS:
            raise InvalidRequest(self.field, f"longer than {MAX_STRUCTURED_CHARS} characters ({len(self.spec)})")
        if self.kind in ("json_schema", "choice"):
            try:
                value: Any = json.loads(self.spec)
            except ValueError as exc:
                raise InvalidRequest(self.field, f"not valid JSON: {exc}") from exc
            if self.kind == "json_schema" and not isinstance(value, dict | bool):
                raise InvalidRequest(
                    self.field, f"a JSON Schema is an object (or a boolean), got {type(value).__name__}"
                )
            if self.kind == "choice":
                if not isinstance(value, list) or not value:
                    raise InvalidRequest(self.field, "needs at least one choice")
                if not all(isinstance(v, str) and v for v in value):
                    raise InvalidRequest(self.field, "every choice must be a non-empty string")
        elif self.kind in ("regex", "grammar") and not self.spec:
            raise InvalidRequest(self.field, "is empty")
        if self.whitespace is not None and self.kind not in ("json_schema", "json_object"):
            raise InvalidRequest(
                "sampling.structured_output.whitespace_pattern", f"only for JSON kinds, not {self.kind}"
            )
        if self.whitespace is not None and len(self.whitespace) > 1024:
            raise InvalidRequest("sampling.structured_output.whitespace_pattern", "longer than 1024 characters")


# vLLM's `structured_outputs` keys, each with the constraint kind it names
VLLM_STRUCTURED_KEYS = {"json": "json_schema", "json_object": "json_object", "regex": "regex", "choice": "choice",
                        "grammar": "grammar"}  # fmt: skip


def structured_value(kind: str, value: Any, field: str) -> StructuredOutput:
    """A constraint from a JSON API's value (a schema as an object or its text, choices as a list, regex and
    grammar as text, json_object as true); raises InvalidRequest naming `field`."""
    if kind == "json_object":
        if value is not True:
            raise InvalidRequest(field, "must be true")
        return StructuredOutput("json_object")
    if kind == "json_schema":
        if isinstance(value, str):
            return StructuredOutput(kind, value)
        if not isinstance(value, dict | bool):
            raise InvalidRequest(field, "must be a JSON Schema (an object)")
        return StructuredOutput(kind, json.dumps(value))
    if kind == "choice":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidRequest(field, "must be a list of strings")
        return StructuredOutput.choices(value)
    if not isinstance(value, str):
        raise InvalidRequest(field, "must be a string")
    return StructuredOutput(kind, value)


def structured_from_vllm(value: Any, field: str) -> list[tuple[str, StructuredOutput]]:
    """The constraints a vLLM `structured_outputs` object sets, each with its field (`field.key`); raises
    InvalidRequest for what it cannot be."""
    if not isinstance(value, dict):
        raise InvalidRequest(field, "must be an object")
    found = []
    whitespace = None
    for key, item in value.items():
        if key in ("disable_any_whitespace", "whitespace_pattern"):  # options of the JSON kinds
            if key == "disable_any_whitespace" and not isinstance(item, bool | None):
                raise InvalidRequest(f"{field}.{key}", "must be true or false")
            if key == "whitespace_pattern" and not isinstance(item, str | None):
                raise InvalidRequest(f"{field}.{key}", "must be a string (a regex)")
            if item is True:
                whitespace = ""
            elif isinstance(item, str) and whitespace is None:
                whitespace = item
            continue
        if key not in VLLM_STRUCTURED_KEYS:
            known = [*VLLM_STRUCTURED_KEYS, "disable_any_whitespace", "whitespace_pattern"]
            raise InvalidRequest(f"{field}.{key}", f"unknown; takes {', '.join(known)}")
        if item is not None and item is not False:
            found.append((f"{field}.{key}", structured_value(VLLM_STRUCTURED_KEYS[key], item, f"{field}.{key}")))
    if whitespace is not None:
        json_kinds = [(f, c) for f, c in found if c.kind in ("json_schema", "json_object")]
        if len(json_kinds) != len(found) or not found:
            raise InvalidRequest(f"{field}.whitespace_pattern", "only with json or json_object")
        found = [(f, dataclasses.replace(c, whitespace=whitespace)) for f, c in found]
    return found


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 16
    min_tokens: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # each prompt token's logprob and this many alternatives
    structured_output: StructuredOutput | None = None  # the language the output is constrained to

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self, vocab_size: int, max_stop_strings: int, max_stop_chars: int) -> None:
        def finite(name: str, value: float) -> None:
            if not math.isfinite(value):
                raise InvalidRequest(f"sampling.{name}", f"must be a finite number, got {value}")

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            finite(name, getattr(self, name))
        if self.temperature < 0:
            raise InvalidRequest("sampling.temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest("sampling.top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest("sampling.top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise InvalidRequest("sampling.min_p", f"must be in [0, 1], got {self.min_p}")
        if self.max_tokens <= 0:
            raise InvalidRequest("sampling.max_tokens", f"must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequest("sampling.min_tokens", f"must be in [0, max_tokens], got {self.min_tokens}")
        if self.repetition_penalty <= 0:
            raise InvalidRequest("sampling.repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise InvalidRequest(f"sampling.{name}", f"must be in [-2, 2], got {getattr(self, name)}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:  # what a torch.Generator takes
            raise InvalidRequest("sampling.seed", f"must be a 64-bit integer, got {self.seed}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidRequest("sampling.logprobs", f"must be in [0, 20], got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise InvalidRequest("sampling.prompt_logprobs", f"must be in [0, 20], got {self.prompt_logprobs}")
        if len(self.stop) > max_stop_strings:
            raise InvalidRequest("sampling.stop", f"at most {max_stop_strings} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not s:
                raise InvalidRequest("sampling.stop", "stop strings must not be empty")
            if len(s) > max_stop_chars:
                raise InvalidRequest("sampling.stop", f"stop strings are limited to {max_stop_chars} characters")
            if "\ufffd" in s or any(0xD800 <= ord(c) <= 0xDFFF for c in s):
                raise InvalidRequest("sampling.stop", "stop strings must be valid UTF-8")
        if len(self.stop_token_ids) > max_stop_strings * 8:
            raise InvalidRequest("sampling.stop_token_ids", f"at most {max_stop_strings * 8} stop token ids")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequest("sampling.stop_token_ids", f"token id {bad[0]} is outside the vocabulary")
        if self.structured_output is not None:
            self.structured_output.validate()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    EOS = "eos"
    STOP = "stop"
    LENGTH = "length"
    ABORTED = "aborted"


@dataclass(eq=False)  # identity: distinct requests are never equal, and list lookups compare pointers
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    lower_hint: int | None = None
    upper_hint: int | None = None
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    status: Status = Status.WAITING
    admitted_at: float | None = None  # first admission (queue time ends)
    first_token_at: float | None = None
    last_token_at: float | None = None
    evictions: int = 0
    seq: int = 0  # arrival order, set by the engine
    admitted_seq: int = 0  # admission order (the FCFS victim is the latest admitted)
    generator: torch.Generator | None = None
    bound: int = 1  # A_min's pseudo lower bound on the output length (set from the predictor on arrival)
    # Prefix caching: content hashes of the request's full blocks so far, the namespace they start from (requests
    # whose K/V are computed differently, e.g. by sparse prefill, must not share blocks), how many of the blocks
    # in block_table are registered in the cache, and how many prompt tokens the first admission found cached.
    block_hashes: list[bytes] = field(default_factory=list)
    hash_root: bytes = b""
    registered_blocks: int = 0
    cached_tokens: int = 0
    prompt_logprobs_next: int = 1  # with params.prompt_logprobs: the next prompt index whose logprob is due
    adapter: Any = None  # the LoRA adapter it runs with (model/lora.py: LoraAdapter), None = the base model
    matcher: Any = None  # with params.structured_output: its llguidance matcher, advanced token by token
    # Speculative decoding (speculative.py): this step's guessed next tokens, computed after the last real one, and
    # the n-gram index they are looked up in
    draft: list[int] = field(default_factory=list)
    ngrams: Any = None
    spec_tried: float = 0.0  # drafts tried and kept recently (decayed counts: speculative.Speculator.record)
    spec_kept: float = 0.0
    spec_explored: int = 0  # drafts tried in all

    # The policies' view of a request (scheduler/policies.py: Job).
    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def produced(self) -> int:
        return len(self.output_ids)

    @property
    def lower(self) -> int:
        return self.lower_hint or 1

    @property
    def upper(self) -> int:
        return min(self.upper_hint or self.params.max_tokens, self.params.max_tokens)

    @property
    def true_output(self) -> int | None:
        return None

    @property
    def informed(self) -> bool:
        return self.lower_hint is not None or self.upper_hint is not None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, index: int) -> int:
        """The token at `index`: the prompt's, the output's, then this step's drafts'."""
        n = len(self.prompt_ids)
        if index < n:
            return self.prompt_ids[index]
        m = len(self.output_ids)
        return self.output_ids[index - n] if index - n < m else self.draft[index - n - m]
