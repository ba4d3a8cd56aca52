"""`optimist search-patterns` on the tiny model the tests write: a loadable MInference-format file, and recall and
cost that move with the budget, as the evaluation measures them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optimist.engine.attention.sparse.config import load_pattern_config
from optimist.engine.attention.sparse.search import candidates, evaluate, search, tile_masses
from optimist.engine.model import native
from optimist.engine.model.llama import Llama
from optimist.engine.model.loader import load_model

OPTIMIST = [sys.executable, "-m", "optimist.engine.cli"]


def _model(path: Path) -> tuple[Llama, object]:
    loaded = load_model(path)
    model = Llama(loaded.config)
    model.load_weights(loaded.weights)
    model.eval()
    model.init_rope()
    return model, loaded


def test_search_patterns_cli_writes_a_loadable_file(tiny_gguf: Path, tmp_path: Path) -> None:
    text = tmp_path / "calibration.txt"
    text.write_text("the cat sat on the mat and then the dog ran in a park. " * 20)
    out = tmp_path / "patterns.json"
    proc = subprocess.run(
        [*OPTIMIST, "search-patterns", "--model", str(tiny_gguf), "--output", str(out), "--prompt-file", str(text),
         "--length", "240", "--budget", "96", "--eval-file", str(text)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["tokens"] == [240] and summary["budget"] == 96
    assert 0.0 < summary["mean_recall"] <= 1.0 and 0.0 < summary["density"] <= 1.0
    assert 0.0 < summary["eval_recall"] <= 1.0
    model, _ = _model(tiny_gguf)
    patterns = load_pattern_config(out, model.config.num_layers, model.config.num_heads)
    assert all(p.kind in {"vertical_slash", "a_shape", "block_sparse", "coverage"} for layer in patterns for p in layer)
    raw = json.loads(out.read_text())  # MInference's format: a list of {head: [pattern, a, b, score]}
    assert len(raw) == model.config.num_layers and set(raw[0]) == {str(h) for h in range(model.config.num_heads)}


def test_budget_buys_recall_and_is_respected(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from optimist.engine.attention.sparse import prefill

    monkeypatch.setattr(prefill, "NEEDLE_VERTICALS", 16)  # scaled to the tiny model's 256-token context
    model, loaded = _model(tiny_gguf)
    tokens = loaded.tokenizer.encode("a tiny model reads this sentence again and again. " * 8)[:250]  # type: ignore[attr-defined]
    small = search(model, tokens, budget=64)
    large = search(model, tokens, budget=100_000)
    # a budget beyond the prompt makes every group dense: all the attention mass kept
    assert large.density > 0.999
    assert min(p.score for layer in large.patterns for p in layer) > 0.999
    # a small budget buys less: cheaper, and some attention mass lost
    assert small.density < 0.9 * large.density
    recall_small, density_small = evaluate(model, tokens, small.patterns)
    assert recall_small < 1.0 and density_small < 0.9
    assert abs(density_small - small.density) < 1e-6  # evaluate measures what search priced


def test_search_over_several_prompts_scores_their_mean(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With `also`, an option's recall is its mean over the prompts and its cost their pairs summed: the same
    prompt twice changes nothing; two prompts give each head the mean of its recalls there, as evaluated."""
    from optimist.engine.attention.sparse import prefill

    monkeypatch.setattr(prefill, "NEEDLE_VERTICALS", 16)  # scaled to the tiny model's 256-token context
    model, loaded = _model(tiny_gguf)
    first = loaded.tokenizer.encode("a tiny model reads this sentence again and again. " * 8)[:250]  # type: ignore[attr-defined]
    second = loaded.tokenizer.encode("numbers 12 34 56 and letters x y z, over and over; " * 9)[:230]  # type: ignore[attr-defined]
    alone = search(model, first, budget=96)
    assert search(model, first, budget=96, also=[first]) == alone
    both = search(model, first, budget=96, also=[second])
    (r1, d1), (r2, d2) = evaluate(model, first, both.patterns), evaluate(model, second, both.patterns)
    scores = [p.score for layer in both.patterns for p in layer]
    assert sum(scores) / len(scores) == pytest.approx((r1 + r2) / 2, abs=1e-3)  # scores are rounded to 4 places
    c1, c2 = 250 * 251 // 2, 230 * 231 // 2
    assert both.density == pytest.approx((d1 * c1 + d2 * c2) / (c1 + c2), abs=1e-9)


def test_evaluation_as_the_engine_chunks_the_prompt(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`evaluate(chunk=)` measures what the engine's chunked prefill computes: a prompt whose chunks all see at most
    DENSE_UP_TO keys runs dense (all the mass, every pair); with that switch off, one chunk covering the prompt is
    the whole-prompt measure, and chunks estimate their own patterns, which the measure follows."""
    from optimist.engine.attention.sparse import prefill
    from optimist.engine.attention.sparse import search as search_module

    monkeypatch.setattr(prefill, "NEEDLE_VERTICALS", 16)  # scaled to the tiny model's 256-token context
    model, loaded = _model(tiny_gguf)
    tokens = loaded.tokenizer.encode("a tiny model reads this sentence again and again. " * 8)[:250]  # type: ignore[attr-defined]
    patterns = search(model, tokens, budget=64).patterns
    assert evaluate(model, tokens, patterns, chunk=128) == (1.0, 1.0)  # 250 tokens: below the dense switch
    whole = evaluate(model, tokens, patterns)
    assert whole[0] < 1.0 and whole[1] < 0.9
    monkeypatch.setattr(search_module, "DENSE_UP_TO", 0)
    one = evaluate(model, tokens, patterns, chunk=256)
    assert one[0] == pytest.approx(whole[0], abs=1e-6) and one[1] == pytest.approx(whole[1], abs=1e-9)
    chunked = evaluate(model, tokens, patterns, chunk=64)
    assert 0.0 < chunked[0] <= 1.0 and 0.0 < chunked[1] <= 1.0 and chunked != one
    with pytest.raises(ValueError, match="multiple of 64"):
        evaluate(model, tokens, patterns, chunk=100)


def test_query_aware_candidates_are_priced_with_their_estimation() -> None:
    from optimist.engine.attention.sparse.config import HeadPattern
    from optimist.engine.attention.sparse.search import QUERY_AWARE, estimation_pairs

    causal = 1000 * 1001 // 2
    assert estimation_pairs(HeadPattern("query_aware", 16, 970), 1000) == round(causal / 8)  # 16 of 64 rows, half
    assert estimation_pairs(HeadPattern("query_aware", 999, 970), 1000) == round(causal / 2)  # every row at most
    assert estimation_pairs(HeadPattern("vertical_slash", 100, 100), 1000) == 0
    assert all(0 < r <= 64 and 0 < share <= 1000 for r, share in QUERY_AWARE)


def test_frontier_is_the_upper_concave_hull_of_cost_and_recall() -> None:
    """The greedy upgrade moves each group one step along its menu: a step that buys little recall per pair in
    front of one that buys much would stall it there, so the menu keeps only the hull's options."""
    from optimist.engine.attention.sparse.config import HeadPattern
    from optimist.engine.attention.sparse.search import _frontier, _Option

    points = [(10, 0.5), (20, 0.55), (30, 0.9), (35, 0.85), (40, 0.95), (60, 0.96)]
    options = [_Option(HeadPattern("a_shape", i, i), [r], p, p) for i, (p, r) in enumerate(points)]
    assert [(o.pairs, o.recall) for o in _frontier(options)] == [(10, 0.5), (30, 0.9), (40, 0.95), (60, 0.96)]


def test_candidates_span_the_patterns() -> None:
    kinds = [c.kind for c in candidates(512)]
    assert kinds.count("vertical_slash") == 5 and "a_shape" in kinds and "block_sparse" in kinds
    verticals = [c.a for c in candidates(512) if c.kind == "vertical_slash"]
    assert verticals == sorted(verticals)  # from all-slash to all-vertical


@pytest.mark.parametrize("n", [64, 200, 333])  # whole tiles; a partial last tile
def test_tile_masses_are_each_tiles_softmax_column_sums(n: int) -> None:
    """Against the [n, n] causal softmax directly: tile t's row is the column sums of its rows' probabilities; the
    C way (where it builds) gives the same."""
    g = torch.Generator().manual_seed(n)
    q, k = torch.randn(n, 3, 32, generator=g) * 2, torch.randn(n, 2, 32, generator=g)[:, 1]  # strided, as captured
    scores = torch.einsum("ihd,jd->hij", q.double(), k.double()) / 32**0.5
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)  # [3, n, n]
    tiles = -(-n // 64)
    expected = torch.stack([probs[:, t * 64 : (t + 1) * 64].sum(dim=1) for t in range(tiles)], dim=1)
    ways = [False] + ([True] if native.unavailable_reason() is None else [])
    for use_native in ways:
        got = tile_masses(q, k, 64, native=use_native)
        assert got.shape == (3, tiles, n)
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)
