"""``scale_span``: scale the attention paid to a span of key tokens (PASTA-style emphasis, VAR/PAI-style amplification).

    probs:   A'[i, j] = A[i, j] w_j / Z_i,  w_j = s for j in the span, 1 elsewhere,  Z_i = sum_k A[i, k] w_k / m_i
    logits:  z'[i, j] = z[i, j] + log s for j in the span (then the softmax)

with m_i the row's mass (1 unless the model has learned sink logits). The two give the same
probabilities (up to rounding) except with learned sink logits, where ``logits`` lets the sink's
share change too and ``probs`` keeps it. s = 1 is the identity.

PASTA ("Tell Your Model Where to Attend: Post-hoc Attention Steering", Zhang et al. 2023) scales the
attention to everything *outside* the user's span by a small coefficient and renormalises, which is
the same as s = 1 / coefficient here. VAR and PAI amplify the attention to image tokens; PAI adds a
multiple of the logits' magnitude rather than a constant, which this edit does not reproduce.

The span is [start, end) token positions inside the input (0 = its first real token), or a piece of
the prompt's text: :func:`find_span` maps it to the tokens that overlap it, with the tokenizer's
character offsets (the first occurrence).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..engine import Block
from ..errors import EditError
from .base import Edit, check_number, positions_in, reweight_rows


def find_span(tokenizer: Any, prompt: str, text: str, add_special_tokens: bool = True) -> tuple[int, int]:
    """Token positions [start, end) of the first occurrence of ``text`` in ``prompt``.

    ``prompt`` is tokenised as ``tokenizer(prompt, add_special_tokens=...)`` tokenises it (the way
    ``headmap steer`` feeds it to the model); the span covers every token whose characters overlap
    the text. EditError when the text is not in the prompt.
    """
    if not isinstance(text, str) or not text:
        raise EditError("span text is empty; give a piece of the prompt or [start, end] token positions")
    at = prompt.find(text)
    if at < 0:
        shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
        raise EditError(f"span {text!r} is not in the prompt {shown!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise EditError(
            "finding a text span needs a fast tokenizer (character offsets); give [start, end] token positions"
        )
    enc = tokenizer(prompt, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    lo, hi = at, at + len(text)
    hits = [t for t, (a, b) in enumerate(offsets) if b > a and b > lo and a < hi]
    if not hits:
        raise EditError(f"span {text!r} covers no token of the prompt")
    return hits[0], hits[-1] + 1


def parse_span(span: Any, edit: str) -> tuple[int, int] | str:
    """A span as (start, end) or as text; EditError when it is neither."""
    if isinstance(span, str):
        if not span:
            raise EditError(f"{edit}: span is empty; give [start, end] token positions or a piece of the prompt")
        return span
    if (
        isinstance(span, (list, tuple))
        and len(span) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in span)
    ):
        start, end = int(span[0]), int(span[1])
        if start < 0 or end <= start:
            raise EditError(
                f"{edit}: span [{start}, {end}] must satisfy 0 <= start < end (token positions, end excluded)"
            )
        return start, end
    raise EditError(f"{edit}: span must be [start, end] token positions or a piece of the prompt's text, got {span!r}")


class SpanEdit(Edit):
    """An edit with a target span of key tokens; a text span is located with :meth:`locate`."""

    def __init__(self, heads: Any = None, span: Any = None, atlas: Any = None) -> None:
        if span is None:
            raise EditError(f"{self.name}: span= is required ([start, end] token positions or a piece of the prompt)")
        self.span = parse_span(span, self.name)
        self.positions: tuple[int, int] | None = self.span if isinstance(self.span, tuple) else None
        super().__init__(heads=heads, atlas=atlas)

    def prepare(self, tokenizer: Any, prompt: str | None = None) -> None:
        """Locate a text span in ``prompt`` (check a positional span fits it); nothing without a prompt."""
        if prompt is not None:
            self.locate(tokenizer, prompt)

    def locate(self, tokenizer: Any, prompt: str, add_special_tokens: bool = True) -> tuple[int, int]:
        """Find a text span in ``prompt`` (token positions); check a positional span fits the prompt."""
        if isinstance(self.span, str):
            self.positions = find_span(tokenizer, prompt, self.span, add_special_tokens=add_special_tokens)
        else:
            n = len(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
            if self.span[1] > n:
                raise EditError(
                    f"{self.name}: span [{self.span[0]}, {self.span[1]}] is outside the prompt, which has {n} tokens"
                )
        return self.positions

    def bind(self, model) -> None:
        super().bind(model)
        if self.positions is None:
            raise EditError(
                f"{self.name}: span {self.span!r} is text; locate it in the prompt first (edit.locate(tokenizer, "
                "prompt), or headmap.steer(..., tokenizer=, prompt=)), or give [start, end] token positions"
            )

    def span_columns(self, block: Block) -> torch.Tensor:
        """[B, bk] bool: key columns inside the span."""
        return positions_in(block, *self.positions)

    def params(self) -> dict[str, Any]:
        span = self.span if isinstance(self.span, str) else list(self.span)
        shown = f"{span!r}->{list(self.positions)}" if isinstance(span, str) and self.positions else span
        return {"span": shown}


class ScaleSpan(SpanEdit):
    """Multiply the attention to the span's keys by ``factor`` (>= 0) and renormalise (or add log factor to logits)."""

    name = "scale_span"

    def __init__(
        self,
        heads: Any = None,
        span: Any = None,
        factor: float = 1.0,
        where: str = "probs",
        atlas: Any = None,
    ) -> None:
        self.factor = check_number(self.name, "factor", factor)
        if where not in ("probs", "logits"):
            raise EditError(f"{self.name}: where must be 'probs' or 'logits', got {where!r}")
        if where == "logits" and self.factor == 0:
            raise EditError(f"{self.name}: factor 0 with where='logits' would add log 0; use where='probs'")
        self.where = where
        super().__init__(heads=heads, span=span, atlas=atlas)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "factor": self.factor, "where": self.where}

    def edit_logits(self, block: Block, logits: torch.Tensor) -> torch.Tensor:
        if self.where != "logits" or self.factor == 1.0:
            return logits
        cols = self.span_columns(block)
        if not bool(cols.any()):
            return logits
        bonus = (cols.to(logits.dtype) * math.log(self.factor))[:, None, None, :]  # [B, 1, 1, bk]
        return self.on_heads(block, logits, lambda x, heads: x + bonus)

    def edit_probs(self, block: Block, probs: torch.Tensor) -> torch.Tensor:
        if self.where != "probs" or self.factor == 1.0:
            return probs
        cols = self.span_columns(block)
        if not bool(cols.any()):
            return probs
        weight = torch.where(cols, self.factor, 1.0).to(probs.dtype)[:, None, None, :]
        return self.on_heads(block, probs, lambda x, heads: reweight_rows(x, weight))
