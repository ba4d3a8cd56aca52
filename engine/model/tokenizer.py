"""The tokenizer and chat template, built from the model's own metadata (GGUF fields or tokenizer.json).

Decoding goes through a per-token byte table rather than `tokenizers`' decoder: the bytes of a sequence are the
concatenation of its tokens' bytes, so an incremental UTF-8 decoder over them yields text deltas that never hold a
broken character, in O(1) per token.
"""

from __future__ import annotations

import codecs
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# GGUF token types (llama.cpp's llama_token_type).
_TYPE_NORMAL, _TYPE_UNKNOWN, _TYPE_CONTROL, _TYPE_USER_DEFINED, _TYPE_UNUSED, _TYPE_BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes by GGUF `tokenizer.ggml.pre` (the same table llama.cpp keeps).
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's: as Llama 3's but one digit per piece
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell", "exaone", "minerva", "command-r"}


class TokenizerError(ValueError):
    """The tokenizer metadata is missing or unsupported, or a chat template failed to render."""


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's reversible byte<->unicode map, inverted: printable stand-in character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _byte_level_bytes(token: str) -> bytes:
    table = _byte_decoder()
    try:
        return bytes(table[ch] for ch in token)
    except KeyError:  # added tokens are stored as plain text
        return token.encode("utf-8")


def _metaspace_bytes(token: str) -> bytes:
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return bytes([int(token[3:5], 16)])
    return token.replace("\u2581", " ").encode("utf-8")


@dataclass
class Tokenizer:
    backend: HFTokenizer
    token_bytes: list[bytes]  # what each token contributes to the output text (b"" for special tokens)
    special_ids: frozenset[int]
    eos_ids: tuple[int, ...]
    bos_id: int | None
    add_bos: bool
    chat_template: str | None
    strip_leading_space: bool = False  # SentencePiece prefix space of the first token
    _template: Any = field(default=None, repr=False)

    @property
    def vocab_size(self) -> int:
        return len(self.token_bytes)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.backend.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        """A readable form of one token, special tokens included (for reporting a matched stop token)."""
        return self.backend.id_to_token(token_id) or ""

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt for a chat; `tools` (OpenAI's function tools) reach templates that show them to the model."""
        if self.chat_template is None:
            raise TokenizerError("the model has no chat template")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise TokenizerError(f"chat template: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        bos = self.backend.id_to_token(self.bos_id) if self.bos_id is not None else ""
        eos = self.backend.id_to_token(self.eos_ids[0]) if self.eos_ids else ""
        try:
            return str(
                self._template.render(
                    messages=list(messages),
                    add_generation_prompt=add_generation_prompt,
                    bos_token=bos,
                    eos_token=eos,
                    tools=list(tools) if tools else None,
                )
            )
        except TokenizerError:
            raise
        except Exception as exc:
            raise TokenizerError(f"chat template failed: {exc}") from exc


class IncrementalDetokenizer:
    """Turns a growing token sequence into text deltas that never end inside a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._bytes = tokenizer.token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip = tokenizer.strip_leading_space
        self._first = True

    def add(self, token_id: int) -> str:
        data = self._bytes[token_id]
        if self._first and data:
            if self._strip and data.startswith(b" "):
                data = data[1:]
            self._first = False
        return str(self._decoder.decode(data))

    def flush(self) -> str:
        """Whatever bytes are still pending (an unfinished character becomes U+FFFD)."""
        return str(self._decoder.decode(b"", final=True))


# ------------------------------------------------------------------------------------------------- GGUF


# Built tokenizers by file identity (path, size, mtime): a second engine in the process reuses the build.
_GGUF_CACHE: dict[tuple[str, int, int], Tokenizer] = {}


def tokenizer_from_gguf(reader: Any, path: Path) -> Tokenizer:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _GGUF_CACHE:
        _GGUF_CACHE[key] = _build_gguf_tokenizer(reader, path)
    return _GGUF_CACHE[key]


def _build_gguf_tokenizer(reader: Any, path: Path) -> Tokenizer:
    get = reader.get  # a GGUFFile: metadata key -> value

    kind = get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(f"{path}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    tokens: list[str] = get("tokenizer.ggml.tokens")
    merges: list[str] = get("tokenizer.ggml.merges", [])
    types: list[int] = get("tokenizer.ggml.token_type", [_TYPE_NORMAL] * len(tokens))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = HFTokenizer(models.BPE(vocab, pairs, ignore_merges=False))  # type: ignore[arg-type]
    pre = get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("llama-bpe", "llama3", "qwen2"):
        regex = _QWEN2_REGEX if pre == "qwen2" else _LLAMA3_REGEX
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    specials = [i for i, t in enumerate(types) if t == _TYPE_CONTROL]
    user_defined = [i for i, t in enumerate(types) if t == _TYPE_USER_DEFINED]
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in specials])
    if user_defined:
        backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user_defined])
    special_set = frozenset(specials)
    token_bytes = [b"" if i in special_set else _byte_level_bytes(t) for i, t in enumerate(tokens)]
    eos_ids = [int(get("tokenizer.ggml.eos_token_id", 0))]
    eot = get("tokenizer.ggml.eot_token_id")
    if eot is not None and int(eot) not in eos_ids:
        eos_ids.append(int(eot))
    bos = get("tokenizer.ggml.bos_token_id")
    return Tokenizer(
        backend=backend,
        token_bytes=token_bytes,
        special_ids=special_set,
        eos_ids=tuple(eos_ids),
        bos_id=None if bos is None else int(bos),
        add_bos=bool(get("tokenizer.ggml.add_bos_token", False)),
        chat_template=get("tokenizer.chat_template"),
    )


# ------------------------------------------------------------------------------------- Hugging Face dir


def tokenizer_from_hf_dir(path: Path) -> Tokenizer:
    file = path / "tokenizer.json"
    if not file.exists():
        raise TokenizerError(f"{path}: no tokenizer.json in the model folder")
    backend = HFTokenizer.from_file(str(file))
    spec = json.loads(file.read_text())
    settings: dict[str, Any] = {}
    if (path / "tokenizer_config.json").exists():
        settings = json.loads((path / "tokenizer_config.json").read_text())
    decoder_json = json.dumps(spec.get("decoder") or {})
    byte_level = "ByteLevel" in decoder_json
    vocab_size = backend.get_vocab_size(with_added_tokens=True)
    special_ids = frozenset(int(t["id"]) for t in spec.get("added_tokens", []) if t.get("special"))
    token_bytes: list[bytes] = []
    for i in range(vocab_size):
        tok = backend.id_to_token(i) or ""
        if i in special_ids:
            token_bytes.append(b"")
        elif byte_level:
            token_bytes.append(_byte_level_bytes(tok))
        else:
            token_bytes.append(_metaspace_bytes(tok))

    def token_id(value: Any) -> int | None:
        if isinstance(value, dict):
            value = value.get("content")
        return None if value is None else backend.token_to_id(str(value))

    eos: list[int] = []
    gen_file = path / "generation_config.json"
    cfg_file = path / "config.json"
    for source in (gen_file, cfg_file):
        if source.exists() and not eos:
            value = json.loads(source.read_text()).get("eos_token_id")
            eos = [int(v) for v in value] if isinstance(value, list) else ([int(value)] if value is not None else [])
    if not eos:
        found = token_id(settings.get("eos_token"))
        eos = [found] if found is not None else []
    template = settings.get("chat_template")
    if template is None and (path / "chat_template.jinja").exists():
        template = (path / "chat_template.jinja").read_text()
    return Tokenizer(
        backend=backend,
        token_bytes=token_bytes,
        special_ids=special_ids,
        eos_ids=tuple(eos),
        bos_id=token_id(settings.get("bos_token")),
        add_bos=bool(settings.get("add_bos_token", False)),
        chat_template=template if isinstance(template, str) else None,
        strip_leading_space=not byte_level and "Strip" in decoder_json,
    )
