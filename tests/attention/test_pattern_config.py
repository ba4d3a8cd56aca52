"""MInference-format pattern files: published names read, uncovered heads defaulted, bad files named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from optimist.engine.attention.sparse.config import (
    DEFAULT,
    HeadPattern,
    PatternConfigError,
    load_pattern_config,
    save_pattern_config,
)


def test_reads_published_names_and_defaults_uncovered_heads(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"0": ["vertical_and_slash", 500, 1500, 0.91], "2": ["stream_llm", 128, 4096, 0.5]},
                                {"1": ["block_sparse", 100, 0, 0.7]}]))  # fmt: skip
    got = load_pattern_config(path, num_layers=3, num_heads=3)
    assert got[0][0] == HeadPattern("vertical_slash", 500, 1500, 0.91)
    assert got[0][2] == HeadPattern("a_shape", 128, 4096, 0.5)
    assert got[1][1] == HeadPattern("block_sparse", 100, 0, 0.7)
    assert got[0][1] == got[1][0] == got[2][2] == DEFAULT == HeadPattern("vertical_slash", 1000, 6096)


def test_round_trip(tmp_path: Path) -> None:
    patterns = [[HeadPattern("a_shape", 64, 1024, 0.2), HeadPattern("vertical_slash", 30, 2048, 0.9)],
                [HeadPattern("coverage", 800, 950, 0.97), HeadPattern("query_aware", 16, 970, 0.96)]]  # fmt: skip
    save_pattern_config(tmp_path / "p.json", patterns)
    assert load_pattern_config(tmp_path / "p.json", 2, 2) == patterns
    assert json.loads((tmp_path / "p.json").read_text())[1]["0"] == ["vertical_and_slash_coverage", 800, 950, 0.97]


@pytest.mark.parametrize(
    "content,fragment",
    [
        ('{"0": {}}', "expected a list"),
        ('[{"0": ["dense", 1, 2, 0.1]}]', "layer 0, head 0: unknown pattern 'dense'"),
        ('[{"7": ["vertical_and_slash", 1, 2, 0.1]}]', "layer 0, head 7: head index outside 0..1"),
        ('[{"1": ["vertical_and_slash", -1, 2, 0.1]}]', "layer 0, head 1: budgets must be non-negative"),
        ('[{"0": ["vertical_and_slash_coverage", 800, 1200, 0.1]}]', "layer 0, head 0: coverage must be per mille"),
        ('[{"0": ["vertical_and_slash_coverage", 0, 900]}]', "layer 0, head 0: coverage must be per mille"),
        ('[{"1": ["query_aware", 0, 900]}]', "layer 0, head 1: query_aware needs rows >= 1"),
        ('[{"1": ["query_aware", 16, 1001]}]', "layer 0, head 1: query_aware needs rows >= 1"),
        ("[{}, {}, {}]", "3 layers, the model has 2"),
        ("not json", "cannot read pattern config"),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(PatternConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_pattern_config(path, num_layers=2, num_heads=2)
