"""H2O: the keys that received the most attention during the prefill. See docs/methods/presses/h2o.md."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import LayerView, ScorerPress


@dataclass
class H2OPress(ScorerPress):
    """H2O, heavy hitters (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference").

    score(h_kv, j) = mean over the query heads h of kv head h_kv of sum_i A_h[i, j]: the attention
    key j receives, summed over every real query of the prefill. The sums come from the engine's
    block pass (``Block.column_sums``), never from a [T, T] matrix. Parameters: ``ratio``.

    kvpress's ``ObservedAttentionPress`` divides the sum by the number of queries that see key j
    (a mean, which favours late keys); H2O and headmap sum.
    """

    name = "h2o"
    reads_received = True

    def score(self, view: LayerView) -> torch.Tensor:
        return view.per_kv_head(view.received)
