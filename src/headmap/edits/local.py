"""``reinforce_local``: strengthen the attention each query pays to its k most recent tokens (LocoRE).

The window of query i is W_i = {j : 1 <= i - j <= k}, the k tokens before it (real and visible keys
only; the query itself is not in it). With ``factor`` s (multiplicative):

    A'[i, j] = A[i, j] w_j / Z_i,   w_j = s for j in W_i, 1 elsewhere,   Z_i = sum_u A[i, u] w_u / m_i

and with ``amount`` d (additive):

    A'[i, j] = (A[i, j] + d [j in W_i]) m_i / (m_i + d |W_i|)

with m_i the row's mass (1 unless the model has learned sink logits). s = 1 and d = 0 are the
identity. LocoRE (Local Coherence Reinforcement, in "Hallucination Begins Where Saliency Drops",
Zhang et al., ICLR 2026) strengthens the attention from the current token to its most recent
outputs during decoding, against the loss of saliency on prior outputs that precedes
hallucinations. This edit is that idea as a plain window rule on every query (prompt and
generated tokens alike); the paper's exact gain schedule is not reproduced here, so ``factor``
and ``amount`` are ours: choose k and the strength for your model.
"""

from __future__ import annotations

from typing import Any

import torch

from ..engine import Block
from ..errors import EditError
from .base import Edit, check_number


class ReinforceLocal(Edit):
    """Scale (``factor``) or raise (``amount``) the attention of ``heads`` to the ``k`` previous tokens."""

    name = "reinforce_local"

    def __init__(
        self,
        heads: Any = None,
        k: int | None = None,
        factor: float | None = None,
        amount: float | None = None,
        atlas: Any = None,
    ) -> None:
        if k is None:
            raise EditError(f"{self.name}: k= (how many previous tokens to reinforce) is required")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise EditError(f"{self.name}: k must be a whole number of tokens >= 1, got {k!r}")
        if (factor is None) == (amount is None):
            raise EditError(f"{self.name}: give exactly one of factor= (multiply) or amount= (add)")
        self.k = int(k)
        self.factor = None if factor is None else check_number(self.name, "factor", factor)
        self.amount = None if amount is None else check_number(self.name, "amount", amount)
        super().__init__(heads=heads, atlas=atlas)

    def params(self) -> dict[str, Any]:
        strength = {"factor": self.factor} if self.factor is not None else {"amount": self.amount}
        return {"k": self.k, **strength}

    @property
    def neutral(self) -> bool:
        return self.factor == 1.0 if self.factor is not None else self.amount == 0.0

    def _window(self, block: Block) -> tuple[int, int, torch.Tensor] | None:
        """Columns [a, b) that hold some window entry, and the window there [B, 1, bq, b - a] bool."""
        k0 = int(block.k_pos[0])
        keys = int(block.k_pos.numel())
        a = max(0, int(block.q_pos[0]) - self.k - k0)
        b = min(keys, int(block.q_pos[-1]) - k0)
        if a >= b:
            return None
        dist = block.q_pos[:, None] - block.k_pos[None, a:b]  # [bq, w]
        near = (dist >= 1) & (dist <= self.k)
        real = block.rel_k()[:, a:b] >= 0  # [B, w]
        window = near[None, None] & real[:, None, None, :] & block.mask_columns(a, b)
        if not bool(window.any()):
            return None
        return a, b, window

    def edit_probs(self, block: Block, probs: torch.Tensor) -> torch.Tensor:
        if self.neutral:
            return probs
        found = self._window(block)
        if found is None:
            return probs
        a, b, window = found

        def reinforce(x: torch.Tensor, heads) -> torch.Tensor:
            mass = x.sum(dim=-1, keepdim=True)
            part = x[..., a:b]
            if self.factor is not None:
                s = self.factor
                in_window = (part * window).sum(dim=-1, keepdim=True)
                new_mass = mass + (s - 1.0) * in_window
                ok = new_mass > 0
                ratio = torch.where(ok, mass / torch.where(ok, new_mass, torch.ones_like(new_mass)), 1.0)
                out = x * ratio
                out[..., a:b] = torch.where(window, part * (s * ratio), out[..., a:b])
                return out
            d = self.amount
            count = window.sum(dim=-1, keepdim=True).to(x.dtype)
            denom = mass + d * count
            ok = mass > 0
            ratio = torch.where(ok, mass / torch.where(ok, denom, torch.ones_like(denom)), 1.0)
            out = x * ratio
            out[..., a:b] = torch.where(window & ok, (part + d) * ratio, out[..., a:b])
            return out

        return self.on_heads(block, probs, reinforce)
