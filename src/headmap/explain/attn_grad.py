"""Generic attention explainability (Chefer, Gur & Wolf 2021, ICCV): attention weighted by its gradient."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from . import _flash
from .base import Job, Method
from .capture import Capture, row_product


@dataclass
class AttnGrad(Method):
    """Relevance R = I, then for each layer from the first R <- R + Ā_l R with Ā_l = mean_h (dA_l ⊙ A_l)^+;
    the attribution is R's target row. dA_l = dy/dA_l is the gradient of the target y with respect to
    layer l's attention probabilities, (·)^+ keeps the positive part, the mean runs over query heads.

    The target row of R_L = (I + Ā_L) ... (I + Ā_1) is e_t^T (I + Ā_L) ... (I + Ā_1): a row vector taken
    down from the last layer, as rollout. Since each layer's output is O = A V, dA = dO V^T: one forward
    and backward keep, per layer, the queries, keys, values and dO = dy/dO (O(L T d) memory, plus the
    engine's checkpointed backward, also linear in T); each layer's A and dA are then recomputed block
    by block (:func:`row_product`), at most one block of each at a time. On the CPU without padding the
    forward and backward run PyTorch's fused attention kernel, whose log-sum-exp per row gives A = exp(s - lse)
    without a softmax pass (:mod:`._flash`). See docs/methods/attn_grad.md.
    """

    name: ClassVar[str] = "attn_grad"
    attention: ClassVar[bool] = True
    gradient: ClassVar[bool] = True

    def attribute(self, job: Job) -> torch.Tensor:
        capture = Capture()
        embeds = job.embed().requires_grad_(True)  # so that the graph exists even with frozen weights
        with torch.enable_grad():
            if _flash.usable(job):
                y = _flash.forward(job, capture, embeds=embeds, score=True)
            else:
                y = job.score(embeds=embeds, probes=[capture])
            views = capture.layers()
            grads = torch.autograd.grad(y.sum(), [v.output for v in views], allow_unused=True)
        with torch.no_grad():
            r, plans = job.rows.clone(), {}
            for i, (view, d_out) in enumerate(zip(reversed(views), reversed(grads), strict=True)):
                if d_out is not None:
                    r = r + row_product(view, r, grad_out=d_out, plans=plans)
                view.output = None
                job.layer_done(self.name, i + 1, len(views))
        return r * job.mask
