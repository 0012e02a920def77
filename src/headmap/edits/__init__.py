"""Training-free attention edits, applied by the engine to the heads and keys they name.

Each edit is a small class (one module each); ``make_edits`` builds them from specs such as
``ablate:heads=[[18,6]]:mode=zero`` or ``scale_first_token:heads="top 10% sink":factor=0.5`` (the
syntax of ``headmap steer --edit``, documented in docs/steering.md).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

from ..errors import EditError
from ..specs import parse_options, split_top
from .ablate import Ablate
from .base import Edit, model_shape, tower_shape
from .first_token import ScaleFirstToken
from .heads import Rule, load_atlas, parse_rule, select_heads
from .local import ReinforceLocal
from .pai import Pai
from .sinks import CalibrateSinks, RedistributeSinks
from .span import ScaleSpan, SpanEdit, find_span
from .temperature import Temperature
from .var import Var
from .vhr import Vhr

#: Edit classes by spec name.
EDITS: dict[str, type[Edit]] = {
    cls.name: cls
    for cls in (
        Ablate,
        ScaleFirstToken,
        ScaleSpan,
        CalibrateSinks,
        RedistributeSinks,
        Temperature,
        ReinforceLocal,
        Pai,
        Var,
        Vhr,
    )
}

#: Constructor arguments a spec cannot set (Python objects).
_NOT_IN_SPECS = {"self", "atlas", "means"}


def spec_parameters(cls: type[Edit]) -> list[str]:
    """Names a spec may set for an edit class: its constructor's, and ``tower`` (every edit takes it:
    the tower its layers refer to, edits/base.py)."""
    names = [p for p in inspect.signature(cls.__init__).parameters if p not in _NOT_IN_SPECS]
    return names + ([] if "tower" in names else ["tower"])


def parse_edit(spec: str, atlas: Any = None) -> Edit:
    """One edit from ``name:key=value:key=value`` (values are JSON or bare words)."""
    if not isinstance(spec, str) or not spec.strip():
        raise EditError(f"empty edit spec; choose from: {', '.join(EDITS)}")
    name, *options = split_top(spec.strip(), ":", EditError)
    name = name.strip()
    if name not in EDITS:
        raise EditError(f"unknown edit {name!r}; choose from: {', '.join(EDITS)}")
    cls = EDITS[name]
    settable = spec_parameters(cls)
    kwargs = parse_options("edit", name, options, settable, EditError, f"{name}:heads=[[0,1]]")
    try:
        return cls(**kwargs, atlas=atlas)
    except TypeError as exc:
        raise EditError(f"bad parameters for edit {name}: {exc}") from exc


def make_edits(specs: str | Edit | Iterable[str | Edit], atlas: Any = None) -> list[Edit]:
    """Edits from specs: one string (several specs separated by commas), an Edit, or a list of either.

    ``atlas`` (an Atlas or a run folder) resolves heads rules such as ``heads="top 5% retrieval"``; it is
    also given to Edit objects that have none.
    """
    atlas = load_atlas(atlas)
    if isinstance(specs, (str, Edit)):
        specs = [specs]
    edits: list[Edit] = []
    for item in specs:
        if isinstance(item, Edit):
            if item.atlas is None and atlas is not None:
                item.atlas = atlas
            edits.append(item)
        elif isinstance(item, str):
            edits.extend(parse_edit(part, atlas=atlas) for part in split_top(item, ",", EditError) if part.strip())
        else:
            raise EditError(f"an edit is a spec string or an Edit object, got {type(item).__name__}")
    if not edits:
        raise EditError(f"no edit given; choose from: {', '.join(EDITS)}")
    return edits


__all__ = [
    "EDITS",
    "Ablate",
    "CalibrateSinks",
    "Edit",
    "Pai",
    "RedistributeSinks",
    "ReinforceLocal",
    "Rule",
    "ScaleFirstToken",
    "ScaleSpan",
    "SpanEdit",
    "Temperature",
    "Var",
    "Vhr",
    "find_span",
    "load_atlas",
    "make_edits",
    "model_shape",
    "parse_edit",
    "parse_rule",
    "select_heads",
    "spec_parameters",
    "tower_shape",
]
