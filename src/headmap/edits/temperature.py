"""``temperature``: divide a head's logits by tau.

    z'[i, j] = z[i, j] / tau,   A' = softmax(z')

applied after the model's scaling (and softcapping, where it has one) and before the mask. tau > 1
flattens the head's attention towards uniform, tau < 1 sharpens it towards its argmax; tau = 1 is
the identity. Equivalent to scaling the head's queries by 1 / tau. With learned sink logits
(gpt-oss) the sink logit is not divided.
"""

from __future__ import annotations

from typing import Any

import torch

from ..engine import Block
from .base import Edit, check_number


class Temperature(Edit):
    """Divide the logits of ``heads`` by ``tau`` (> 0)."""

    name = "temperature"

    def __init__(self, heads: Any = None, tau: float = 1.0, atlas: Any = None) -> None:
        self.tau = check_number(self.name, "tau", tau, strict=True)
        super().__init__(heads=heads, atlas=atlas)

    def params(self) -> dict[str, Any]:
        return {"tau": self.tau}

    def edit_logits(self, block: Block, logits: torch.Tensor) -> torch.Tensor:
        if self.tau == 1.0:
            return logits
        return self.on_heads(block, logits, lambda x, heads: x / self.tau)
