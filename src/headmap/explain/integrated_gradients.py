"""Integrated gradients (Sundararajan, Taly & Yan 2017, Axiomatic Attribution for Deep Networks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import OptionError
from .base import Job, Method


@dataclass
class IntegratedGradients(Method):
    """IG_j = sum_e (x_j - x'_j)_e * (1/m) sum_{k=1..m} dy/dx_{j,e} at x' + a_k (x - x'), a_k = (k - 1/2)/m.

    The path integral of the gradient from a baseline x' to the input x, by the midpoint rule with
    ``steps`` = m points (Captum's ``riemann_middle``); a token's value is the sum over its embedding.
    ``baseline``: "zeros" (x' = 0) or "pad" (every token's embedding replaced by the pad token's).
    Completeness says sum_j IG_j = y(x) - y(x'); the gap |sum_j IG_j - (y(x) - y(x'))| of each input
    is reported (``job.notes["integrated_gradients_gap"]``) and shrinks as m grows.
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
        x = job.embed()
        x0 = self.base(job)
        real = job.mask[..., None].to(x.dtype)
        x0 = real * x0 + (1 - real) * x  # padding stays itself: it is masked, so it takes no part
        total = torch.zeros_like(x, dtype=torch.float64)
        for k in range(self.steps):
            a = (k + 0.5) / self.steps
            point = (x0 + a * (x - x0)).requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(job.score(embeds=point).sum(), point)
            total += grad.double()
        ig = ((x - x0).double() * total / self.steps).sum(dim=-1) * job.mask
        with torch.no_grad():
            delta = (job.score(embeds=x) - job.score(embeds=x0)).double()
        job.notes["integrated_gradients_gap"] = (ig.sum(dim=-1) - delta).abs()
        return ig
