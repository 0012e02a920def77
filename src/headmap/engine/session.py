"""Sessions: install the ``headmap`` attention implementation into a model, and restore it after.

    with headmap.observe(model, probes=[SinkProbe()]) as session:
        model(**batch)
    session.probes[0].result()

The model object is not changed beyond ``config._attn_implementation``, which is set back to what
it was when the session ends, also when the body raises.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..errors import UnsupportedModelError
from . import registry
from .attention import headmap_attention_forward
from .mask import headmap_mask
from .towers import language_tower, layer_key, split_layer_key

IMPLEMENTATION = "headmap"

#: Model types whose equality with eager attention is proven by the test suite (the multimodal,
#: vision and encoder-decoder ones by tests/test_multimodal.py; docs/multimodal.md).
TESTED_MODEL_TYPES = (
    "bart",
    "bert",
    "clip_vision_model",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "gpt2",
    "gpt_neox",
    "gpt_oss",
    "idefics3",
    "llama",
    "llava",
    "mistral",
    "mllama",
    "olmo2",
    "paligemma",
    "phi3",
    "qwen2",
    "qwen2_5_vl",
    "qwen2_vl",
    "qwen3",
    "siglip_vision_model",
    "t5",
    "vit",
    "whisper",
)

_REGISTERED = False


def register() -> None:
    """Register ``headmap`` with transformers' attention and mask interfaces (idempotent)."""
    global _REGISTERED
    if not _REGISTERED:
        AttentionInterface.register(IMPLEMENTATION, headmap_attention_forward)
        AttentionMaskInterface.register(IMPLEMENTATION, headmap_mask)
        _REGISTERED = True


def _uses_attention_interface(model: nn.Module) -> bool:
    """True when some module of the model dispatches attention through AttentionInterface."""
    seen: set[str] = set()
    for sub in model.modules():
        name = type(sub).__module__
        if name in seen or not name.startswith("transformers.models."):
            continue
        seen.add(name)
        mod = sys.modules.get(name)
        try:
            source = inspect.getsource(mod) if mod is not None else ""
        except (OSError, TypeError):
            continue
        if "ALL_ATTENTION_FUNCTIONS" in source:
            return True
    return False


def _bypassing_attention(model: nn.Module) -> tuple[str, str] | None:
    """(where, class) of the first transformers attention module whose forward bypasses AttentionInterface.

    An attention module is one of transformers' classes named ``...Attention`` with no such module
    inside it (a wrapper such as BertAttention delegates); it bypasses the interface when the source of
    its ``forward`` never looks up ``ALL_ATTENTION_FUNCTIONS``. A multimodal model may route its language
    model through the interface and not its vision or audio tower (GOT-OCR2's SAM encoder): the engine
    would then see only part of the model, so it is refused.
    """
    from .towers import tower_of

    def is_attention(m: nn.Module) -> bool:
        cls = type(m)
        return cls.__name__.endswith("Attention") and cls.__module__.startswith("transformers.models.")

    routed: dict[type, bool] = {}  # per class: its forward looks the interface up
    for path, sub in model.named_modules():
        if not is_attention(sub) or any(is_attention(c) for c in sub.modules() if c is not sub):
            continue
        cls = type(sub)
        if cls not in routed:
            try:
                routed[cls] = "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)
            except (OSError, TypeError):
                routed[cls] = True  # no source to read: give it the benefit of the doubt
        if not routed[cls]:
            return f"{tower_of(sub, model)[0]} tower ({path})", cls.__name__
    return None


def check_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` unless the model's attention can run under headmap."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    supported = ", ".join(TESTED_MODEL_TYPES)
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a transformers PreTrainedModel; headmap needs one "
            f"(tested model types: {supported})"
        )
    if (can_set is not None and not can_set()) or not _uses_attention_interface(model):
        raise UnsupportedModelError(
            f"model type '{model_type}' does not route its attention through transformers' "
            f"AttentionInterface (or has no attention), so headmap cannot observe it; "
            f"use one of the tested model types: {supported}"
        )
    bypass = _bypassing_attention(model)
    if bypass is not None:
        raise UnsupportedModelError(
            f"model type '{model_type}': its {bypass[0]} computes attention in {bypass[1]}, which does not "
            f"go through transformers' AttentionInterface, so headmap would see only part of the model; "
            f"use one of the tested model types: {supported}"
        )


class Session:
    """An active installation of the headmap engine on one model.

    ``commit`` says when probes close an input: ``"forward"`` after every top-level forward call
    (one batch = one set of inputs), ``"manual"`` when the caller calls :meth:`commit` (generation,
    where many forward calls make one input).
    """

    def __init__(
        self,
        model: nn.Module,
        probes: Sequence = (),
        edits: Sequence = (),
        commit: Literal["forward", "manual"] = "forward",
        check_finite: bool = False,
    ) -> None:
        if commit not in ("forward", "manual"):
            raise ValueError("commit must be 'forward' or 'manual'")
        self.model = model
        self.probes = tuple(probes)
        self.edits = tuple(edits)
        self.commit_mode = commit
        #: raise NumericalError (naming layer and head) when an attention output is NaN or inf
        self.check_finite = check_finite
        #: (heads, kv_heads) of every layer seen, keyed by :func:`~headmap.engine.towers.layer_key`: the
        #: layer number for the ``text`` tower (a text model: ``{layer: (heads, kv_heads)}`` as ever),
        #: ``(tower, layer)`` for the others (a VLM's vision layers are numbered from 0 too)
        self.layers: dict[int | tuple[str, int], tuple[int, int]] = {}
        self._module_ids: set[int] = set()
        self._previous: str | None = None
        self._hook = None

    # -- what the attention function asks -------------------------------------------------
    def owns(self, module: nn.Module) -> bool:
        return id(module) in self._module_ids

    def record_layer(self, layer: int, heads: int, kv_heads: int, tower: str = "text") -> None:
        self.layers[layer_key(tower, layer)] = (heads, kv_heads)

    def tower_layers(self, tower: str | None = None) -> dict[int, tuple[int, int]]:
        """(heads, kv_heads) by layer number of one tower (None: the model's language tower,
        :func:`~headmap.engine.towers.language_tower`)."""
        tower = tower or language_tower(self.model)
        out = {}
        for key, shape in self.layers.items():
            t, layer = split_layer_key(key)
            if t == tower:
                out[layer] = shape
        return dict(sorted(out.items()))

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Session:
        check_supported(self.model)
        register()
        for edit in self.edits:
            edit.bind(self.model)
        self._previous = self.model.config._attn_implementation
        if self._previous != IMPLEMENTATION:
            self.model.set_attn_implementation(IMPLEMENTATION)
        self._module_ids = {id(m) for m in self.model.modules()}
        if self.commit_mode == "forward":
            self._hook = self.model.register_forward_hook(lambda *_: self.commit())
        registry.push(self)
        return self

    def __exit__(self, *exc: object) -> None:
        registry.pop(self)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        still_used = any(s.model is self.model for s in registry.active())
        if self._previous is not None and self._previous != IMPLEMENTATION and not still_used:
            self.model.set_attn_implementation(self._previous)

    @torch.compiler.disable
    def commit(self) -> None:
        """Close the current inputs: every probe folds its pending sums into its totals.

        Runs eagerly under ``torch.compile`` (the forward hook that calls it is inside the compiled
        model): traced by dynamo, the probes' numpy sums came out wrong (docs/engine.md)."""
        for probe in self.probes:
            probe.commit()


def observe(
    model: nn.Module,
    probes: Iterable = (),
    edits: Iterable = (),
    commit: Literal["forward", "manual"] = "forward",
    check_finite: bool = False,
) -> Session:
    """Run ``model`` under the headmap engine with ``probes`` (and ``edits``) inside a ``with`` block.

    ``check_finite=True`` raises :class:`~headmap.errors.NumericalError` naming the layer and head
    as soon as an attention output holds NaN or inf (scans set it: no silent NaN in a table).
    """
    return Session(model, probes=tuple(probes), edits=tuple(edits), commit=commit, check_finite=check_finite)
