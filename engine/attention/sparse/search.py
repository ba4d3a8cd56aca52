"""Offline pattern search (`optimist search-patterns`): per head, the candidate closest to dense attention on a
calibration prompt, among candidates of about equal cost.

Cost is expressed as a budget of keys per query row (`budget`); MInference's candidate list (A-shape 1024+4096;
vertical-slash (30, 2048), (100, 1800), (500, 1500), (3000, 200); block-sparse top 100) is scaled to it, so the
same search serves a 135M model at 8K and an 8B model at 128K. Closeness is attention-mass recall: the share of
each row's dense softmax mass the pattern keeps, averaged over rows, measured with the keys the engine's sparse
path really visits for the pattern (its tile supersets included), so the score is what serving gets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...model.llama import Attention, Llama, apply_rope, prompt_logits
from .config import HeadPattern
from .prefill import TILE, GroupSelection, keys_for_tile, select_group


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
    """MInference's equal-cost candidates, scaled from its 2048-key budget to `budget` keys per row."""
    f = budget / 2048

    def s(x: float) -> int:
        return max(1, round(x * f))

    return [
        HeadPattern("a_shape", min(128, s(1024)), s(4096) // 2),
        HeadPattern("vertical_slash", 30, s(2048)),
        HeadPattern("vertical_slash", s(100), s(1800)),
        HeadPattern("vertical_slash", s(500), s(1500)),
        HeadPattern("vertical_slash", s(3000), s(200)),
        HeadPattern("block_sparse", max(1, budget // 64), 0),
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


def dense_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal softmax of one head, [n, n] float32."""
    n, d = q.shape
    scores = (q @ k.T) / d**0.5
    i = torch.arange(n)
    return scores.masked_fill(i[None, :] > i[:, None], float("-inf")).softmax(dim=-1)


def selection_mask(sel: GroupSelection, n: int, tile: int = TILE) -> torch.Tensor:
    """[n, n] (query, key) pairs the engine's sparse path visits for a whole prompt of n tokens (causal)."""
    mask = torch.zeros((n, n), dtype=torch.bool)
    for a in range(0, n, tile):
        b = min(n, a + tile)
        mask[a:b, keys_for_tile(sel, a, b, 0)] = True
    i = torch.arange(n)
    return mask & (i[None, :] <= i[:, None])


def recall(probs: torch.Tensor, mask: torch.Tensor) -> float:
    return float((probs * mask).sum(dim=-1).mean())


@dataclass
class SearchResult:
    patterns: list[list[HeadPattern]]  # per layer, per query head; score = recall on the calibration prompt
    density: float  # share of causal (row, key) pairs the chosen patterns visit


def search(
    model: Llama, tokens: list[int], budget: int, progress: Callable[[int, int], None] | None = None
) -> SearchResult:
    """Per head, the candidate with the highest recall on `tokens`."""
    cands = candidates(budget)
    captured = capture_qk(model, tokens)
    n = len(tokens)
    group = model.config.num_heads // model.config.num_kv_heads
    out: list[list[HeadPattern]] = []
    visited = 0
    for layer, (q, k) in enumerate(captured):
        heads = []
        for h in range(q.shape[1]):
            qh, kh = q[:, h], k[:, h // group]
            probs = dense_probs(qh, kh)
            best: tuple[float, HeadPattern, int] | None = None
            for cand in cands:
                mask = selection_mask(select_group([cand], qh[:, None, :], kh, 0), n)
                score = recall(probs, mask)
                if best is None or score > best[0]:
                    best = (score, cand, int(mask.sum()))
            assert best is not None
            heads.append(HeadPattern(best[1].kind, best[1].a, best[1].b, round(best[0], 4)))
            visited += best[2]
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
            mask = selection_mask(select_group([patterns[layer][h] for h in hs], q[:, hs], k[:, g], 0), n)
            for h in hs:
                total += recall(dense_probs(q[:, h], k[:, g]), mask)
                visited += int(mask.sum())
                heads += 1
    return total / heads, visited / (n * (n + 1) // 2 * heads)
