"""Gradient x input saliency (Shrikumar et al. 2016; Denil et al. 2014), L2 over the embedding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from . import _flash
from .base import Job, Method


@dataclass
class Saliency(Method):
    """value_j = || dy/dx_j ⊙ x_j ||_2, with x_j token j's input embedding and y the target.

    One forward and one backward. For a batch without padding whose attention calls are plain (causal
    or bidirectional) and whose device and dtype have a fused attention kernel, each such call runs the
    kernel, forward and backward (:func:`._flash.plain_forward`); else under the headmap engine where it
    runs the model (the backward recomputes attention block by block). Memory linear in T either way.
    The target value y(x) is kept for later methods (``job.known["x"]``). See docs/methods/saliency.md.
    """

    name: ClassVar[str] = "saliency"
    gradient: ClassVar[bool] = True

    def attribute(self, job: Job) -> torch.Tensor:
        embeds = job.embed().requires_grad_(True)
        with torch.enable_grad():
            y = _flash.score(job, embeds=embeds)
            (grad,) = torch.autograd.grad(y.sum(), embeds)
        job.known.setdefault("x", y.detach())
        return (grad * embeds.detach()).double().norm(dim=-1) * job.mask
