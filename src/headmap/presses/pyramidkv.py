"""PyramidKV: budgets that shrink with depth, SnapKV scores within a layer. See docs/methods/presses/pyramidkv.md."""

from __future__ import annotations

from dataclasses import dataclass

from .base import LayerView, check_count
from .snapkv import SnapKVPress


@dataclass
class PyramidKVPress(SnapKVPress):
    """PyramidKV (Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling").

    Lower layers keep more entries than higher ones, on a straight line from ``max_num`` (layer 0)
    to ``min_num`` (last layer) whose mean is the budget of ``ratio``; the kept entries of a layer
    are chosen by SnapKV scores. With C = window + T (1 - ratio): min_num = (C - window) / beta,
    max_num = 2 (C - window) - min_num (capped at T - window); when the line does not fit, every
    layer gets SnapKV's budget. Parameters: ``ratio``, ``window`` (64), ``kernel`` (5), ``beta``
    (20, steepness). Same budgets as kvpress's ``PyramidKVPress``.
    """

    name = "pyramidkv"

    beta: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count(self.name, "beta", self.beta, low=1)

    def budget(self, view: LayerView) -> int:
        length = view.length
        if self.window >= length:
            return length
        capacity = self.window + length * (1 - self.ratio)
        min_num = (capacity - self.window) / self.beta
        max_num = (capacity - self.window) * 2 - min_num
        if max_num >= length - self.window:
            max_num = length - self.window
            min_num = (capacity - self.window) * 2 - max_num
        if not (length >= max_num >= min_num >= self.window) or view.layers < 2:
            return round(length * (1 - self.ratio))
        steps = (max_num - min_num) / (view.layers - 1)
        return round(max_num - view.layer * steps)
