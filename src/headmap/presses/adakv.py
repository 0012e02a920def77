"""AdaKV: one budget per layer, shared out across its heads by score. See docs/methods/presses/adakv.md."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .base import LayerView, Press, PressError, ScorerPress, drop_padding_first, scorer_from_spec, top_mask


@dataclass
class AdaKVPress(Press):
    """AdaKV (Feng et al. 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation").

    A layer keeps Hkv x n entries (n = int(T (1 - ratio)), the uniform budget), chosen as the
    highest scores of ``scorer`` across all its kv heads at once, so heads whose attention is spread
    keep more than heads that look at a few keys. Each head first keeps its ``alpha`` x n best
    entries (the safeguard). Parameters: ``ratio``, ``scorer`` (a press spec such as
    ``'snapkv:window=32'``, or a ScorerPress; default ``snapkv``), ``alpha`` (0.2). Same selection
    as kvpress's ``AdaKVPress``, which masks the dropped entries instead of freeing them; here they
    are freed (a ragged cache).
    """

    name = "adakv"

    scorer: Any = "snapkv"
    alpha: float = 0.2
    _scorer: ScorerPress | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise PressError(f"adakv: alpha must be a number in [0, 1], got {self.alpha!r}")
        if isinstance(self.scorer, str):
            inner = scorer_from_spec(self.scorer, ratio=self.ratio)
        else:
            inner = self.scorer
        if not isinstance(inner, ScorerPress):
            raise PressError(
                f"adakv: scorer must be a press that scores entries (h2o, snapkv, knorm, ...), got {inner!r}"
            )
        inner.ratio = self.ratio
        self._scorer = inner
        self.reads_received = inner.reads_received
        self.reads_window = inner.reads_window

    def window_rows(self) -> int:
        return self._scorer.window_rows()

    def notes(self, length: int) -> list[str]:
        return self._scorer.notes(length)

    @property
    def head_wise(self) -> bool:
        return True

    def params(self) -> dict[str, Any]:
        scorer = self._scorer.name if self._scorer is not None else self.scorer
        return {"ratio": self.ratio, "scorer": scorer, "alpha": self.alpha}

    def keep(self, view: LayerView) -> torch.Tensor:
        length = view.length
        n = min(self._scorer.budget(view), length)
        if n >= length:
            return torch.ones(view.keys.shape[:3], dtype=torch.bool, device=view.keys.device)
        scores = self._scorer.score(view).to(torch.float64)
        safe = top_mask(drop_padding_first(scores, view.key_valid), int(n * self.alpha))
        scores = drop_padding_first(scores.masked_fill(safe, math.inf), view.key_valid)
        batch, kv_heads, _ = scores.shape
        flat = top_mask(scores.reshape(batch, kv_heads * length), kv_heads * n)
        return flat.view(batch, kv_heads, length)
