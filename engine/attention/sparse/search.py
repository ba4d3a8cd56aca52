"""Offline pattern search (`optimist search-patterns`): per head, the candidate closest to dense attention on a
calibration prompt, among candidates of about equal cost.

Cost is expressed as a budget of keys per query row (`budget`), and the candidates (MInference's mix: A-shape,
vertical-slash from all-slash to all-vertical, block-sparse) are priced as the engine's CPU path pays for them, so
the same search serves a 135M model at 8K and an 8B model at 128K. Closeness is attention-mass recall: the share of
each row's dense softmax mass the pattern keeps, averaged over rows, measured with the keys the engine's sparse
path really visits for the pattern (its tile supersets included), so the score is what serving gets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...model.llama import Attention, Llama, apply_rope, prompt_logits
from .config import HeadPattern
from .estimate import LOCAL, SINKS
from .prefill import BLOCK, SLASH_GROUP, TILE, GroupSelection, _pairs, key_matrix, select_group


def calibration_text(min_chars: int) -> str:
    """Natural text for calibration without shipping a corpus: the standard library's own documentation, with a
    retrieval question at the end (long-range lookups are what sparse patterns must not lose)."""
    import importlib
    import pydoc

    names = ["collections", "functools", "itertools", "json", "pathlib", "re", "string", "textwrap", "typing",
             "asyncio", "logging", "argparse", "dataclasses", "datetime", "heapq", "bisect", "random"]  # fmt: skip
    parts = ["Below is documentation of Python modules. A secret code is hidden in it: the code is 40172.\n"]
    total = 0
    while total < min_chars:
        for name in names:
            doc = pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)  # type: ignore[attr-defined]
            parts.append(doc)
            total += len(doc)
            if total >= min_chars:
                break
    text = "".join(parts)[:min_chars]
    return text + "\nQuestion: what is the secret code hidden in the documentation above? Answer: the code is"


def candidates(budget: int) -> list[HeadPattern]:
    """Candidates of about equal cost on the CPU path, `budget` keys per query row: MInference's mix (A-shape;
    vertical-slash from all-slash to all-vertical; block-sparse), priced as that path pays. A column costs one key
    per row; the forced local window (LOCAL diagonals, kept as runs) costs about LOCAL + TILE; every further
    diagonal, kept in runs of SLASH_GROUP that each widen to a TILE + SLASH_GROUP band, about
    (TILE + SLASH_GROUP) / SLASH_GROUP keys."""
    local = -(-LOCAL // SLASH_GROUP) * SLASH_GROUP
    rest = max(0, budget - (local + TILE))
    per_slash = (TILE + SLASH_GROUP) / SLASH_GROUP

    def vs(vertical_share: float) -> HeadPattern:
        k_v = max(SINKS, round(rest * vertical_share))
        return HeadPattern("vertical_slash", k_v, local + round(rest * (1 - vertical_share) / per_slash))

    return [
        HeadPattern("a_shape", min(128, budget // 4), max(TILE, budget - min(128, budget // 4) - TILE)),
        vs(0.0),
        vs(0.25),
        vs(0.5),
        vs(0.75),
        vs(1.0),
        HeadPattern("block_sparse", max(2, budget // BLOCK), 0),
    ]


def capture_qk(model: Llama, tokens: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (q [n, Hq, D], k [n, Hkv, D]) after RoPE, from one dense prefill of `tokens`."""
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = []

    def hook(module: Attention, args: tuple[torch.Tensor, ...]) -> None:
        x, cos, sin = args[0], args[1], args[2]
        qkv = module.wqkv(x)
        t = x.shape[0]
        q = qkv[:, : module.q_size].view(t, module.n_heads, module.head_dim)
        k = qkv[:, module.q_size : module.q_size + module.kv_size].view(t, module.n_kv, module.head_dim)
        captured.append((apply_rope(q, cos, sin).float(), apply_rope(k, cos, sin).float()))

    for block in model.layers:
        handles.append(block.attn.register_forward_pre_hook(hook))  # type: ignore[union-attr]
    try:
        prompt_logits(model, tokens)
    finally:
        for h in handles:
            h.remove()
    return captured


def tile_mass(q: torch.Tensor, k: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """One head's causal softmax (fp32) summed over each tile of query rows: [tiles, n]. A pattern's recall is then
    (tile_mass * key_matrix).sum() / n, without an [n, n] mask per candidate."""
    n, d = q.shape
    tiles = -(-n // tile)
    out = torch.zeros((tiles, n))
    i = torch.arange(n)
    for t in range(tiles):
        rows = slice(t * tile, min(n, (t + 1) * tile))
        scores = (q[rows] @ k.T) / d**0.5
        probs = scores.masked_fill(i[None, :] > i[rows, None], float("-inf")).softmax(dim=-1)
        out[t] = probs.sum(dim=0)
    return out


def recall_of(mass: torch.Tensor, sel: GroupSelection, n: int) -> tuple[float, int]:
    """(recall, causal pairs visited) of a selection for a whole prompt of n tokens, from tile_mass."""
    keep = key_matrix(sel, 0, n, TILE)
    return float((mass * keep).sum()) / n, _pairs(keep, 0, n, TILE)


@dataclass
class SearchResult:
    patterns: list[list[HeadPattern]]  # per layer, per query head; score = recall on the calibration prompt
    density: float  # share of causal (row, key) pairs the chosen patterns visit


def search(
    model: Llama, tokens: list[int], budget: int, progress: Callable[[int, int], None] | None = None
) -> SearchResult:
    """Per head, the candidate with the highest recall on `tokens` (the whole prompt as one prefill chunk)."""
    cands = candidates(budget)
    captured = capture_qk(model, tokens)
    n = len(tokens)
    group = model.config.num_heads // model.config.num_kv_heads
    out: list[list[HeadPattern]] = []
    visited = 0
    for layer, (q, k) in enumerate(captured):
        heads: list[HeadPattern] = []
        # The engine selects keys per KV head for its whole query group (the union of the heads' estimates), so
        # the search prices and scores a candidate the same way: applied to every head of the group.
        for g in range(k.shape[1]):
            hs = list(range(g * group, (g + 1) * group))
            masses = [tile_mass(q[:, h], k[:, g]) for h in hs]
            best: tuple[float, HeadPattern, list[float], int] | None = None
            for cand in cands:
                sel = select_group([cand] * group, q[:, hs], k[:, g], 0)
                scored = [recall_of(mass, sel, n) for mass in masses]
                mean = sum(r for r, _ in scored) / group
                if best is None or mean > best[0]:
                    best = (mean, cand, [r for r, _ in scored], scored[0][1])
            assert best is not None
            heads += [HeadPattern(best[1].kind, best[1].a, best[1].b, round(r, 4)) for r in best[2]]
            visited += best[3] * group
        out.append(heads)
        if progress is not None:
            progress(layer + 1, len(captured))
    causal = n * (n + 1) // 2 * sum(len(h) for h in out)
    return SearchResult(out, visited / causal)


def evaluate(model: Llama, tokens: list[int], patterns: list[list[HeadPattern]]) -> tuple[float, float]:
    """(mean recall, density) of `patterns` on `tokens`, as the engine's sparse path would attend."""
    captured = capture_qk(model, tokens)
    n = len(tokens)
    group = model.config.num_heads // model.config.num_kv_heads
    total, visited, heads = 0.0, 0, 0
    for layer, (q, k) in enumerate(captured):
        for g in range(k.shape[1]):
            hs = list(range(g * group, (g + 1) * group))
            # the engine selects keys for the whole query group at once (union of its heads' patterns)
            sel = select_group([patterns[layer][h] for h in hs], q[:, hs], k[:, g], 0)
            for h in hs:
                score, pairs = recall_of(tile_mass(q[:, h], k[:, g]), sel, n)
                total += score
                visited += pairs
                heads += 1
    return total / heads, visited / (n * (n + 1) // 2 * heads)
