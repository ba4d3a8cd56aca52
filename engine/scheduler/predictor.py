"""The engine's lower-bound predictor for A_min: a client hint when the request has one, else a low quantile of
the output lengths of finished requests with similar prompt lengths (of the same LoRA adapter where it has enough of
them: fine-tunes differ most in how much they write), else 1."""

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
        self._recent: dict[tuple[str, int], deque[int]] = {}

    @staticmethod
    def bucket(prompt_len: int) -> int:
        return max(0, math.ceil(math.log2(max(prompt_len, 1))))

    def observe(self, prompt_len: int, output_len: int, group: str = "") -> None:
        """A finished request's lengths; `group`: its LoRA adapter ("" = the base model). Every request also counts
        toward the model-wide window, which a group without enough of its own falls back to."""
        bucket = self.bucket(prompt_len)
        keys = {(group, bucket), ("*", bucket)}
        for key in keys:
            self._recent.setdefault(key, deque(maxlen=self.window)).append(output_len)

    def _window(self, prompt_len: int, group: str) -> deque[int] | None:
        bucket = self.bucket(prompt_len)
        own = self._recent.get((group, bucket))
        if own is not None and len(own) >= self.min_samples:
            return own
        return self._recent.get(("*", bucket))

    def predict(self, prompt_len: int, max_tokens: int, hint: int | None = None, group: str = "") -> int:
        if hint is not None:
            return max(1, min(hint, max_tokens))
        recent = self._window(prompt_len, group)
        if recent is None or len(recent) < self.min_samples:
            return 1
        ordered = sorted(recent)
        value = ordered[min(len(ordered) - 1, int(self.quantile * len(ordered)))]
        return max(1, min(value, max_tokens))

    def samples(self, prompt_len: int, group: str = "") -> int:
        recent = self._window(prompt_len, group)
        return 0 if recent is None else len(recent)
