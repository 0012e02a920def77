"""Knorm: keys with a low L2 norm are kept. See docs/methods/presses/knorm.md."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import LayerView, ScorerPress


@dataclass
class KnormPress(ScorerPress):
    """Knorm (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression").

    Keys with a low L2 norm draw high attention, so they are kept: score(h, j) = -||k_hj||.
    Parameters: ``ratio`` (fraction of the cache removed). The cheap baseline: reads no attention.
    """

    name = "knorm"

    def score(self, view: LayerView) -> torch.Tensor:
        return -view.keys.float().norm(dim=-1)
