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
character offsets (the first occurrence), or ``image``: the image tokens of a vision-language model's
input in its language model (blocks of the ``text`` tower; vision towers are left as they are), where
its input ids hold the image token id of the model's config (the ids of the model's last forward call
that starts a sequence, recorded by a forward pre-hook while a session holds the edit, or given with
:meth:`SpanEdit.set_inputs`). An input without an image token is refused (EditError) before the model
computes anything. To target the word "image" in a prompt, give its token positions.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..engine import Block
from ..errors import EditError
from .base import Edit, check_number, positions_in, prefill_ids, reweight_rows, session_ended

#: The span naming a VLM input's image tokens.
IMAGE_SPAN = "image"


def config_image_token_id(model: nn.Module) -> int | None:
    """The image placeholder id of a VLM's config (``image_token_id`` or ``image_token_index``), or None."""
    config = getattr(model, "config", None)
    for key in ("image_token_id", "image_token_index"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


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
        self.image_token_id: int | None = None
        self._ids: torch.Tensor | None = None
        self._hook = None
        super().__init__(heads=heads, atlas=atlas)

    def allowed_towers(self) -> tuple[str, ...] | None:
        """``span=image``: the image tokens are positions of the language model, so the ``text`` tower only."""
        return ("text",) if self.is_image_span else self.towers

    @property
    def is_image_span(self) -> bool:
        """The span is the input's image tokens (``span=image``)."""
        return self.span == IMAGE_SPAN

    def prepare(self, tokenizer: Any, prompt: str | None = None) -> None:
        """Locate a text span in ``prompt`` (check a positional span fits it); nothing without a prompt."""
        if prompt is not None and not self.is_image_span:
            self.locate(tokenizer, prompt)

    def locate(self, tokenizer: Any, prompt: str, add_special_tokens: bool = True) -> tuple[int, int]:
        """Find a text span in ``prompt`` (token positions); check a positional span fits the prompt."""
        if self.is_image_span:
            return self.positions  # None: the image tokens are read from the input ids when the model runs
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
        if self.is_image_span:
            self.image_token_id = config_image_token_id(model)
            if self.image_token_id is None:
                raise EditError(
                    f"{self.name}: span=image needs a vision-language model, but the model's config names no image "
                    "token (image_token_id); give [start, end] token positions or a piece of the prompt"
                )
            if self._hook is None:
                self._hook = model.register_forward_pre_hook(self._record, with_kwargs=True)
            return
        if self.positions is None:
            raise EditError(
                f"{self.name}: span {self.span!r} is text; locate it in the prompt first (edit.locate(tokenizer, "
                "prompt), or headmap.steer(..., tokenizer=, prompt=)), or give [start, end] token positions"
            )

    def set_inputs(self, input_ids: torch.Tensor) -> None:
        """The [B, T] ids of the sequence the next forward calls extend (``span=image``; the pre-hook records them)."""
        self._check_image(input_ids)
        self._ids = input_ids

    def _check_image(self, ids: torch.Tensor) -> None:
        has = (ids == self.image_token_id).any(dim=-1)
        if not bool(has.all()):
            row = int(torch.nonzero(~has)[0, 0])
            raise EditError(
                f"{self.name}: span=image, but input {row} has no image token (id {self.image_token_id}) in its ids; "
                "give an input with an image, or a span of token positions [start, end]"
            )

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if session_ended(self):  # the session that bound us has ended
            self._hook.remove()
            self._hook = None
            return
        ids = prefill_ids(args, kwargs)
        if ids is not None:
            self._check_image(ids)
            self._ids = ids

    def span_columns(self, block: Block) -> torch.Tensor:
        """[B, bk] bool: key columns inside the span."""
        if self.is_image_span:
            # the engine gives this edit the blocks of the text tower only (allowed_towers; edits/base.py)
            if self._ids is None:
                raise EditError(f"{self.name}: span=image but no input ids seen yet; run the model with input_ids")
            image = self._ids.to(block.k_pos.device) == self.image_token_id
            pos = block.k_pos
            inside = pos < image.shape[1]
            return image[:, pos.clamp(max=image.shape[1] - 1)] & inside[None, :]
        return positions_in(block, *self.positions)

    def params(self) -> dict[str, Any]:
        if self.is_image_span:
            return {"span": IMAGE_SPAN}
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
