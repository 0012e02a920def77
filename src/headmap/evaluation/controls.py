"""Random-head controls: the same edits on as many heads drawn at random (seeded) from the heads no
edit names, scored like the edits, and the edits compared item by item with the controls' mean."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..errors import EditError, ModelError
from ..models import model_shape
from .editing import describe_edits
from .scoring import Comparison, EvalResult, compare


def model_heads(model: torch.nn.Module) -> list[tuple[int, int]]:
    """Every (layer, query head) of the model."""
    try:
        layers, heads, _ = model_shape(model)
    except ModelError:
        raise EditError("cannot tell the model's layers and heads from its config") from None
    return [(layer, head) for layer in range(layers) for head in range(heads)]


def random_like(edits: Sequence, model: torch.nn.Module, seed: int) -> list:
    """Copies of ``edits`` that touch as many heads as each does, drawn at random (seeded) from the
    model's heads that no edit of ``edits`` touches: the control for "these heads matter"."""
    for e in edits:
        if getattr(e, "heads", None) is None and getattr(e, "heads_rule", None) is not None:
            from ..edits import Edit

            Edit.bind(e, model)  # resolve the heads rule against the atlas
    named = [e for e in edits if getattr(e, "heads", None) is not None]
    if not named:
        raise EditError("a random-heads control needs edits that name their heads (heads=...)")
    taken = {h for e in named for h in e.heads}
    pool = [h for h in model_heads(model) if h not in taken]
    rng = np.random.default_rng(seed)
    out = []
    for e in edits:
        heads = getattr(e, "heads", None)
        if heads is None:
            out.append(e)
            continue
        if len(heads) > len(pool):
            raise EditError(f"cannot draw {len(heads)} random heads from the {len(pool)} heads the edits leave")
        pick = sorted(pool[i] for i in rng.choice(len(pool), size=len(heads), replace=False))
        out.append(with_heads(e, pick))
    return out


def with_heads(edit: Any, heads: Sequence[tuple[int, int]]) -> Any:
    """A copy of ``edit`` that acts on ``heads`` instead (a mean ablation is fitted again on bind)."""
    new = copy.copy(edit)
    new.heads = sorted({(int(la), int(h)) for la, h in heads})
    new._layers = {la for la, _ in new.heads}
    if hasattr(new, "heads_rule"):
        new.heads_rule = None
    if getattr(new, "mode", None) == "mean" and getattr(new, "reference", None) is not None:
        new.means, new._fitted_on = None, None  # the means of other heads: fit them on bind
    return new


@dataclass
class ControlDraw:
    """One random-head control: draw ``draw`` (its seed), its edits and, once scored, its result."""

    draw: int
    edits: list
    result: EvalResult | None = None

    def heads(self) -> list[list[int]]:
        return [list(h) for e in self.edits for h in (getattr(e, "heads", None) or [])]


def draw_controls(edits: Sequence, model: torch.nn.Module, n: int) -> list[ControlDraw]:
    """``n`` controls (draws 0..n-1) for ``edits``; drawn before any scoring, so a control that
    cannot be drawn fails first."""
    if n < 0:
        raise EditError(f"--random-heads must be 0 or more (got {n})")
    return [ControlDraw(s, random_like(edits, model, s)) for s in range(n)]


@dataclass
class RandomControls:
    """The scored controls and the edits against them: ``versus`` compares, item by item, the mean
    correctness of the controls (its "base") with the edited run's (its "edit")."""

    draws: list[ControlDraw]
    versus: Comparison
    items: pd.DataFrame  # the edited run's items with pred_random{s} and correct_random{s} columns

    @property
    def mean_difference(self) -> float:
        """Mean over the controls of their accuracy difference from the unedited model."""
        diffs = [d.result.acc.difference for d in self.draws if d.result is not None]
        return sum(diffs) / len(diffs)

    def describe(self) -> list[tuple[int, str]]:
        """(draw, its edits in one line) of every control."""
        return [(d.draw, "; ".join(describe_edits(d.edits))) for d in self.draws]

    def summary(self) -> dict[str, Any]:
        return {
            "random_controls": [
                {**d.result.acc.as_dict(), "draw": d.draw, "heads": d.heads()} for d in self.draws if d.result
            ],
            "edit_vs_random": self.versus.as_dict(),
        }


def random_head_controls(
    edited: EvalResult,
    draws: Sequence[ControlDraw],
    score: Callable[[list], EvalResult],
    bootstrap: int,
    seed: int,
) -> RandomControls:
    """Score every control with ``score`` (edits -> result, the same items and base as ``edited``)
    and compare the edited run with the controls' mean correctness, item by item, paired bootstrap."""
    draws = list(draws)
    if not draws:
        raise EditError("random_head_controls needs at least one control draw")
    items = edited.items.copy()
    for d in draws:
        d.result = score(d.edits)
        items[f"pred_random{d.draw}"] = d.result.items["pred_edit"]
        items[f"correct_random{d.draw}"] = d.result.items["correct_edit"]
    rand = items[[f"correct_random{d.draw}" for d in draws]].to_numpy(dtype=float).mean(axis=1)
    versus = compare(rand, items["correct_edit"].to_numpy(dtype=float), bootstrap, seed)
    return RandomControls(draws, versus, items)
