"""Edits for an evaluation: built from ``NAME:key=value`` specs, prepared for a tokenizer and bound
to a model before any scoring, and described in one line each."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def build_edits(specs: Iterable[Any], atlas: Any = None, tokenizer: Any = None) -> list:
    """Edits from ``NAME:key=value`` specs or Edit objects (``headmap.edits.make_edits``); ``atlas`` (an
    Atlas or a run folder) resolves heads rules such as ``heads="top 5 retrieval"``."""
    specs = list(specs)
    if not specs:
        return []
    from ..edits import make_edits

    edits = make_edits(specs, atlas=atlas)
    if tokenizer is not None:
        from ..steer import prepare

        prepare(edits, tokenizer)  # text-file references of mean ablation
    return edits


def prepare_edits(edits: Iterable, tokenizer: Any, model: torch.nn.Module) -> None:
    """Fit what the edits read from text (mean ablation's reference) and bind them to ``model``:
    a layer or head the model does not have fails here, before any scoring."""
    edits = list(edits)
    if not edits:
        return
    from ..steer import prepare

    prepare(edits, tokenizer)
    for e in edits:
        e.bind(model)


def describe_edits(edits: Iterable) -> list[str]:
    return [e.describe() if hasattr(e, "describe") else repr(e) for e in edits]
