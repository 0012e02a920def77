"""The raw attention of the target row in the last layer: the baseline that attribution papers compare with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from . import _flash
from .base import Job, Method
from .capture import Capture, row_product


@dataclass
class LastLayerAttention(Method):
    """value_j = mean_h A_L[h, t, j]: the last layer's attention from the target row t to token j, head mean
    (summed over the rows of a generated span). See e.g. Jain & Wallace 2019, Attention is not Explanation;
    docs/methods/last_layer_attention.md.

    On the CPU without padding the forward runs PyTorch's fused attention kernel and keeps each row's
    log-sum-exp (:mod:`._flash`, as rollout does), so the row is ``exp(s - lse)`` from the kept queries
    and keys; elsewhere the engine's block-wise forward."""

    name: ClassVar[str] = "last_layer_attention"
    attention: ClassVar[bool] = True

    def attribute(self, job: Job) -> torch.Tensor:
        capture = Capture()
        with torch.no_grad():
            if _flash.usable(job):
                _flash.forward(job, capture)
            else:
                job.outputs(probes=[capture])
            return row_product(capture.layers()[-1], job.rows) * job.mask
