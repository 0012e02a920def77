"""Edits of attention sinks: ``calibrate_sinks`` (ACT) and ``redistribute_sinks`` (VAR).

**calibrate_sinks** (ACT, "Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large
Language Models without Training through Attention Calibration", Yu et al. 2024). For each chosen
head, a key j other than the input's first token is a *hidden sink* when the attention it receives,

    r(j) = mean over the real query rows i of the block that see j (i = j included) of A[i, j],

is at least tau (ACT's released code uses tau = 0.1 and s = 0.4). Each row then keeps s times its
attention to the sinks and hands the freed mass to the other keys in proportion to their attention:

    A'[i, j] = s A[i, j]                                   (j a sink)
    A'[i, k] = A[i, k] (m_i - s S_i) / (m_i - S_i)         (k not a sink)

with S_i = sum over sinks of A[i, j] and m_i the row's mass (1 unless the model has learned sink
logits). The row keeps its mass; s = 1 is the identity. (This is ACT's rule: the sinks' entries
are exactly s times what they were, unlike ``scale_span``, which renormalises the scaled entries
too.) A row whose whole mass is on sinks is left as it is.

*Which rows detect.* The engine computes attention in blocks of complete rows, and an edit sees one
block at a time, so r(j) is measured over the rows of the block being edited. With the default
budget (``headmap.engine_config.budget_bytes``, 64 MiB) a causal prompt of up to about
sqrt(budget / (12 B H)) tokens is one block (788 tokens for batch 1 and 9 heads), so detection
reads the whole prompt, as ACT does on its full attention map; longer prompts detect per block of
rows. While generating with a KV cache each new token is its own block, so r(j) is that token's own
attention row, which is also what ACT's code does during decoding.

**redistribute_sinks** (VAR, "See What You Are Told: Visual Attention Sink in Large Multimodal
Models", Kang et al. 2025). For each chosen head and row, a fraction p of the attention on the
sink tokens S is moved onto the target span T (sinks excluded), in proportion to the attention T
already has:

    A'[i, j] = (1 - p) A[i, j]                                            (j in S)
    A'[i, t] = A[i, t] + p (sum_{j in S} A[i, j]) A[i, t] / sum_{u in T} A[i, u]   (t in T)

and every other entry unchanged; the row keeps its mass, p = 0 is the identity (VAR uses p = 0.6
on image-centric heads, with the image tokens as T). Sinks are the input's first token
(``sinks="first"``, default), the hidden sinks detected as in ``calibrate_sinks``
(``"detected"``), both (``"both"``), or a list of token positions. VAR finds visual sink tokens
by their massive activation in the sink dimensions of the hidden state, which an attention edit
does not see; received attention is the stand-in here. A row that pays no attention to T yet (a
query before the span in a causal model) is left as it is.
"""

from __future__ import annotations

from typing import Any

import torch

from ..engine import Block
from ..errors import EditError
from .base import Edit, check_number, positions_in, received_in_block
from .span import SpanEdit


def _hidden_sinks(block: Block, probs: torch.Tensor, tau: float) -> torch.Tensor:
    """[B, h, 1, bk] bool: keys other than position 0 that receive at least tau in the block (per head)."""
    received = received_in_block(block, probs)  # [B, h, bk]
    later = (block.rel_k() > 0)[:, None, :]
    return ((received >= tau) & later)[:, :, None, :]


class CalibrateSinks(Edit):
    """ACT: scale the attention to hidden sinks (received >= ``tau``) by ``factor`` in [0, 1]."""

    name = "calibrate_sinks"

    def __init__(self, heads: Any = None, tau: float = 0.1, factor: float = 0.4, atlas: Any = None) -> None:
        self.tau = check_number(self.name, "tau", tau, strict=True)
        if self.tau > 1:
            raise EditError(f"{self.name}: tau is a share of attention, at most 1; got {self.tau:g}")
        self.factor = check_number(self.name, "factor", factor)
        if self.factor > 1:
            raise EditError(f"{self.name}: factor scales sinks down and must be in [0, 1], got {self.factor:g}")
        super().__init__(heads=heads, atlas=atlas)

    def params(self) -> dict[str, Any]:
        return {"tau": self.tau, "factor": self.factor}

    def edit_probs(self, block: Block, probs: torch.Tensor) -> torch.Tensor:
        if self.factor == 1.0:
            return probs
        s = self.factor

        def calibrate(x: torch.Tensor, heads) -> torch.Tensor:
            sink = _hidden_sinks(block, x, self.tau)
            on_sinks = (x * sink).sum(dim=-1, keepdim=True)
            mass = x.sum(dim=-1, keepdim=True)
            rest = mass - on_sinks
            ok = (rest > 0) & (on_sinks > 0)
            gain = torch.where(ok, (mass - s * on_sinks) / torch.where(ok, rest, torch.ones_like(rest)), 1.0)
            return torch.where(ok, torch.where(sink, x * s, x * gain), x)

        return self.on_heads(block, probs, calibrate)


class RedistributeSinks(SpanEdit):
    """VAR: move a fraction ``p`` of the attention on sink tokens onto ``span``, in proportion."""

    name = "redistribute_sinks"

    def __init__(
        self,
        heads: Any = None,
        span: Any = None,
        p: float = 0.6,
        sinks: Any = "first",
        tau: float = 0.1,
        atlas: Any = None,
    ) -> None:
        self.p = check_number(self.name, "p", p)
        if self.p > 1:
            raise EditError(f"{self.name}: p is a fraction of the sinks' attention, in [0, 1]; got {self.p:g}")
        self.tau = check_number(self.name, "tau", tau, strict=True)
        if self.tau > 1:
            raise EditError(f"{self.name}: tau is a share of attention, at most 1; got {self.tau:g}")
        if isinstance(sinks, str):
            if sinks not in ("first", "detected", "both"):
                raise EditError(
                    f"{self.name}: sinks must be 'first', 'detected', 'both' or a list of token positions, "
                    f"got {sinks!r}"
                )
        elif (
            isinstance(sinks, (list, tuple))
            and sinks
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in sinks)
        ):
            sinks = tuple(sorted(set(int(x) for x in sinks)))
        else:
            raise EditError(
                f"{self.name}: sinks must be 'first', 'detected', 'both' or a non-empty list of token positions >= 0, "
                f"got {sinks!r}"
            )
        self.sinks = sinks
        super().__init__(heads=heads, span=span, atlas=atlas)

    def params(self) -> dict[str, Any]:
        sinks = self.sinks if isinstance(self.sinks, str) else list(self.sinks)
        extra = {"tau": self.tau} if sinks in ("detected", "both") else {}
        return {**super().params(), "p": self.p, "sinks": sinks, **extra}

    def _sink_columns(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        """[B, h or 1, 1, bk] bool."""
        if isinstance(self.sinks, tuple):
            cols = torch.zeros_like(block.rel_k(), dtype=torch.bool)
            for pos in self.sinks:
                cols |= positions_in(block, pos, pos + 1)
            return cols[:, None, None, :]
        first = positions_in(block, 0, 1)[:, None, None, :]
        if self.sinks == "first":
            return first
        hidden = _hidden_sinks(block, x, self.tau)
        return hidden if self.sinks == "detected" else hidden | first

    def edit_probs(self, block: Block, probs: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0:
            return probs
        target = self.span_columns(block)[:, None, None, :]
        if not bool(target.any()):
            return probs
        p = self.p

        def redistribute(x: torch.Tensor, heads) -> torch.Tensor:
            sink = self._sink_columns(block, x)
            into = target & ~sink
            on_sinks = (x * sink).sum(dim=-1, keepdim=True)
            on_target = (x * into).sum(dim=-1, keepdim=True)
            ok = (on_target > 0) & (on_sinks > 0)
            gain = 1.0 + p * on_sinks / torch.where(ok, on_target, torch.ones_like(on_target))
            new = torch.where(sink, x * (1.0 - p), torch.where(into, x * gain, x))
            return torch.where(ok, new, x)

        return self.on_heads(block, probs, redistribute)
