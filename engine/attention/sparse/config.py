"""Per-head sparse patterns in MInference's published JSON format, so published configs can be reused:
a list with one object per layer mapping the head index (a string) to `[pattern, a, b, score]`, where pattern is
"vertical_and_slash" (a = k_v columns, b = k_s diagonals), "stream_llm" or "a_shape" (a = n_init sink columns,
b = n_local window) or "block_sparse" (a = key blocks kept per query block). Heads a file does not cover get the
spec's default: vertical-slash with k_v = 1000, k_s = 6096.

Ours, beyond MInference's names: "vertical_and_slash_coverage" (a, b in per mille, at most 1000): vertical-slash
whose budgets adapt to each prompt, as FlexPrefill's cumulative threshold: the fewest columns whose estimated
attention mass reaches a/1000 of the head's, and the fewest diagonals whose mass reaches b/1000 (sinks and the
local window always kept). A fixed k_v, k_s fits the text a search calibrated on; on a prompt whose attention is
more (or less) concentrated, coverage keeps the same share of it. "query_aware" (a = query rows sampled per 64-row
tile, b = per mille): each tile of a prefill chunk keeps the fewest keys holding b/1000 of its own last a rows'
attention (sinks and local window besides): the choice follows each tile's queries, not the chunk's last ones."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ...config import ModelConfig

_KINDS = {"vertical_and_slash": "vertical_slash", "stream_llm": "a_shape", "a_shape": "a_shape",
          "block_sparse": "block_sparse", "vertical_and_slash_coverage": "coverage",
          "query_aware": "query_aware"}  # fmt: skip
_NAMES = {"vertical_slash": "vertical_and_slash", "a_shape": "stream_llm", "block_sparse": "block_sparse",
          "coverage": "vertical_and_slash_coverage", "query_aware": "query_aware"}  # fmt: skip
PER_MILLE = 1000  # coverage patterns' a and b: shares of the estimated mass, in thousandths


class PatternConfigError(ValueError):
    """The pattern file is malformed; the message names the layer and head."""


@dataclass(frozen=True)
class HeadPattern:
    kind: str  # vertical_slash | a_shape | block_sparse | coverage (vertical-slash, budgets by mass: a, b per mille)
    # | query_aware (per tile: a rows sampled, b per mille)
    a: int
    b: int
    score: float = 0.0


DEFAULT = HeadPattern("vertical_slash", 1000, 6096)


def load_pattern_config(path: Path, num_layers: int, num_heads: int) -> list[list[HeadPattern]]:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PatternConfigError(f"{path}: cannot read pattern config ({exc})") from exc
    if not isinstance(raw, list):
        raise PatternConfigError(f"{path}: expected a list with one object per layer")
    if len(raw) > num_layers:
        raise PatternConfigError(f"{path}: {len(raw)} layers, the model has {num_layers}")
    out = [[DEFAULT] * num_heads for _ in range(num_layers)]
    for layer, heads in enumerate(raw):
        if not isinstance(heads, dict):
            raise PatternConfigError(f"{path}: layer {layer}: expected an object mapping head index to a pattern")
        for key, entry in heads.items():
            where = f"{path}: layer {layer}, head {key}"
            if not str(key).isdigit() or not 0 <= int(key) < num_heads:
                raise PatternConfigError(f"{where}: head index outside 0..{num_heads - 1}")
            if not isinstance(entry, list) or len(entry) < 3:
                raise PatternConfigError(f"{where}: expected [pattern, a, b, score]")
            kind = _KINDS.get(str(entry[0]))
            if kind is None:
                raise PatternConfigError(f"{where}: unknown pattern {entry[0]!r} (choose from {', '.join(_KINDS)})")
            a, b = entry[1], entry[2]
            if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (a, b)):
                raise PatternConfigError(f"{where}: budgets must be non-negative integers, got {a!r}, {b!r}")
            if kind == "coverage" and not (0 < a <= PER_MILLE and 0 < b <= PER_MILLE):
                raise PatternConfigError(f"{where}: coverage must be per mille in 1..{PER_MILLE}, got {a!r}, {b!r}")
            if kind == "query_aware" and not (a > 0 and 0 < b <= PER_MILLE):
                raise PatternConfigError(f"{where}: query_aware needs rows >= 1 and per mille in 1..{PER_MILLE}, got "
                                         f"{a!r}, {b!r}")  # fmt: skip
            score = float(entry[3]) if len(entry) > 3 else 0.0
            out[layer][int(key)] = HeadPattern(kind, a, b, score)
    return out


def save_pattern_config(path: Path, patterns: list[list[HeadPattern]]) -> None:
    layers = [{str(h): [_NAMES[p.kind], p.a, p.b, p.score] for h, p in enumerate(heads)} for heads in patterns]
    Path(path).write_text(json.dumps(layers) + "\n")


BUNDLED = Path(__file__).resolve().parent / "patterns"


def bundled_pattern_file(model_path: Path) -> Path | None:
    """A searched pattern file shipped for this model (`patterns/<model file stem>.json`), if any."""
    candidate = BUNDLED / f"{Path(model_path).stem}.json"
    return candidate if candidate.is_file() else None


def pattern_config_for(path: Path | None, model_path: Path, model: ModelConfig) -> list[list[HeadPattern]]:
    """The patterns the engine uses: the given file, else the bundled one for the model, else the defaults."""
    chosen = path if path is not None else bundled_pattern_file(model_path)
    if chosen is None:
        return [[DEFAULT] * model.num_heads for _ in range(model.num_layers)]
    return load_pattern_config(chosen, model.num_layers, model.num_heads)
