"""Gradient x input saliency (Shrikumar et al. 2016; Denil et al. 2014), L2 over the embedding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Job, Method


@dataclass
class Saliency(Method):
    """value_j = || dy/dx_j ⊙ x_j ||_2, with x_j token j's input embedding and y the target.

    One forward and one backward (under the headmap engine where it runs the model: the backward then
    recomputes attention block by block, memory linear in T). See docs/methods/saliency.md.
    """

    name: ClassVar[str] = "saliency"
    gradient: ClassVar[bool] = True

    def attribute(self, job: Job) -> torch.Tensor:
        embeds = job.embed().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(job.score(embeds=embeds).sum(), embeds)
        return (grad * embeds.detach()).double().norm(dim=-1) * job.mask
