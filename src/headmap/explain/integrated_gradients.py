"""Integrated gradients (Sundararajan, Taly & Yan 2017, Axiomatic Attribution for Deep Networks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import OptionError
from . import _flash
from .base import Job, Method


@dataclass
class IntegratedGradients(Method):
    """IG_j = sum_e (x_j - x'_j)_e * (1/m) sum_{k=1..m} dy/dx_{j,e} at x' + a_k (x - x'), a_k = (k - 1/2)/m.

    The path integral of the gradient from a baseline x' to the input x, by the midpoint rule with
    ``steps`` = m points (Captum's ``riemann_middle``); a token's value is the sum over its embedding.
    ``baseline``: "zeros" (x' = 0) or "pad" (every token's embedding replaced by the pad token's).
    Completeness says sum_j IG_j = y(x) - y(x'); the gap |sum_j IG_j - (y(x) - y(x'))| of each input
    is reported (``job.notes["integrated_gradients_gap"]``); it shrinks as m grows when y is smooth along
    the path, and may not where y varies sharply near the baseline (docs/methods/integrated_gradients.md).

    Cost: m forwards and backwards, plus one forward for each end of the path, y(x) and y(x'), which
    the midpoint points never reach (a_k is never 0 or 1); an end another method already computed on
    the batch (``job.known``: saliency keeps y(x)) is read, not run again. For a batch without padding
    whose attention calls are plain (causal or bidirectional) and whose device and dtype have a fused
    attention kernel, those calls run the kernel, forward and backward (:func:`._flash.plain_forward`);
    else the headmap engine where it runs the model. Memory linear in T either way.
    See docs/methods/integrated_gradients.md.
    """

    name: ClassVar[str] = "integrated_gradients"
    gradient: ClassVar[bool] = True
    steps: int = 32
    baseline: str = "zeros"

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise OptionError(f"integrated_gradients needs steps >= 1 (got {self.steps!r}); 32 is a common choice")
        if self.baseline not in ("zeros", "pad"):
            raise OptionError(f"integrated_gradients baseline must be 'zeros' or 'pad' (got {self.baseline!r})")

    def base(self, job: Job) -> torch.Tensor:
        x = job.embed()
        if self.baseline == "zeros":
            return torch.zeros_like(x)
        return job.embed(torch.full_like(job.ids, job.pad))

    def attribute(self, job: Job) -> torch.Tensor:
        fast = _flash.plain_usable(job)
        x = job.embed()
        x0 = self.base(job)
        real = job.mask[..., None].to(x.dtype)
        x0 = real * x0 + (1 - real) * x  # padding stays itself: it is masked, so it takes no part
        total = torch.zeros_like(x, dtype=torch.float64)
        for k in range(self.steps):
            a = (k + 0.5) / self.steps
            point = (x0 + a * (x - x0)).requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(_flash.score(job, embeds=point, fast=fast).sum(), point)
            total += grad.double()
        ig = ((x - x0).double() * total / self.steps).sum(dim=-1) * job.mask
        delta = (self._end(job, "x", x, fast) - self._end(job, f"baseline:{self.baseline}", x0, fast)).double()
        job.notes["integrated_gradients_gap"] = (ig.sum(dim=-1) - delta).abs()
        return ig

    @staticmethod
    def _end(job: Job, name: str, embeds: torch.Tensor, fast: bool) -> torch.Tensor:
        """y at one end of the path: read from ``job.known`` when a method computed it, else one forward (kept)."""
        if name not in job.known:
            with torch.no_grad():
                job.known[name] = _flash.score(job, embeds=embeds, fast=fast).detach()
        return job.known[name]
