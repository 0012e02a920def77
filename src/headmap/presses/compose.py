"""Composition: budgets from one press, scores from another. See docs/methods/presses/compose.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..specs import parse_options, split_top
from .base import LayerView, Press, PressError, ScorerPress, drop_padding_first, settable, top_mask


def _named(base: type[Press]) -> dict[str, type[Press]]:
    """Every subclass of ``base`` with a command-line name (no import of the package's table of presses)."""
    classes: dict[str, type[Press]] = {}
    pending = list(base.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if getattr(cls, "name", ""):
            classes.setdefault(cls.name, cls)
    return classes


_NOT_A_SCORER = (
    "compose: scores must come from a press that scores entries (h2o, snapkv, knorm, streaming, pyramidkv), got "
    "{name}, which selects entries itself; use it as the budget"
)


def _inner(role: str, spec: Any, ratio: float, scorer: bool) -> Press:
    """The press of ``role`` (budget or scores) from a spec string or a press, with the composition's ratio."""
    if isinstance(spec, Press):
        press = spec
    elif isinstance(spec, str) and spec.strip():
        parts = [p.strip() for p in split_top(spec.strip(), ":", PressError)]
        classes = _named(Press)
        classes.pop(ComposePress.name, None)
        cls = classes.get(parts[0])
        if cls is None:
            raise PressError(
                f"compose: unknown {role} press {parts[0]!r} in {spec!r}; presses: {', '.join(sorted(classes))}"
            )
        if scorer and not issubclass(cls, ScorerPress):
            raise PressError(_NOT_A_SCORER.format(name=cls.name))
        params = parse_options("press", cls.name, parts[1:], settable(cls), PressError, f"{cls.name}:window=32")
        if "ratio" in params:
            raise PressError(
                f"compose: set ratio on the composition (compose:ratio=...), not inside its {role} press {spec!r}"
            )
        press = cls(ratio=ratio, **params)
    else:
        raise PressError(f"compose: {role} must be a press spec such as 'pyramidkv' or a press, got {spec!r}")
    if scorer and not isinstance(press, ScorerPress):
        raise PressError(_NOT_A_SCORER.format(name=press.name))
    if isinstance(press, ComposePress):
        raise PressError("compose: a composition cannot be the budget or the scores of another one")
    press.ratio = ratio
    return press


@dataclass
class ComposePress(Press):
    """Composition: how many entries each layer (and kv head) keeps from ``budget``, which ones from ``scores``.

    For every layer, ``budget`` says how many entries each kv head keeps: its ``budget(view)``
    when it is a scoring press (one count per layer: uniform, or pyramidkv's pyramid), else the
    count its own selection keeps per kv head (adakv, head_aware: one count per head). Each kv
    head then keeps that many entries with the highest ``scores`` (a scoring press: h2o, snapkv,
    knorm, streaming, pyramidkv), padding dropped first, as every scoring press does. Composing a
    scoring press with itself is that press. Parameters: ``ratio`` (given to both presses),
    ``budget`` and ``scores`` (a press spec such as ``'pyramidkv:window=32'``, or a press).
    Command line: ``compose:budget=pyramidkv:scores=h2o`` (quote an inner spec with parameters:
    ``compose:budget='pyramidkv:window=32':scores='snapkv:window=16'``). Presses at the prefill
    only (an inner ``decode=true`` is not carried into decoding).
    """

    name = "compose"

    budget: Any = "pyramidkv"
    scores: Any = "h2o"
    _budget: Press | None = field(default=None, init=False, repr=False)
    _scores: ScorerPress | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._budget = _inner("budget", self.budget, self.ratio, scorer=False)
        self._scores = _inner("scores", self.scores, self.ratio, scorer=True)
        # a scoring budget press gives its count from arithmetic alone; a head-wise one runs its own selection
        budget_reads = not isinstance(self._budget, ScorerPress)
        self.reads_received = self._scores.reads_received or (budget_reads and self._budget.reads_received)
        self.reads_window = self._scores.reads_window or (budget_reads and self._budget.reads_window)
        windows = {p.window_rows() for p in self._readers() if p.reads_window}
        if len(windows) > 1:
            raise PressError(
                f"compose: the budget and scores presses read observation windows of different sizes "
                f"({' and '.join(map(str, sorted(windows)))} queries); give them the same window"
            )

    def _readers(self) -> list[Press]:
        presses: list[Press] = [self._scores]
        if not isinstance(self._budget, ScorerPress):
            presses.append(self._budget)
        return presses

    def window_rows(self) -> int:
        return max((p.window_rows() for p in self._readers() if p.reads_window), default=0)

    def bind(self, model: nn.Module) -> None:
        self._budget.bind(model)
        self._scores.bind(model)

    @property
    def head_wise(self) -> bool:
        return self._budget.head_wise

    def notes(self, length: int) -> list[str]:
        return list(dict.fromkeys([*self._budget.notes(length), *self._scores.notes(length)]))

    def params(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "budget": self._budget.describe(), "scores": self._scores.describe()}

    def counts(self, view: LayerView) -> torch.Tensor:
        """[B, Hkv] long: how many entries each kv head of this layer keeps (the budget press's counts)."""
        batch, kv_heads = view.keys.shape[:2]
        if isinstance(self._budget, ScorerPress):
            n = min(max(self._budget.budget(view), 0), view.length)
            return torch.full((batch, kv_heads), n, dtype=torch.long, device=view.keys.device)
        return self._budget.keep(view).sum(dim=-1).long()

    def keep(self, view: LayerView) -> torch.Tensor:
        counts = self.counts(view)
        length = view.length
        n = int(counts.flatten()[0])
        if bool((counts == n).all()):  # one count per layer: the scoring press's own selection
            if n >= length:
                return torch.ones(view.keys.shape[:3], dtype=torch.bool, device=view.keys.device)
            return top_mask(drop_padding_first(self._scores.score(view), view.key_valid), n)
        scores = drop_padding_first(self._scores.score(view), view.key_valid)
        order = scores.argsort(dim=-1, descending=True, stable=True)  # ties: the lower position first
        rank = torch.arange(length, device=scores.device).expand_as(order)
        keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        keep.scatter_(-1, order, rank < counts[..., None])
        return keep

    def describe(self) -> str:
        return f"compose(ratio={self.ratio}, budget={self._budget.describe()}, scores={self._scores.describe()})"


__all__ = ["ComposePress"]
