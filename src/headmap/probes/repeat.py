"""Base of the probes read on a sequence repeated twice (``duplicate_token``, ``induction``).

Inputs are ``offset`` leading tokens (1 for a BOS, 0 without), a sequence r of n tokens, and r
again; the built-in ``repeats`` corpus makes them and records n and the offset in each sample's
``info``. The engine's blocks carry no token ids, so a probe cannot find the repeat itself:
construct it with ``repeat_length`` and ``offset``, or let :meth:`RepeatProbe.prepare` (which a
scan calls) or :meth:`RepeatProbe.configure` read them from the corpus. An input shorter than
``offset + 2 * repeat_length`` raises :class:`~headmap.errors.ProbeError` when the inputs are
committed (after the forward call).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..engine.block import Block
from ..errors import ProbeError
from ..specs import is_whole
from .base import Needs
from .head import HeadMeanProbe


@dataclass
class RepeatProbe(HeadMeanProbe):
    """Base of the probes read on ``offset`` tokens, then r (``repeat_length`` tokens), then r again.

    Subclasses set ``lag`` (the key is i - lag) and ``skip`` (how many first tokens of the second
    copy are not counted).
    """

    #: n, the length of the repeated sequence r (None: not set yet, see ``configure``)
    repeat_length: int | None = None
    #: tokens before the first copy of r (1 when the tokenizer adds a BOS)
    offset: int = 0

    _lengths: torch.Tensor | None = field(default=None, init=False, repr=False)

    min_repeat_length = 1
    skip = 0
    needs = Needs(corpus="repeats", default_corpus="repeats")

    def __post_init__(self) -> None:
        self._check(self.repeat_length, self.offset)

    def _check(self, repeat_length: Any, offset: Any) -> None:
        if repeat_length is not None and (not is_whole(repeat_length) or repeat_length < self.min_repeat_length):
            raise ProbeError(
                f"{self.name} repeat_length must be a whole number >= {self.min_repeat_length} "
                f"(got {repeat_length!r}): the length n of the sequence r that the input repeats"
            )
        if not is_whole(offset) or offset < 0:
            raise ProbeError(
                f"{self.name} offset must be a whole number >= 0 (got {offset!r}): "
                "the tokens before the first copy (1 for a BOS, else 0)"
            )

    def lag(self) -> int:
        raise NotImplementedError

    def prepare(self, corpus: Any) -> None:
        """Read ``repeat_length`` and ``offset`` from the corpus unless they were given (see :meth:`configure`)."""
        if self.repeat_length is None:
            self.configure(corpus)

    def params(self) -> dict[str, Any]:
        return {"repeat_length": self.repeat_length, "offset": self.offset}

    def configure(self, samples: Any) -> RepeatProbe:
        """Set ``repeat_length`` and ``offset`` from the ``info`` of ``repeats`` samples (a Corpus or a list).

        Every sample must carry the same ``repeat_length`` and ``offset``; values already set on
        the probe must agree with them. Returns the probe.
        """
        items: Iterable = getattr(samples, "samples", samples)
        found = set()
        for k, sample in enumerate(items):
            info = getattr(sample, "info", None) or {}
            if "repeat_length" not in info:
                raise ProbeError(
                    f"{self.name} needs inputs made of a sequence repeated twice, and input {k} says nothing "
                    "about a repeat (no 'repeat_length' in its info); use --corpus repeats"
                )
            found.add((info["repeat_length"], info.get("offset", 0)))
        if not found:
            raise ProbeError(f"{self.name}: the corpus has no input to read the repeat length from")
        if len(found) > 1:
            raise ProbeError(
                f"{self.name} needs one repeat length and offset for all inputs; the corpus has {sorted(found)}"
            )
        n, offset = next(iter(found))
        self._check(n, offset)
        if self.repeat_length is not None and (self.repeat_length, self.offset) != (n, offset):
            raise ProbeError(
                f"{self.name} was set to repeat_length={self.repeat_length}, offset={self.offset} but the corpus "
                f"repeats {n} tokens after an offset of {offset}"
            )
        self.repeat_length, self.offset = int(n), int(offset)
        return self

    def update(self, block: Block) -> None:
        if self.repeat_length is None:
            raise ProbeError(
                f"{self.name} does not know the repeat length: construct it with repeat_length=n and offset=... "
                "(or call .configure(corpus) with the 'repeats' corpus)"
            )
        rel = torch.where(block.query_valid, block.rel_q(), -1)
        seen = rel.amax(dim=-1) + 1  # [B]: the input has at least this many tokens
        if self._lengths is None or self._lengths.shape != seen.shape:
            self._lengths = seen
        else:
            self._lengths = torch.maximum(self._lengths, seen)
        super().update(block)

    def commit(self) -> None:
        lengths, self._lengths = self._lengths, None
        if lengths is not None:
            need = self.offset + 2 * self.repeat_length
            short = [(b, int(t)) for b, t in enumerate(lengths.tolist()) if 0 < t < need]
            if short:
                self._pending.clear()
                listed = ", ".join(f"input {b} has {t}" for b, t in short)
                raise ProbeError(
                    f"{self.name} needs inputs of at least offset + 2 * repeat_length = {self.offset} + 2 * "
                    f"{self.repeat_length} = {need} tokens (r repeated twice), but {listed} (position within "
                    "the batch); set repeat_length/offset to match the inputs or use the 'repeats' corpus"
                )
        super().commit()

    def load_state_dict(self, state) -> None:
        """Committed totals only: ``_lengths``, like the pending sums, lives within one batch."""
        super().load_state_dict(state)
        self._lengths = None

    def row_values(self, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
        probs = block.probs  # [B, H, bq, bk]
        keys = probs.shape[-1]
        n = self.repeat_length
        col = block.q_pos - self.lag() - block.k_pos[0]  # [bq]: block column of key i - lag
        inside = (col >= 0) & (col < keys)  # outside = hidden (e.g. beyond a sliding window): 0
        index = col.clamp(0, keys - 1).view(1, 1, -1, 1).expand(probs.shape[0], probs.shape[1], -1, 1)
        values = probs.gather(-1, index).squeeze(-1) * inside  # [B, H, bq]
        rel = block.rel_q()
        first = self.offset + n + self.skip
        counted = block.query_valid & (rel >= first) & (rel < self.offset + 2 * n)
        return values, counted
