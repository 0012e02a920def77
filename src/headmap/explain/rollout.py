"""Attention rollout (Abnar & Zuidema 2020, Quantifying Attention Flow in Transformers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from . import _flash
from .base import Job, Method
from .capture import Capture, row_product


@dataclass
class Rollout(Method):
    """Attention rollout of the target rows: r = e_t^T (0.5 Ā_L + 0.5 I) ... (0.5 Ā_1 + 0.5 I).

    Ā_l is layer l's attention averaged over its query heads; the identity stands for the residual
    stream. e_t is 1 on the target row (on each row of a generated span: their sum). Computed without
    a T x T matrix: one forward keeps every layer's queries and keys (O(L T d)); then r goes down from
    the last layer, each layer's attention recomputed block by block (:func:`row_product`). Exact up
    to float rounding; the rows of a product of row-stochastic matrices sum to 1. On the CPU without
    padding the forward runs PyTorch's fused attention kernel and keeps each row's log-sum-exp, and each
    dense layer pass is one kernel call with queries and keys exchanged (:mod:`._flash`); elsewhere the
    engine's forward and block passes. See docs/methods/rollout.md.
    """

    name: ClassVar[str] = "rollout"
    attention: ClassVar[bool] = True

    def attribute(self, job: Job) -> torch.Tensor:
        capture = Capture()
        with torch.no_grad():
            if _flash.usable(job):
                _flash.forward(job, capture)
            else:
                job.outputs(probes=[capture])
            r = job.rows.clone()
            views, plans = capture.layers(), {}
            for i, view in enumerate(reversed(views)):
                r = 0.5 * row_product(view, r, plans=plans) + 0.5 * r
                job.layer_done(self.name, i + 1, len(views))
        return r * job.mask
