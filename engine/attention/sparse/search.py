"""Offline pattern search (`optimist search-patterns`): per head, the candidate closest to dense attention on a
calibration prompt, among candidates of about equal cost.

Cost is expressed as a budget of keys per query row (`budget`), and the candidates (MInference's mix: A-shape,
vertical-slash from all-slash to all-vertical, block-sparse) are priced as the engine's CPU path pays for them, so
the same search serves a 135M model at 8K and an 8B model at 128K. Closeness is attention-mass recall: the share of
each row's dense softmax mass the pattern keeps, averaged over rows, measured with the keys the engine's sparse
path really visits for the pattern (its tile supersets included), so the score is what serving gets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ...model.llama import Attention, Llama, apply_rope, prompt_logits
from ...model.native import estimate_scores, unavailable_reason
from .config import HeadPattern
from .estimate import LOCAL, SINKS
from .prefill import (
    BLOCK,
    DENSE_ABOVE,
    DENSE_UP_TO,
    SLASH_GROUP,
    TILE,
    GroupSelection,
    key_matrix,
    last_rows_scores,
    select_group,
    visited_pairs,
)


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


def records_text(min_chars: int) -> str:
    """Structured calibration text: a service log of similar records (timestamps, hosts, status, durations), as long
    prompts often are (logs, tables, code, few-shot examples), with a retrieval question at the end. Attention over
    repeated structure is far more concentrated than over prose; a search over prose alone cannot see which heads'
    budgets should follow the prompt. Deterministic (a seeded generator)."""
    import random

    rng = random.Random(1234)
    hosts = ["api-1", "api-2", "db-main", "cache-3", "worker-7", "gateway"]
    actions = ["GET /orders", "POST /login", "GET /search", "PUT /cart", "DELETE /session", "GET /health"]
    levels = ["INFO", "INFO", "INFO", "WARN", "ERROR"]
    lines = ["Below is a service log. One record holds the deployment code.\n"]
    total, i, secret = 0, 0, max(1, min_chars // 140)  # the code's record: about mid-way (~70 characters a record)
    while total < min_chars:
        i += 1
        line = (f"{i:06d} 2026-03-{1 + i // 2000:02d} {rng.randrange(24):02d}:{rng.randrange(60):02d}:"
                f"{rng.randrange(60):02d} {rng.choice(hosts)} {rng.choice(levels)} {rng.choice(actions)} "
                f"status={rng.choice((200, 200, 200, 404, 500))} took {rng.randrange(1, 999)} ms\n")  # fmt: skip
        if i == secret:
            line = f"{i:06d} 2026-03-01 09:15:00 deploy INFO deployment code is 71604\n"
        lines.append(line)
        total += len(line)
    return "".join(lines)[:min_chars] + "\nQuestion: what is the deployment code in the log above? Answer: it is"


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
    was = model.native_attention
    # the prefill's attention in C where it runs (the engine's CPU path; about twice torch's SDPA at 6K tokens)
    model.native_attention = was or _native_here(model.embed.weight)
    try:
        prompt_logits(model, tokens)
    finally:
        model.native_attention = was
        for h in handles:
            h.remove()
    return captured


def tile_masses(q: torch.Tensor, k: torch.Tensor, tile: int = TILE, native: bool = False) -> torch.Tensor:
    """The causal softmax (fp32) of a KV group's query heads (q [n, Hg, D] over k [n, D]) summed over each tile of
    query rows: [Hg, tiles, n]. A pattern's recall is then (masses[h] * key_matrix).sum() / n, without an [n, n]
    mask per candidate. native: each tile's sums in C (`native.estimate_scores` over the keys up to the tile's
    end: the tile's rows are its last queries), ~6x torch's way at 6K tokens on 2 cores."""
    n, group, d = q.shape
    tiles = -(-n // tile)
    out = torch.zeros((group, tiles, n), device=q.device)
    i = torch.arange(n, device=q.device)
    for t in range(tiles):
        rows = slice(t * tile, min(n, (t + 1) * tile))
        end = rows.stop
        got = estimate_scores(q[rows].transpose(0, 1), k[:end], slashes=False) if native else None
        if got is not None:
            out[:, t, :end] = got[0]
            continue
        scores = (q[rows].transpose(0, 1).float() @ k.float().T) / d**0.5  # [Hg, rows, n]
        probs = scores.masked_fill(i[None, :] > i[rows, None], float("-inf")).softmax(dim=-1)
        out[:, t] = probs.sum(dim=1)
    return out


def _kept_mass(masses: torch.Tensor, sel: GroupSelection, q_start: int, n: int) -> tuple[list[float], int]:
    """(mass kept per head, summed over the chunk's rows; causal pairs visited per head) of a group's selection for
    a chunk of n rows at q_start, from its heads' tile_masses over those rows' tiles ([Hg, tiles, keys]), as the
    engine attends: a selection above DENSE_ABOVE of the chunk's pairs runs dense (all the mass, at dense cost)."""
    keep = key_matrix(sel, q_start, n, TILE)
    pairs, causal = visited_pairs(keep, q_start, n, TILE), n * q_start + n * (n + 1) // 2
    if pairs > DENSE_ABOVE * causal:
        return [float(n)] * masses.shape[0], causal
    kept = keep.to(masses.dtype)
    return [float((mass[:, : keep.shape[1]] * kept).sum()) for mass in masses], pairs


def recall_of(masses: torch.Tensor, sel: GroupSelection, n: int) -> tuple[list[float], int]:
    """(recall per head, causal pairs visited per head) of a group's selection for a whole prompt of n tokens as one
    chunk, from its heads' tile_masses [Hg, tiles, n]."""
    kept, pairs = _kept_mass(masses, sel, 0, n)
    return [m / n for m in kept], pairs


def estimation_pairs(pattern: HeadPattern, n: int) -> int:
    """What a pattern's per-tile estimation costs on a prompt of n tokens, in visited (row, key) pairs per head:
    query-aware heads score their sampled rows (pattern.a per TILE) against every key those see, at about half a
    visited pair each (no values); other patterns estimate from the last 64 rows only (about 64 x n, small)."""
    if pattern.kind != "query_aware":
        return 0
    return round(min(pattern.a, TILE) / TILE * (n * (n + 1) // 2) / 2)


def _native_here(q: torch.Tensor) -> bool:
    """Whether the estimation's scores can run in C for tensors like q (CPU float32, the kernels built)."""
    return q.device.type == "cpu" and q.dtype == torch.float32 and unavailable_reason() is None


@dataclass
class SearchResult:
    patterns: list[list[HeadPattern]]  # per layer, per query head; score = recall on the calibration prompt
    density: float  # share of causal (row, key) pairs the chosen patterns visit


@dataclass
class _Option:
    pattern: HeadPattern
    recalls: list[float]  # per head of the group
    pairs: int  # its cost: causal (row, key) pairs visited per head, plus its estimation's (`estimation_pairs`)
    visited: int  # causal (row, key) pairs visited, per head

    @property
    def recall(self) -> float:
        return sum(self.recalls) / len(self.recalls)


BUDGET_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)
# coverage candidates (vertical, slash shares of the estimated mass, per mille): their cost follows the prompt
COVERAGES = ((500, 600), (600, 700), (700, 700), (700, 800), (800, 800), (800, 850), (800, 900), (900, 900),
             (900, 950), (950, 950))  # fmt: skip
# query-aware candidates (query rows sampled per tile, share per mille); priced with their estimation: each sampled
# row's scores against every key it sees, about half a visited pair each (no values)
QUERY_AWARE = ((8, 950), (8, 980), (16, 950), (16, 970), (16, 985), (32, 990))


def search(
    model: Llama,
    tokens: list[int],
    budget: int,
    progress: Callable[[int, int], None] | None = None,
    scales: tuple[float, ...] = BUDGET_SCALES,
    target_recall: float | None = None,
    also: Sequence[list[int]] = (),
) -> SearchResult:
    """Per KV group, a pattern for its heads on `tokens` (the whole prompt as one prefill chunk), and on the
    prompts `also` holds: an option's recall is then its mean over the prompts, its cost their pairs summed.

    Ours, beyond MInference's fixed per-head budget: every group gets candidates at several budgets (`scales` times
    `budget`, coverage and query-aware candidates whose budgets follow the prompt, and dense), and the budget is
    spent where it buys recall. Each group starts at its best cheapest option; then the upgrade with the most recall
    per extra key visited is taken, again and again, while the mean cost stays within `budget` keys per row, or,
    with `target_recall`, until the mean recall reaches it (whatever that costs). Concentrated heads stay cheap; diffuse
    ones (often the first layers) get wide or dense attention."""
    prompts = [tokens, *also]
    group = model.config.num_heads // model.config.num_kv_heads
    dense = HeadPattern("a_shape", 1 << 20, 1 << 20)  # every key, at any prompt length
    cands = [c for scale in scales for c in candidates(max(64, round(budget * scale)))]
    cands += [HeadPattern("coverage", a, b) for a, b in COVERAGES]
    cands += [HeadPattern("query_aware", r, share) for r, share in QUERY_AWARE] + [dense]
    layers = model.config.num_layers
    # per (layer, group), per candidate: recalls per head and pairs, summed over the prompts
    found: list[list[tuple[list[float], int, int]]] = []  # (recalls, visited pairs, estimation's pairs)
    for p, prompt in enumerate(prompts):
        n = len(prompt)
        for layer, (q, k) in enumerate(capture_qk(model, prompt)):
            for g in range(k.shape[1]):
                hs = list(range(g * group, (g + 1) * group))
                native = _native_here(q)
                masses = tile_masses(q[:, hs], k[:, g], native=native)
                scores = last_rows_scores(q[:, hs], k[:, g], native=native)  # the same for every candidate
                got = []
                for cand in cands:
                    sel = select_group([cand] * group, q[:, hs], k[:, g], 0, native, scores=scores)
                    recalls, pairs = recall_of(masses, sel, n)
                    got.append((recalls, pairs, estimation_pairs(cand, n)))
                if p == 0:
                    found.append(got)
                else:
                    i = layer * k.shape[1] + g
                    found[i] = [([a + b for a, b in zip(r0, r1, strict=True)], p0 + p1, e0 + e1)
                                for (r0, p0, e0), (r1, p1, e1) in zip(found[i], got, strict=True)]  # fmt: skip
            if progress is not None:
                progress(p * layers + layer + 1, len(prompts) * layers)
    share = 1 / len(prompts)
    menus = [
        _frontier([_Option(c, [r * share for r in rs], v + e, v) for c, (rs, v, e) in zip(cands, opts, strict=True)])
        for opts in found
    ]
    total = sum(len(prompt) for prompt in prompts)
    choice = [0] * len(menus)
    limit = budget * total * len(menus) if target_recall is None else float("inf")  # keys per row -> pairs
    spent = sum(m[0].pairs for m in menus)
    while target_recall is None or sum(m[c].recall for m, c in zip(menus, choice, strict=True)) < target_recall * len(
        menus
    ):
        best: tuple[float, int] | None = None
        for i, menu in enumerate(menus):
            if choice[i] + 1 < len(menu):
                cur, nxt = menu[choice[i]], menu[choice[i] + 1]
                if spent - cur.pairs + nxt.pairs <= limit:
                    gain = _gain(cur, nxt)
                    if best is None or gain > best[0]:
                        best = (gain, i)
        if best is None:
            break
        i = best[1]
        spent += menus[i][choice[i] + 1].pairs - menus[i][choice[i]].pairs
        choice[i] += 1
    out: list[list[HeadPattern]] = [[] for _ in range(layers)]
    groups_per_layer = model.config.num_kv_heads
    for i, menu in enumerate(menus):
        opt = menu[choice[i]]
        out[i // groups_per_layer] += [HeadPattern(opt.pattern.kind, opt.pattern.a, opt.pattern.b, round(r, 4))
                                       for r in opt.recalls]  # fmt: skip
    causal = sum(len(prompt) * (len(prompt) + 1) // 2 for prompt in prompts) * len(menus)
    return SearchResult(out, sum(m[c].visited for m, c in zip(menus, choice, strict=True)) / causal)


def _frontier(options: list[_Option]) -> list[_Option]:
    """The options worth having: sorted by cost, each with more recall than every cheaper one, and each step buying
    less recall per pair than the step before (the upper concave hull: an option whose step buys more than the one
    before it would wait behind that poorer step in the greedy upgrade, so the greedy goes to it directly)."""
    out: list[_Option] = []
    for opt in sorted(options, key=lambda o: (o.pairs, -o.recall)):
        if out and opt.recall <= out[-1].recall:
            continue
        while len(out) >= 2 and _gain(out[-2], out[-1]) <= _gain(out[-1], opt):
            out.pop()
        out.append(opt)
    return out


def _gain(cheaper: _Option, dearer: _Option) -> float:
    return (dearer.recall - cheaper.recall) / max(1, dearer.pairs - cheaper.pairs)


def evaluate(
    model: Llama, tokens: list[int], patterns: list[list[HeadPattern]], chunk: int | None = None
) -> tuple[float, float]:
    """(mean recall, density) of `patterns` on `tokens`, as the engine's sparse path attends: the whole prompt as
    one prefill chunk (the patterns' own measure, as the search scores them), or with `chunk` as the engine's
    chunked prefill runs it: chunks of that many tokens, each estimating its own pattern from its last queries
    against the keys it sees; a chunk seeing at most DENSE_UP_TO keys, and a group with a dense head or visiting
    more than DENSE_ABOVE of its chunk's pairs, run dense (all their mass)."""
    if chunk is not None and (chunk < TILE or chunk % TILE):
        raise ValueError(f"chunk must be a positive multiple of {TILE} tokens, got {chunk}")
    captured = capture_qk(model, tokens)
    n = len(tokens)
    spans = [(0, n)] if chunk is None else [(c, min(n, c + chunk)) for c in range(0, n, chunk)]
    group = model.config.num_heads // model.config.num_kv_heads
    kept, visited = 0.0, 0
    for layer, (q, k) in enumerate(captured):
        for g in range(k.shape[1]):
            hs = list(range(g * group, (g + 1) * group))
            native = _native_here(q)
            masses = tile_masses(q[:, hs], k[:, g], native=native)
            for c0, c1 in spans:
                rows = c1 - c0
                if chunk is not None and c1 <= DENSE_UP_TO:
                    kept += rows * len(hs)
                    visited += (rows * c0 + rows * (rows + 1) // 2) * len(hs)
                    continue
                # the engine selects keys for the whole query group at once (union of its heads' patterns)
                sel = select_group([patterns[layer][h] for h in hs], q[c0:c1, hs], k[:c1, g], c0, native)
                got, pairs = _kept_mass(masses[:, c0 // TILE : -(-c1 // TILE)], sel, c0, rows)
                kept += sum(got)
                visited += pairs * len(hs)
    heads = len(captured) * model.config.num_heads
    return kept / (n * heads), visited / (n * (n + 1) // 2 * heads)
