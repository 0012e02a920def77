"""SnapKV: attention from the last queries, pooled. See docs/methods/presses/snapkv.md."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import LayerView, PressError, ScorerPress, check_count


@dataclass
class SnapKVPress(ScorerPress):
    """SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation").

    The last ``window`` queries (the observation window) vote: for key j < T - window,
    s_h(j) = mean over the window's queries i of A_h[i, j], smoothed by a mean pool of width
    ``kernel`` (zero padded, stride 1), then averaged over the query heads of each kv head. The
    window's own keys score max + 1 (above every earlier key), so they are kept first. Parameters: ``ratio``,
    ``window`` (default 64), ``kernel`` (odd, default 5). Same definition as kvpress's
    ``SnapKVPress``.
    """

    name = "snapkv"
    reads_window = True

    window: int = 64
    kernel: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count(self.name, "window", self.window, low=1)
        check_count(self.name, "kernel", self.kernel, low=1)
        if self.kernel % 2 == 0:
            raise PressError(f"{self.name}: kernel must be odd (the pool is centred on each key), got {self.kernel}")

    def window_rows(self) -> int:
        return self.window

    def notes(self, length: int) -> list[str]:
        if self.window >= length:
            return [
                f"{self.name}: the observation window ({self.window}) covers the whole input of {length} tokens; "
                "the cache is kept whole"
            ]
        return []

    def budget(self, view: LayerView) -> int:
        if self.window >= view.length:
            return view.length
        return super().budget(view)

    def score(self, view: LayerView) -> torch.Tensor:
        rows = min(self.window, view.length)
        past = view.length - rows
        mean = view.window[..., :past] / rows  # [B, H, T - window]
        batch, heads, _ = mean.shape
        pooled = F.avg_pool1d(mean.reshape(batch * heads, 1, past), self.kernel, stride=1, padding=self.kernel // 2)
        scores = view.per_kv_head(pooled.view(batch, heads, past))
        top = scores.max() if scores.numel() else torch.tensor(0.0, dtype=scores.dtype)
        # the window's keys score above every earlier key (max + 1, as kvpress), so a budget of at most
        # the window keeps window keys only, and a larger one keeps the whole window
        return F.pad(scores, (0, rows), value=float(top) + 1.0)
