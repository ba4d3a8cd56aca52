"""Stop handling on the real tokenizer: stop strings across token boundaries are never half-emitted."""

from __future__ import annotations

from optimist.engine.engine import Engine
from optimist.engine.outputs import OutputState
from optimist.engine.request import FinishReason, Request, SamplingParams


def run(engine: Engine, text: str, **params: object) -> tuple[list[str], FinishReason | None, str]:
    tok = engine.tokenizer
    r = Request(id="x", prompt_ids=[1], params=SamplingParams(**params))  # type: ignore[arg-type]
    state = OutputState(r, tok)
    deltas: list[str] = []
    for t in tok.encode(text):
        r.output_ids.append(t)
        delta, reason, stop = state.append(r, t)
        deltas.append(delta)
        if reason is not None:
            return deltas, reason, stop
    return deltas, None, ""


def test_stop_string_spanning_tokens_ends_the_text_before_it(engine: Engine) -> None:
    text = "The answer is forty-two. Goodbye now, friend."
    stop = "ye now"
    assert not any(stop in engine.tokenizer.decode([t]) for t in engine.tokenizer.encode(text))  # really spans
    deltas, reason, matched = run(engine, text, stop=(stop, "never"), max_tokens=100)
    assert reason is FinishReason.STOP and matched == stop
    assert "".join(deltas) == "The answer is forty-two. Goodb"
    # Nothing past the cut was ever sent, not even a prefix of the stop string that was later withdrawn.
    sent = ""
    for d in deltas:
        sent += d
        assert "The answer is forty-two. Goodb".startswith(sent)


def test_earliest_stop_string_wins(engine: Engine) -> None:
    deltas, reason, matched = run(engine, "alpha beta gamma delta", stop=("delta", "beta"), max_tokens=100)
    assert (reason, matched, "".join(deltas)) == (FinishReason.STOP, "beta", "alpha ")


def test_length_flushes_held_back_text(engine: Engine) -> None:
    text = "one two three four"
    n = len(engine.tokenizer.encode(text))
    deltas, reason, _ = run(engine, text, stop=("zzzzzz",), max_tokens=n)
    assert reason is FinishReason.LENGTH
    assert "".join(deltas) == text


def test_stop_token_id_finishes_with_its_text_reported(engine: Engine) -> None:
    ids = engine.tokenizer.encode("hello world")
    deltas, reason, matched = run(engine, "hello world", stop_token_ids=(ids[-1],), max_tokens=100)
    assert reason is FinishReason.STOP
    assert matched == engine.tokenizer.token_text(ids[-1])
    assert "".join(deltas) == engine.tokenizer.decode(ids[:-1])
