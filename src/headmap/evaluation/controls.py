"""Random-head controls: the same edits on as many heads drawn at random (seeded) from the heads no
edit names, scored like the edits; the edited effect is reported as its rank among the controls'
effects, beside their distribution, and compared item by item with the controls' mean.

By default a control draws from the same layers as the edit (as many heads in each layer as the
edit names there), so that it differs from the edit only in which heads of those layers it touches;
``match="uniform"`` draws from every layer (docs/methods/random_heads.md).

**Towers.** An edit acts on one tower (``tower=``; None: the model's language tower, docs/multimodal.md),
and its control is drawn from that tower: its layers and its head counts (a VLM's vision tower has other
counts than its language model; an encoder-decoder's encoder others than its decoder). The heads one
edit names never enter the pool of its own tower, and a head of another tower with the same numbers is a
different head."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..engine import language_tower
from ..errors import EditError, ModelError
from ..models import model_shape
from .editing import describe_edits
from .scoring import Comparison, EvalResult, compare


def model_heads(model: torch.nn.Module, tower: str | None = None) -> list[tuple[int, int]]:
    """Every (layer, query head) of one tower of the model (None: its language tower).

    The language tower reads :func:`headmap.models.model_shape`; another tower its own counts from the config
    (:func:`headmap.edits.base.tower_shape`: a VLM's ``vision_config``, an encoder-decoder's encoder);
    Mllama's ``cross`` tower is its cross-attention layers only (``text_config.cross_attention_layers``)."""
    from ..edits.base import tower_shape

    main = language_tower(model)
    tower = tower or main
    if tower == main:
        try:
            layers, heads, _ = model_shape(model)
        except ModelError:
            raise EditError("cannot tell the model's layers and heads from its config") from None
    else:
        shape = tower_shape(model, tower)
        if shape is None:
            raise EditError(
                f"cannot tell the layers and heads of the model's {tower} tower from its config, so no random "
                f"heads can be drawn there; run the edit without controls (--random-heads 0)"
            )
        layers, heads = shape
    numbers = range(layers)
    if tower == "cross" and main == "text":  # Mllama: cross-attention layers sit among the text layers
        config = getattr(model, "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        listed = getattr(text, "cross_attention_layers", None)
        if listed:
            numbers = sorted(int(la) for la in listed if 0 <= int(la) < layers)
    return [(layer, head) for layer in numbers for head in range(heads)]


#: How controls are drawn: ``layer`` (as many heads in each layer as the edit names there) or ``uniform``.
MATCHES = ("layer", "uniform")
#: Control draws when --random-heads is not given and the edits name heads.
DEFAULT_CONTROLS = 20


def edit_tower(edit: Any, model: torch.nn.Module) -> str:
    """The tower ``edit`` acts on: its ``tower=``, else the model's language tower."""
    return getattr(edit, "tower", None) or language_tower(model)


def random_like(edits: Sequence, model: torch.nn.Module, seed: int, match: str = "layer") -> list:
    """Copies of ``edits`` that touch as many heads as each does, drawn at random (seeded) from the
    model's heads that no edit of ``edits`` touches: the control for "these heads matter".

    Each edit's heads are drawn from its own tower (``tower=``; None: the language tower), with that
    tower's layers and head counts. ``match="layer"`` (default) draws, in every layer, as many heads as
    the edit names in that layer; ``"uniform"`` draws from every layer of the tower. EditError (saying
    how many heads there are) when a layer has fewer unedited heads than asked."""
    if match not in MATCHES:
        raise EditError(f"the control's head draw must be one of {', '.join(MATCHES)} (got {match!r})")
    for e in edits:
        if getattr(e, "heads", None) is None and getattr(e, "heads_rule", None) is not None:
            from ..edits import Edit

            Edit.bind(e, model)  # resolve the heads rule against the atlas (the rows of the edit's tower)
    named = [e for e in edits if getattr(e, "heads", None) is not None]
    if not named:
        raise EditError("a random-heads control needs edits that name their heads (heads=...)")
    main = language_tower(model)
    taken = {(edit_tower(e, model), la, h) for e in named for la, h in e.heads}
    pools: dict[str, list[tuple[int, int]]] = {}
    for tower in sorted({edit_tower(e, model) for e in named}):
        pools[tower] = [h for h in model_heads(model, tower) if (tower, *h) not in taken]
    rng = np.random.default_rng(seed)
    out = []
    for e in edits:
        heads = getattr(e, "heads", None)
        if heads is None:
            out.append(e)
            continue
        tower = edit_tower(e, model)
        pool = pools[tower]
        where = "" if tower == main else f" of the {tower} tower"
        if match == "uniform":
            if len(heads) > len(pool):
                raise EditError(
                    f"cannot draw {len(heads)} random heads{where}: the edits leave only {len(pool)} heads "
                    "unedited" + (f" there; edit fewer heads of the {tower} tower" if where else "")
                )
            pick = sorted(pool[i] for i in rng.choice(len(pool), size=len(heads), replace=False))
        else:
            pick = []
            for layer in sorted({la for la, _ in heads}):
                want = sum(1 for la, _ in heads if la == layer)
                free = [h for h in pool if h[0] == layer]
                if want > len(free):
                    raise EditError(
                        f"cannot draw {want} random heads in layer {layer}{where}: it has only {len(free)} heads no "
                        f"edit names; edit fewer heads there, or draw controls from every layer (--control-heads "
                        "uniform)"
                    )
                pick += [free[i] for i in rng.choice(len(free), size=want, replace=False)]
            pick = sorted(pick)
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


def draw_controls(edits: Sequence, model: torch.nn.Module, n: int, match: str = "layer") -> list[ControlDraw]:
    """``n`` controls (draws 0..n-1) for ``edits``; drawn before any scoring, so a control that
    cannot be drawn fails first."""
    if n < 0:
        raise EditError(f"--random-heads must be 0 or more (got {n})")
    return [ControlDraw(s, random_like(edits, model, s, match)) for s in range(n)]


@dataclass
class RandomControls:
    """The scored controls and the edits against them: ``versus`` compares, item by item, the mean
    correctness of the controls (its "base") with the edited run's (its "edit")."""

    draws: list[ControlDraw]
    versus: Comparison
    items: pd.DataFrame  # the edited run's items with pred_random{s} and correct_random{s} columns
    edited_difference: float = 0.0  # the edited run's accuracy difference from the unedited model
    match: str = "layer"

    @property
    def differences(self) -> list[float]:
        """Every control's accuracy difference from the unedited model, in draw order."""
        return [d.result.acc.difference for d in self.draws if d.result is not None]

    @property
    def rank(self) -> tuple[int, int, int]:
        """(below, tied, draws): how many controls changed accuracy less (more negative: lower) than the
        edits, how many the same. The edited effect's rank from the bottom is ``below + 1`` (ties: up
        to ``below + tied + 1``) of ``draws + 1``."""
        diffs = np.asarray(self.differences)
        below = int(np.sum(diffs < self.edited_difference))
        tied = int(np.sum(diffs == self.edited_difference))
        return below, tied, int(diffs.size)

    @property
    def rank_p(self) -> float:
        """Two-sided Monte Carlo p of the edited effect among the controls: ``2 min(lower, upper)``,
        each tail counting ties and the edit itself, ``(1 + #controls at least as extreme) / (draws + 1)``,
        at most 1 (Phipson & Smyth 2010)."""
        below, tied, n = self.rank
        above = n - below - tied
        low = (1 + below + tied) / (n + 1)
        high = (1 + above + tied) / (n + 1)
        return min(1.0, 2 * min(low, high))

    def distribution(self) -> dict[str, float]:
        """min, quartiles, max and mean of the controls' accuracy differences."""
        d = np.asarray(self.differences, dtype=np.float64)
        q = np.quantile(d, [0.0, 0.25, 0.5, 0.75, 1.0])
        return {
            "min": float(q[0]),
            "q1": float(q[1]),
            "median": float(q[2]),
            "q3": float(q[3]),
            "max": float(q[4]),
            "mean": float(d.mean()),
        }

    def rank_text(self) -> str:
        below, tied, n = self.rank
        where = f"{below + 1}" if not tied else f"{below + 1}-{below + tied + 1}"
        return (
            f"edited effect {self.edited_difference:+.3f} ranks {where} of {n + 1} from the lowest among {n} "
            f"{self.match}-matched controls (controls: median {self.distribution()['median']:+.3f}, range "
            f"[{self.distribution()['min']:+.3f}, {self.distribution()['max']:+.3f}]; rank p = {self.rank_p:.3g})"
        )

    @property
    def mean_difference(self) -> float:
        """Mean over the controls of their accuracy difference from the unedited model."""
        diffs = [d.result.acc.difference for d in self.draws if d.result is not None]
        return sum(diffs) / len(diffs)

    def describe(self) -> list[tuple[int, str]]:
        """(draw, its edits in one line) of every control."""
        return [(d.draw, "; ".join(describe_edits(d.edits))) for d in self.draws]

    def summary(self) -> dict[str, Any]:
        below, tied, n = self.rank
        return {
            "random_controls": [
                {**d.result.acc.as_dict(), "draw": d.draw, "heads": d.heads()} for d in self.draws if d.result
            ],
            "edit_vs_random": self.versus.as_dict(),
            "control_rank": {
                "match": self.match,
                "draws": n,
                "edited_difference": self.edited_difference,
                "controls_below": below,
                "controls_tied": tied,
                "rank_from_lowest": below + 1,
                "of": n + 1,
                "rank_p": self.rank_p,
                "controls": self.distribution(),
            },
        }


def random_head_controls(
    edited: EvalResult,
    draws: Sequence[ControlDraw],
    score: Callable[[list], EvalResult],
    bootstrap: int,
    seed: int,
    match: str = "layer",
) -> RandomControls:
    """Score every control with ``score`` (edits -> result, the same items and base as ``edited``),
    rank the edited effect among the controls' effects, and compare the edited run with the controls'
    mean correctness, item by item (clusters as the edited run's: a cluster bootstrap; else over items)."""
    draws = list(draws)
    if not draws:
        raise EditError("random_head_controls needs at least one control draw")
    items = edited.items.copy()
    for d in draws:
        d.result = score(d.edits)
        items[f"pred_random{d.draw}"] = d.result.items["pred_edit"]
        items[f"correct_random{d.draw}"] = d.result.items["correct_edit"]
    rand = items[[f"correct_random{d.draw}" for d in draws]].to_numpy(dtype=float).mean(axis=1)
    clusters = edited.clusters if edited.acc.clusters is not None else None
    versus = compare(rand, items["correct_edit"].to_numpy(dtype=float), bootstrap, seed, clusters)
    return RandomControls(draws, versus, items, edited.acc.difference, match)
