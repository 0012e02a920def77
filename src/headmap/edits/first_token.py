"""``scale_first_token``: scale the attention every query pays to the input's first token (ZeroTuning).

    A'[i, 0] = s A[i, 0] / Z_i,   A'[i, j] = A[i, j] / Z_i (j != 0),   Z_i = (s A[i, 0] + sum_{j != 0} A[i, j]) / m_i

with m_i = sum_j A[i, j] the row's mass (1, or less than 1 with learned sink logits, which keep their
share). Position 0 is the input's first real token (left padding removed). This is the same as
adding log s to the first token's logit. s < 1 flattens the head's attention over the other keys,
s > 1 sharpens it towards the sink; s = 1 is the identity. "ZeroTuning: Unlocking the Initial
Token's Power to Enhance Large Language Models Without Training" scales the initial token's
attention of chosen heads this way.
"""

from __future__ import annotations

from typing import Any

import torch

from ..engine import Block
from .base import Edit, check_number, positions_in, reweight_rows


class ScaleFirstToken(Edit):
    """Multiply A[i, 0] by ``factor`` (>= 0) for ``heads`` and renormalise every row."""

    name = "scale_first_token"

    def __init__(self, heads: Any = None, factor: float = 1.0, atlas: Any = None) -> None:
        self.factor = check_number(self.name, "factor", factor)
        super().__init__(heads=heads, atlas=atlas)

    def params(self) -> dict[str, Any]:
        return {"factor": self.factor}

    def edit_probs(self, block: Block, probs: torch.Tensor) -> torch.Tensor:
        if self.factor == 1.0:
            return probs
        first = positions_in(block, 0, 1)  # [B, bk]
        if not bool(first.any()):
            return probs
        weight = torch.where(first, self.factor, 1.0).to(probs.dtype)[:, None, None, :]  # [B, 1, 1, bk]
        return self.on_heads(block, probs, lambda x, heads: reweight_rows(x, weight))
