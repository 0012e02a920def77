"""``span``: attention mass from a query span S to a key span R.

    span[l, h] = mean over inputs of ( mean over real queries i in S of sum_{j in R} A[i, j] )

S and R are token spans [start, end) of positions inside each input (padding removed, 0 = the
input's first real token). They come from each sample's ``info["spans"]`` (a JSONL corpus with
named spans: ``{"query": [s, e], "key": [s, e], ...}``), named by the ``query`` and ``key``
parameters, or are fixed token spans for every input (``SpanProbe(query=(a, b), key=(c, d))``).
When an input has no span called ``query`` and the probe reads the default name, S is every token
after R (the question that follows a document). A head whose queries in S put all their attention
on R scores 1.

docs/methods/span.md describes it as the building block of contextual heads ("Focus Directions"), vision-aware
heads (VAS, "From Narrow to Panoramic Vision") and VHD, with the context or the image as R.
See docs/methods/span.md.

The scan tells the probe which input is in which batch row through :meth:`SpanProbe.begin`; a
probe with named spans used without it raises :class:`~headmap.errors.ProbeError`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..corpus import Batch
from ..engine.block import Block
from ..errors import ProbeError
from .base import Needs
from .head import HeadMeanProbe

#: The query span's default name; when an input has no span of that name, S = the tokens after R.
DEFAULT_QUERY = "query"
DEFAULT_KEY = "key"


def _whole(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def token_span(value: Any) -> tuple[int, int] | None:
    """``(start, end)`` when ``value`` is a pair of whole numbers, else None."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        return None
    if not all(_whole(v) for v in value):
        return None
    return int(value[0]), int(value[1])


def seen_lengths(block: Block) -> torch.Tensor:
    """[B] long: one past the largest real query position of the block (0 when none is real)."""
    rel = torch.where(block.query_valid, block.rel_q(), -1)
    return rel.amax(dim=-1) + 1


def describe(index: int | None, row: int) -> str:
    """How an error names an input: its corpus index when known, else its batch row."""
    return f"input {index}" if index is not None else f"batch row {row}"


@dataclass
class SpanProbe(HeadMeanProbe):
    """Mass from the query span to the key span, per head.

    ``query`` and ``key`` are each the name of a span in the inputs' ``info["spans"]`` or a fixed
    token span ``(start, end)`` used for every input.
    """

    name = "span"
    needs = Needs(corpus="spans", default=False)

    query: str | tuple[int, int] = DEFAULT_QUERY
    key: str | tuple[int, int] = DEFAULT_KEY

    # per batch row: (query start, query end, key start, key end), set by ``begin``
    _bounds: torch.Tensor | None = field(default=None, init=False, repr=False)
    _on_device: torch.Tensor | None = field(default=None, init=False, repr=False)
    _lengths: list[int] | None = field(default=None, init=False, repr=False)
    _first: int | None = field(default=None, init=False, repr=False)
    _seen: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.query = self._check_param("query", self.query)
        self.key = self._check_param("key", self.key)

    def _check_param(self, which: str, value: Any) -> str | tuple[int, int]:
        if isinstance(value, str) and value:
            return value
        pair = token_span(value)
        if pair is not None and 0 <= pair[0] < pair[1]:
            return pair
        example = DEFAULT_QUERY if which == "query" else DEFAULT_KEY
        raise ProbeError(
            f"span {which} must be the name of a span in the inputs' info (e.g. {which}={example!r}) "
            f"or a token span (start, end) with 0 <= start < end (got {value!r})"
        )

    @property
    def fixed(self) -> bool:
        """True when both spans are token spans given to the probe (no per-input info needed)."""
        return not isinstance(self.query, str) and not isinstance(self.key, str)

    def params(self) -> dict[str, Any]:
        return {
            "query": self.query if isinstance(self.query, str) else list(self.query),
            "key": self.key if isinstance(self.key, str) else list(self.key),
        }

    # -- spans of one input ----------------------------------------------------------------

    def _label(self, which: str) -> str:
        value = getattr(self, which)
        return f"{which} span '{value}'" if isinstance(value, str) else f"{which} span [{value[0]}, {value[1]})"

    def spans_of(self, sample: Any, index: int) -> tuple[int, int, int, int]:
        """``(query start, query end, key start, key end)`` of one sample; ProbeError if it has none.

        ``index`` names the sample in messages (its corpus index).
        """
        ids = getattr(sample, "ids", None)
        length = len(ids) if ids is not None else 0
        info = getattr(sample, "info", None) or {}
        spans = info.get("spans")
        if spans is not None and not isinstance(spans, dict):
            raise ProbeError(
                f"span: input {index} has 'spans' in its info that is not a mapping of names to [start, end] "
                f"token spans (got {type(spans).__name__}); fix the corpus"
            )

        def named(name: str, which: str) -> tuple[int, int] | None:
            if spans is None:
                raise ProbeError(
                    f"span: input {index} has no named spans (no 'spans' in its info), so the {which} span '{name}' "
                    "cannot be found; use a JSONL corpus whose lines give spans, or construct "
                    "SpanProbe(query=(start, end), key=(start, end)) with token spans"
                )
            if name not in spans:
                return None
            pair = token_span(spans[name])
            if pair is None:
                raise ProbeError(
                    f"span: span '{name}' of input {index} is {spans[name]!r}, not a [start, end] pair of token "
                    "positions; fix the corpus"
                )
            return pair

        if isinstance(self.key, str):
            key = named(self.key, "key")
            if key is None:
                have = ", ".join(repr(n) for n in spans) or "none"
                raise ProbeError(
                    f"span: input {index} has no key span named '{self.key}' (its spans: {have}); name one of its "
                    "spans with key=..., or add the span to the corpus"
                )
        else:
            key = self.key
        self._check_inside(key, length, index, "key")
        if isinstance(self.query, str):
            query = named(self.query, "query") if spans is not None or self.query != DEFAULT_QUERY else None
            if query is None:
                if self.query != DEFAULT_QUERY:
                    have = ", ".join(repr(n) for n in spans) or "none"
                    raise ProbeError(
                        f"span: input {index} has no query span named '{self.query}' (its spans: {have}); name one "
                        "of its spans with query=..., or add the span to the corpus"
                    )
                query = (key[1], length)  # no question marked: the tokens after the document
                if query[0] >= query[1]:
                    where = f" [{key[0]}, {key[1]})" if isinstance(self.key, str) else ""
                    raise ProbeError(
                        f"span: input {index} has no '{DEFAULT_QUERY}' span and its {self._label('key')}{where} "
                        "ends at its last token, so there is no query to read attention from; "
                        f"give the input a '{DEFAULT_QUERY}' span, or name one with query=..."
                    )
        else:
            query = self.query
        self._check_inside(query, length, index, "query")
        return query[0], query[1], key[0], key[1]

    def _check_inside(self, span: tuple[int, int], length: int, index: int | str, which: str) -> None:
        start, end = span
        if 0 <= start < end <= length:
            return
        if isinstance(getattr(self, which), str):
            raise ProbeError(
                f"span: the {self._label(which)} of input {index} is [{start}, {end}), which is not a non-empty "
                f"span inside its {length} tokens (positions 0 to {length - 1}, padding excluded); spans are "
                "[start, end) token positions: fix the corpus"
            )
        raise ProbeError(
            f"span: the {self._label(which)} does not fit input {index}, which has {length} tokens (padding "
            "excluded); give spans inside every input, or name the spans of each input instead"
        )

    def applies_to(self, samples: Any) -> str | None:
        """None when every sample has the spans the probe reads, else why not."""
        if self.fixed:
            return None
        for index, sample in enumerate(getattr(samples, "samples", samples)):
            try:
                self.spans_of(sample, index)
            except ProbeError as exc:
                return str(exc)
        return None

    # -- hooks -----------------------------------------------------------------------------

    def begin(self, batch: Batch) -> None:
        """Read the spans of every input of the next forward call (raises ProbeError if one has none)."""
        rows = [self.spans_of(sample, batch.index(b)) for b, sample in enumerate(batch.samples)]
        self._bounds = torch.tensor(rows, dtype=torch.long).reshape(-1, 4)
        self._on_device = None
        self._lengths = [len(s.ids) for s in batch.samples]
        self._first = batch.first

    def _bounds_for(self, block: Block) -> torch.Tensor:
        batch = block.query_valid.shape[0]
        if self._bounds is None:
            if not self.fixed:
                raise ProbeError(
                    f"span reads the spans of each input, and no batch was announced: call probe.begin(Batch(...)) "
                    f"before each forward pass (headmap.scan does), or construct SpanProbe(query=(start, end), "
                    f"key=(start, end)) with token spans (now query={self.query!r}, key={self.key!r})"
                )
            self._bounds = torch.tensor([[*self.query, *self.key]] * batch, dtype=torch.long)
            self._on_device = None
        if self._bounds.shape[0] != batch:
            rows = self._bounds.shape[0]
            self._clear()
            raise ProbeError(
                f"span: begin() announced {rows} inputs but the forward pass has {batch} batch rows; "
                "call begin(batch) with the samples of each forward pass, in batch order"
            )
        if self._on_device is None or self._on_device.device != block.probs.device:
            self._on_device = self._bounds.to(block.probs.device)
        return self._on_device

    def update(self, block: Block) -> None:
        seen = seen_lengths(block)
        self._seen = seen if self._seen is None or self._seen.shape != seen.shape else torch.maximum(self._seen, seen)
        super().update(block)

    def row_values(self, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
        bounds = self._bounds_for(block)
        q_start, q_end, k_start, k_end = bounds.unbind(dim=1)  # [B] each
        rel_q, rel_k = block.rel_q(), block.rel_k()
        counted = block.query_valid & (rel_q >= q_start[:, None]) & (rel_q < q_end[:, None])
        in_key = (rel_k >= k_start[:, None]) & (rel_k < k_end[:, None])  # [B, bk]
        probs = block.probs  # [B, H, bq, bk]; hidden entries are 0
        mass = torch.einsum("bhqk,bk->bhq", probs, in_key.to(probs.dtype))
        return mass, counted

    def commit(self) -> None:
        seen, self._seen = self._seen, None
        bounds, lengths, first = self._bounds, self._lengths, self._first
        self._clear()
        if seen is not None and bounds is not None:
            seen_list = seen.tolist()
            for b, real in enumerate(seen_list):
                if lengths is not None and real != lengths[b]:
                    self._pending.clear()
                    raise ProbeError(
                        f"span: begin() said {describe(first + b if first is not None else None, b)} has "
                        f"{lengths[b]} tokens but the forward pass had {real} real tokens in batch row {b}; "
                        "call begin(batch) with the samples of each forward pass, in batch order"
                    )
                if lengths is None:  # fixed spans, no begin: check them against the lengths seen
                    for which, (_, end) in (("key", self.key), ("query", self.query)):
                        if end > real:
                            self._pending.clear()
                            raise ProbeError(
                                f"span: the {self._label(which)} does not fit batch row {b}, which has {real} "
                                "tokens (padding excluded); give spans inside every input"
                            )
        super().commit()

    def _clear(self) -> None:
        self._bounds = None
        self._on_device = None
        self._lengths = None
        self._first = None

    def load_state_dict(self, state) -> None:
        """Committed totals only: the spans of a batch, like its pending sums, live within one batch."""
        super().load_state_dict(state)
        self._clear()
        self._seen = None
