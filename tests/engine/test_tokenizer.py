"""The tokenizer built from GGUF metadata: same ids as transformers, clean incremental UTF-8, chat template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from optimist.engine.engine import Engine
from optimist.engine.model.tokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello world",
    "Hello 12345 world's  test",
    "  leading spaces and trailing  ",
    "naïve café – “quotes” — ünïcödé",
    "日本語のテキストと絵文字 🚀🔥👩‍👩‍👧",
    "def f(x):\n\treturn x ** 2  # square\n",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "",
]


@pytest.fixture(scope="module")
def hf_tokenizer(model_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(engine: Engine, hf_tokenizer: Any, text: str) -> None:
    assert engine.tokenizer.encode(text) == hf_tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_chat_template_matches_transformers(engine: Engine, hf_tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a color."},
    ]
    for msgs in (messages, messages[1:2]):
        ours = engine.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
        ref = hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert ours == ref


@pytest.mark.parametrize("text", TEXTS)
def test_decode_roundtrip_and_incremental_deltas_are_whole_characters(engine: Engine, text: str) -> None:
    tok = engine.tokenizer
    ids = tok.encode(text)
    visible = text.replace("<|im_start|>", "").replace("<|im_end|>", "")  # special tokens carry no text
    assert tok.decode(ids) == visible
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == visible
    assert all("\ufffd" not in d for d in deltas)
    # Multi-byte characters really were split across tokens in this set (or the check above proves little).
    if "🚀" in text:
        assert sum(1 for d in deltas[:-1] if d == "") > 0


def test_invalid_utf8_at_the_end_becomes_a_replacement_character(engine: Engine) -> None:
    tok = engine.tokenizer
    ids = tok.encode("🚀")
    detok = IncrementalDetokenizer(tok)
    partial = [detok.add(i) for i in ids[:-1]]
    assert "".join(partial) == ""
    assert detok.flush() == "\ufffd"


def test_qwen2_gguf_splits_text_as_transformers_does(tmp_path: Path) -> None:
    """Qwen2's pre-tokenizer (one digit per piece, contractions, newline runs) as transformers converts it from
    the same GGUF file: the same pieces and the same ids."""
    from transformers import AutoTokenizer

    from optimist.engine.model.loader import load_model

    from .. import tiny_llama

    path = tiny_llama.write_gguf(tmp_path / "tiny.gguf", arch="qwen2")
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    ours = load_model(path).tokenizer
    for text in ("I'll pay 12345 dollars,\n\n  don't   you?\tOK 3.14", "the cat\r\nsat  on 2024-01-02"):
        assert ours.backend.pre_tokenizer.pre_tokenize_str(text) == (
            ref.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
        )
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False)
    assert [p for p, _ in ours.backend.pre_tokenizer.pre_tokenize_str("12345")] == list("12345")
