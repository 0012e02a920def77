"""Choosing heads by a rule over an atlas.

An edit's ``heads=`` is a list of (layer, head) pairs or a rule string read against the head table
of an atlas (:class:`headmap.Atlas`, or the run folder of ``headmap scan``)::

    rule      := clause ("and" clause)* [layers]
    clause    := "all"
               | "top" N METRIC              N heads with the highest METRIC
               | "top" P "%" METRIC          ceil(P% of the candidate heads), at least 1
               | METRIC OP NUMBER            OP: > >= < <= == !=
    layers    := "in layers" A "to" B        inclusive; also "in layers A-B", "in layer A"
    METRIC    := a probe of the atlas (its own metric: sink, retrieval, induction, ...),
                 a metric name (q_massive, item_0, ...) or probe.metric (position_profile.item_0)

Examples: ``"top 5% retrieval"``, ``"top 3 induction"``, ``"sink > 0.5 in layers 2 to 10"``,
``"retrieval >= 0.1 and entropy < 0.5"``, ``"all in layers 0 to 3"``.

The layer range and the comparisons choose the candidates first (heads whose value is NaN are never
candidates of that metric); a ``top`` clause (at most one) then ranks the candidates, ties broken by
layer and head. A rule that selects no head is an error, so that an edit never silently does
nothing.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EditError

_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq, "!=": operator.ne}
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_NAME = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)?"
_LAYERS = re.compile(r"\s+in\s+layers?\s+(?P<a>\d+)(?:\s*(?:to|-|\.\.)\s*(?P<b>\d+))?\s*$", re.IGNORECASE)
_TOP = re.compile(rf"^top\s+(?P<n>{_NUMBER})\s*(?P<pct>%)?\s*(?P<metric>{_NAME})$", re.IGNORECASE)
_CMP = re.compile(rf"^(?P<metric>{_NAME})\s*(?P<op>>=|<=|==|!=|>|<|=)\s*(?P<value>{_NUMBER})$")


@dataclass
class Rule:
    """A parsed heads rule."""

    text: str
    layers: tuple[int, int] | None = None
    comparisons: list[tuple[str, str, float]] = field(default_factory=list)
    top: tuple[float, bool, str] | None = None  # (n, is_percent, metric)


def parse_rule(text: str) -> Rule:
    """Parse a heads rule (see the module docstring); EditError naming the part that is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise EditError("heads rule is empty; e.g. 'top 5% retrieval' or 'sink > 0.5 in layers 2 to 10'")
    rule = Rule(text=text.strip())
    body = " " + rule.text
    m = _LAYERS.search(body)
    if m:
        a = int(m["a"])
        b = int(m["b"]) if m["b"] is not None else a
        if b < a:
            raise EditError(f"heads rule {text!r}: layers {a} to {b} is an empty range; write the lower layer first")
        rule.layers = (a, b)
        body = body[: m.start()]
    elif re.search(r"\bin\s+layers?\b", body, re.IGNORECASE):
        raise EditError(f"heads rule {text!r}: write the layer range as 'in layers A to B' or 'in layer A'")
    body = body.strip()
    if not body:
        raise EditError(f"heads rule {text!r} says which layers but not which heads; start it with 'all' or 'top'")
    for clause in re.split(r"\s+and\s+", body, flags=re.IGNORECASE):
        clause = clause.strip()
        if clause.lower() == "all":
            continue
        top = _TOP.match(clause)
        if top:
            if rule.top is not None:
                raise EditError(f"heads rule {text!r} has two 'top' clauses; use one")
            n = float(top["n"])
            pct = bool(top["pct"])
            if n <= 0 or (pct and n > 100) or (not pct and n != int(n)):
                what = "a percentage in (0, 100]" if pct else "a whole number of heads >= 1"
                raise EditError(f"heads rule {text!r}: 'top {top['n']}' needs {what}")
            rule.top = (n, pct, top["metric"])
            continue
        cmp = _CMP.match(clause)
        if cmp:
            op = "==" if cmp["op"] == "=" else cmp["op"]
            rule.comparisons.append((cmp["metric"], op, float(cmp["value"])))
            continue
        raise EditError(
            f"heads rule {text!r}: cannot read {clause!r}; clauses are 'all', 'top N METRIC', 'top P% METRIC' "
            "or 'METRIC > VALUE' (>, >=, <, <=, ==, !=), joined by 'and', optionally ending in 'in layers A to B'"
        )
    return rule


def load_atlas(atlas: Any) -> Any:
    """An Atlas from an Atlas or a run folder path (``headmap scan --out``)."""
    from ..atlas import Atlas

    if atlas is None or isinstance(atlas, Atlas):
        return atlas
    if isinstance(atlas, (str, Path)):
        return Atlas.load(atlas)
    if hasattr(atlas, "heads") and hasattr(atlas.heads, "columns"):
        return atlas
    raise EditError(f"atlas must be an Atlas or the run folder of a headmap scan, got {type(atlas).__name__}")


def _metric_rows(heads, name: str, text: str):
    """The rows of ``heads`` (the atlas table) holding metric ``name``."""
    probes = set(heads["probe"].unique())
    if name in probes:
        rows = heads[(heads.probe == name) & (heads.metric == name)]
        if len(rows):
            return rows
    if "." in name:
        probe, metric = name.split(".", 1)
        rows = heads[(heads.probe == probe) & (heads.metric == metric)]
        if len(rows):
            return rows
    rows = heads[heads.metric == name]
    if len(rows) and rows.probe.nunique() == 1:
        return rows
    if len(rows):
        owners = ", ".join(sorted(f"{p}.{name}" for p in rows.probe.unique()))
        raise EditError(f"heads rule {text!r}: metric {name!r} is in several probes; name one of: {owners}")
    known = sorted(probes)
    raise EditError(
        f"heads rule {text!r}: the atlas has no head metric {name!r}; it has: {', '.join(known) or 'no head probe'} "
        f"(run headmap scan --probes {name.split('.')[0]} first)"
    )


def select_heads(
    rule: str | Rule,
    atlas: Any,
    shape: tuple[int, int] | None = None,
    edit: str = "edit",
    tower: str | None = None,
) -> list[tuple[int, int]]:
    """The (layer, head) pairs a rule selects in ``atlas``, sorted.

    ``shape`` (layers, heads of the model the edit will run on) is checked against the atlas. The rule
    reads the rows of ``tower`` (None: the atlas's main tower, :func:`headmap.atlas.main_tower`: a VLM's
    text model, an encoder-decoder's decoder), so that a vision layer never stands for a text layer.
    """
    parsed = rule if isinstance(rule, Rule) else parse_rule(rule)
    text = parsed.text
    atlas = load_atlas(atlas)
    if atlas is None:
        raise EditError(f"{edit}: heads rule {text!r} needs an atlas (atlas= or --atlas RUN_DIR)")
    heads = atlas.heads
    main = None
    if heads is not None and len(heads):
        from ..atlas import main_tower, tower_rows

        main = main_tower(heads)
        heads = tower_rows(heads, tower)  # the main tower unless told (a VLM: text; docs/multimodal.md)
    if heads is None or not len(heads):
        if tower is not None and atlas.heads is not None and len(atlas.heads):
            raise EditError(
                f"{edit}: heads rule {text!r}: the atlas has no head rows of the {tower} tower (scan the model on "
                "inputs that run it: an image corpus for a vision tower)"
            )
        raise EditError(f"{edit}: heads rule {text!r}: the atlas has no head table")
    arch = (atlas.meta or {}).get("architecture") or {}
    if tower is not None and tower != main:
        arch = (arch.get("towers") or {}).get(tower) or {}  # the meta of a run with several towers
    if shape is not None:
        want = (arch.get("layers"), arch.get("heads"))
        if all(isinstance(x, int) for x in want) and tuple(want) != tuple(shape):
            raise EditError(
                f"{edit}: the atlas was measured on a model with {want[0]} layers x {want[1]} heads, but this model "
                f"has {shape[0]} layers x {shape[1]} heads; scan this model to choose its heads"
            )
    every = heads[["layer", "head"]].drop_duplicates()
    candidates = {(int(l), int(h)) for l, h in every.itertuples(index=False)}
    if shape is not None:
        candidates |= {(l, h) for l in range(shape[0]) for h in range(shape[1])}
    if parsed.layers is not None:
        a, b = parsed.layers
        candidates = {(l, h) for l, h in candidates if a <= l <= b}
    for name, op, value in parsed.comparisons:
        rows = _metric_rows(heads, name, text)
        fn = _OPS[op]
        keep = {
            (int(r.layer), int(r.head))
            for r in rows.itertuples(index=False)
            if not math.isnan(r.value) and fn(float(r.value), value)
        }
        candidates &= keep
    if parsed.top is not None:
        n, pct, name = parsed.top
        rows = _metric_rows(heads, name, text)
        scored = [
            (float(r.value), int(r.layer), int(r.head))
            for r in rows.itertuples(index=False)
            if (int(r.layer), int(r.head)) in candidates and not math.isnan(r.value)
        ]
        scored.sort(key=lambda t: (-t[0], t[1], t[2]))
        count = max(1, math.ceil(n / 100 * len(scored) - 1e-9)) if pct else int(n)
        candidates = {(l, h) for _, l, h in scored[:count]}
    if not candidates:
        raise EditError(f"{edit}: heads rule {text!r} selects no head in this atlas")
    return sorted(candidates)
