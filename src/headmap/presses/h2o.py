"""H2O: the keys that received the most attention during the prefill. See docs/methods/presses/h2o.md."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import LayerView, PressError, ScorerPress


@dataclass
class H2OPress(ScorerPress):
    """H2O, heavy hitters (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference").

    score(h_kv, j) = mean over the query heads h of kv head h_kv of sum_i A_h[i, j]: the attention
    key j receives, summed over every real query of the prefill. The sums come from the engine
    (one more fused kernel call per layer on a plain prefill, ``Block.column_sums`` otherwise), never
    from a [T, T] matrix. Parameters: ``ratio``, ``decode``
    (keep the budget while decoding too: each new query's attention is added to the sums and the
    lowest entry other than the newest token is evicted, as H2O's heavy-hitter cache does).

    kvpress's ``ObservedAttentionPress`` divides the sum by the number of queries that see key j
    (a mean, which favours late keys); H2O and headmap sum.
    """

    name = "h2o"
    reads_received = True

    decode: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.decode, bool):
            raise PressError(f"h2o: decode must be true or false, got {self.decode!r}")

    @property
    def evicts_in_decoding(self) -> bool:
        return bool(self.decode)

    def decode_scores(self, layer) -> torch.Tensor:
        """The running sums (prefill and every decoding query so far); the newest token is always kept."""
        newest = layer.positions == layer.seen - 1
        return layer.scores.to(torch.float64).masked_fill(newest, float("inf"))

    def score(self, view: LayerView) -> torch.Tensor:
        return view.per_kv_head(view.received)
