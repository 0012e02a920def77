"""Head-aware budgets from an atlas: retrieval heads keep everything. See docs/methods/presses/head_aware.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..edits.heads import load_atlas, select_heads
from ..errors import EditError
from ..models import model_shape
from .base import LayerView, Press, PressError, check_count


@dataclass
class HeadAwarePress(Press):
    """Head-aware compression (RazorAttention, Tang et al. 2024; DuoAttention, Xiao et al. 2024).

    The heads that ``rule`` names in ``atlas`` (default ``"top 15% retrieval"``: the retrieval heads
    of a ``headmap scan``) keep their whole cache; every other head keeps the ``sinks`` first tokens
    and a recent window. A kv head keeps everything when any of its query heads is named (GQA). The
    window is the largest whole number that keeps the total within the budget of ``ratio`` over all
    layers: R T + (L Hkv - R)(sinks + w) <= (1 - ratio) L Hkv T, R the named kv heads. When the named
    heads alone exceed the budget every head gets the same streaming budget (a note says so).
    Parameters: ``ratio``, ``atlas`` (an Atlas or a run folder), ``rule``, ``sinks`` (4).
    """

    name = "head_aware"

    atlas: Any = None
    rule: str = "top 15% retrieval"
    sinks: int = 4
    _full: set = field(default_factory=set, init=False, repr=False)
    _note: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count(self.name, "sinks", self.sinks)
        if self.atlas is None:
            raise PressError(
                "head_aware needs an atlas to know which heads keep their whole cache: pass atlas= (an Atlas or the "
                "run folder of a headmap scan of this model), or --atlas RUN_DIR on the command line"
            )

    @property
    def head_wise(self) -> bool:
        return True

    def params(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "rule": self.rule, "sinks": self.sinks}

    def bind(self, model: nn.Module) -> None:
        shape = model_shape(model)
        try:
            atlas = load_atlas(self.atlas)
            arch = (getattr(atlas, "meta", None) or {}).get("architecture") or {}
            kv = arch.get("kv_heads")
            if isinstance(kv, int) and kv != shape.kv_heads:
                raise PressError(
                    f"head_aware: the atlas was measured on a model with {kv} key/value heads per layer, but this "
                    f"model has {shape.kv_heads}; scan this model to choose its heads"
                )
            heads = select_heads(self.rule, atlas, shape=(shape.layers, shape.heads), edit="head_aware")
        except EditError as exc:
            raise PressError(str(exc)) from None
        group = shape.heads // shape.kv_heads
        self._full = {(layer, head // group) for layer, head in heads}

    def notes(self, length: int) -> list[str]:
        return list(self._note)

    def window_for(self, view: LayerView) -> int | None:
        """The recent window of the other heads (None: every head keeps the same streaming budget)."""
        total = view.layers * view.kv_heads
        full = len(self._full)
        budget = int((1 - self.ratio) * total * view.length)
        if full * view.length > budget or full == total:
            return None
        return max(0, (budget - full * view.length) // (total - full) - self.sinks)

    def keep(self, view: LayerView) -> torch.Tensor:
        length = view.length
        window = self.window_for(view)
        named = self._full
        if window is None:
            named = set()
            per_head = int((1 - self.ratio) * length)
            note = (
                f"head_aware: the {len(self._full)} named kv heads cannot keep their whole cache within ratio "
                f"{self.ratio}; every head keeps the same sinks + recent window"
            )
            if self.ratio > 0 and note not in self._note:
                self._note.append(note)
            window = max(0, per_head - self.sinks)
        pos = view.positions()  # [B, T]; padding < 0
        col = torch.arange(length, device=pos.device)
        other = ((pos >= 0) & (pos < self.sinks)) | (col[None, :] >= length - window)
        other = other & view.key_valid
        keep = other[:, None, :].expand(-1, view.kv_heads, -1).clone()
        for layer, head in named:
            if layer == view.layer:
                keep[:, head] = True
        return keep
