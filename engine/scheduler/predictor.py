"""The engine's lower-bound predictor for A_min: a client hint when the request has one, else a low quantile of
the output lengths of finished requests with similar prompt lengths, else 1."""

from __future__ import annotations

import math
from collections import deque


class LowerBoundPredictor:
    """Per prompt-length bucket (powers of two), the `quantile` of recent output lengths once `min_samples` exist.

    A low quantile keeps the bound a lower bound for most requests (A_min plans optimistically and raises the
    bound as tokens arrive); the window keeps it tracking a changing workload.
    """

    def __init__(self, quantile: float = 0.1, min_samples: int = 20, window: int = 512) -> None:
        if not 0 < quantile < 1:
            raise ValueError(f"quantile must be in (0, 1), got {quantile}")
        self.quantile = quantile
        self.min_samples = min_samples
        self.window = window
        self._recent: dict[int, deque[int]] = {}

    @staticmethod
    def bucket(prompt_len: int) -> int:
        return max(0, math.ceil(math.log2(max(prompt_len, 1))))

    def observe(self, prompt_len: int, output_len: int) -> None:
        self._recent.setdefault(self.bucket(prompt_len), deque(maxlen=self.window)).append(output_len)

    def predict(self, prompt_len: int, max_tokens: int, hint: int | None = None) -> int:
        if hint is not None:
            return max(1, min(hint, max_tokens))
        recent = self._recent.get(self.bucket(prompt_len))
        if recent is None or len(recent) < self.min_samples:
            return 1
        ordered = sorted(recent)
        value = ordered[min(len(ordered) - 1, int(self.quantile * len(ordered)))]
        return max(1, min(value, max_tokens))

    def samples(self, prompt_len: int) -> int:
        recent = self._recent.get(self.bucket(prompt_len))
        return 0 if recent is None else len(recent)
