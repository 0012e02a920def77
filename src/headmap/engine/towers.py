"""Which tower an attention module belongs to, and whether it is cross-attention.

The rule (docs/multimodal.md), from the module's class and its path in the model that owns it:

- **cross**: the module sets ``is_cross_attention = True``, or its class name holds ``CrossAttention``,
  or its attribute name is one of ``encoder_attn``, ``EncDecAttention``, ``cross_attn``,
  ``crossattention`` (BART, Whisper, T5, Mllama, BERT-style decoders). Its keys come from another
  sequence (an encoder's output or an image), so a query and a key share no position.
- **vision**: a path component names a vision tower (``vision_tower``, ``vision_model``, ``visual``,
  ``vision_encoder``, ``image_encoder``, ``vision``), or the whole model reads images
  (``main_input_name == "pixel_values"``: ViT, CLIP, SigLIP vision models).
- **encoder** / **decoder**: in an encoder-decoder model (``config.is_encoder_decoder``), the first path
  component that is ``encoder`` or ``decoder``.
- **text**: everything else (the language model of a VLM, a decoder-only or encoder-only text model).

Modules no active session owns (a bare call) are ``text``, self-attention.

**The language tower** of a model (:func:`language_tower`) is the tower an edit's layer numbers refer
to unless the edit names another (``tower=vision``): ``decoder`` in an encoder-decoder, ``vision`` in a
vision encoder alone, else ``text``. A session records each layer's head counts under
:func:`layer_key`: the layer number itself for ``text`` (so text models read as ever), ``(tower, layer)``
for every other tower, whose layer numbers restart at 0 and coincide with the text layers'.
"""

from __future__ import annotations

import weakref

from torch import nn

TOWERS = ("text", "vision", "encoder", "decoder", "cross")
_CROSS_NAMES = {"encoder_attn", "encdecattention", "cross_attn", "crossattention"}
_VISION_NAMES = {"vision_tower", "vision_model", "visual", "vision_encoder", "image_encoder", "vision"}

_BY_MODEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def layer_key(tower: str, layer: int) -> int | tuple[str, int]:
    """The key of (tower, layer) in a session's ``layers``: the layer for ``text``, else ``(tower, layer)``."""
    return int(layer) if tower == "text" else (tower, int(layer))


def split_layer_key(key: int | tuple[str, int]) -> tuple[str, int]:
    """(tower, layer) of a key made by :func:`layer_key`."""
    return ("text", int(key)) if not isinstance(key, tuple) else (str(key[0]), int(key[1]))


def language_tower(model: nn.Module | None) -> str:
    """The tower an edit's layers refer to by default: ``decoder`` (encoder-decoder), ``vision`` (a vision
    encoder alone, ``main_input_name == "pixel_values"``), else ``text`` (a VLM's language model, a text model)."""
    if model is None:
        return "text"
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "decoder"
    if getattr(model, "main_input_name", None) == "pixel_values":
        return "vision"
    return "text"


def _describe(model: nn.Module, path: str, module: nn.Module) -> tuple[str, bool]:
    parts = path.split(".") if path else []
    cross = (
        getattr(module, "is_cross_attention", False) is True
        or "CrossAttention" in type(module).__name__
        or (bool(parts) and parts[-1].lower() in _CROSS_NAMES)
    )
    if cross:
        return "cross", True
    if any(p.lower() in _VISION_NAMES for p in parts) or getattr(model, "main_input_name", None) == "pixel_values":
        return "vision", False
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        for p in parts:
            if p in ("encoder", "decoder"):
                return p, False
    return "text", False


def _is_attention(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__.endswith("Attention") and cls.__module__.startswith("transformers.models.")


def model_towers(model: nn.Module) -> set[str]:
    """The towers of ``model``'s attention modules (transformers classes named ``...Attention`` that hold no
    other such module), by the rule above; empty when it has none that headmap can name."""
    found = set()
    for sub in model.modules():
        if _is_attention(sub) and not any(_is_attention(c) for c in sub.modules() if c is not sub):
            found.add(tower_of(sub, model)[0])
    return found


def tower_of(module: nn.Module, model: nn.Module | None) -> tuple[str, bool]:
    """(tower, is_cross) of attention ``module`` inside ``model`` (None: ``("text", False)``)."""
    if model is None:
        return "text", False
    table = _BY_MODEL.get(model)
    if table is None:
        table = {id(m): _describe(model, path, m) for path, m in model.named_modules()}
        _BY_MODEL[model] = table
    return table.get(id(module), ("text", False))
