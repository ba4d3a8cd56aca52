"""How far structure can take a vertical-slash plan's recall on `bench sparse-attention`'s inputs (session 27).

For `structured_qkv(n, 8, 2, 128)` (two KV groups, float32, CPU) and 16 rows from n/8 on, prints the recall and keys
per row of: the plan at MInference's budget (1000 columns, 6096 diagonals, 64-row blocks); that plan plus, per query
block, the B key blocks with the best mean-pooled scores (block-sparse's estimate); and that plan plus the C columns
an oracle picks from 64 other rows' exact softmax (the best any column estimate could do). At n = 1M (24 GB of
memory is plenty; ~3 minutes on 2 cores) none of them reaches 0.95 within 8x SDPA's cost: the rest of the mass is
each row's own background. Run from the repository root:

    .venv/bin/python benchmarks/analysis/recall_ceiling.py 1048576
"""

from __future__ import annotations

import math
import sys

import torch

from optimist.engine.attention.sparse.config import HeadPattern
from optimist.engine.attention.sparse.gpu import plan
from optimist.engine.bench.sparse_attention import mass_kept, structured_qkv


def main(n: int) -> None:
    hq, hkv, d, block = 8, 2, 128, 64
    group = hq // hkv
    q, k, v, _ = structured_qkv(n, hq, hkv, d, torch.float32, torch.device("cpu"), seed=n)
    del v
    sparse = plan(q.transpose(0, 1), k.transpose(0, 1), 0, [HeadPattern("vertical_slash", 1000, 6096)] * hq, block)
    rows = torch.linspace(n // 8, n - 1, 16).long().unique()

    def show(label: str, mask_fn) -> None:  # type: ignore[no-untyped-def]
        r = mass_kept(q, k, mask_fn, rows, oracle=False)
        print(f"{label:<44} recall {r['recall']:.4f}  keys per row {r['keys']:,.0f}  pairs {r['pairs']:.4f}")

    show("plan (1000 columns, 6096 diagonals)", sparse.rows_mask)
    nk = -(-n // block)
    pooled_k = torch.nn.functional.pad(k, (0, 0, 0, nk * block - n)).view(hkv, nk, block, d).mean(2)
    for top in (16, 64, 256):

        def with_blocks(h: int, r: torch.Tensor, top: int = top) -> torch.Tensor:
            mask = sparse.rows_mask(h, r).clone()
            for i, row in enumerate(r.tolist()):
                qb = row // block
                scores = pooled_k[h // group, : qb + 1] @ q[h, qb * block : min(n, qb * block + block)].mean(0)
                scores[qb] = float("inf")
                keys = (scores.topk(min(top, qb + 1)).indices[:, None] * block + torch.arange(block)).flatten()
                mask[i, keys[keys <= row]] = True
            return mask

        show(f"plan + {top} best pooled key blocks per block", with_blocks)
    others = torch.linspace(n // 8 + 17, n - 18, 64).long()
    visible = torch.arange(n)[None] <= others[:, None]
    column_mass = {}
    for h in range(hq):
        probs = ((q[h, others] @ k[h // group].T) / math.sqrt(d)).masked_fill(~visible, float("-inf")).softmax(-1)
        column_mass[h] = probs.mean(0)
        del probs
    for extra in (1000, 16000, 64000):

        def with_columns(h: int, r: torch.Tensor, extra: int = extra) -> torch.Tensor:
            add = torch.zeros(n, dtype=torch.bool)
            add[column_mass[h].topk(extra).indices] = True
            return sparse.rows_mask(h, r) | (add[None] & (torch.arange(n)[None] <= r[:, None]))

        show(f"plan + {extra} oracle columns", with_columns)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 20)
