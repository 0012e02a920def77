"""KV-cache presses: one small class per method that scores cached keys and frees the ones it drops.

    from headmap.presses import compress, make_press
    with compress(model, make_press("snapkv", ratio=0.5)) as run:
        model.generate(**inputs, max_new_tokens=32)
    run.cache_bytes()

Layer: beside ``probes`` and ``edits`` (may import ``engine``, ``corpus``, ``models``, ``atlas``);
never imported by the engine. See docs/compress.md.
"""

from __future__ import annotations

from typing import Any

from ..specs import parse_options, split_top
from .adakv import AdaKVPress
from .base import Compression, LayerView, Press, PressError, ScorerPress, compress, settable
from .cache import PressedLayer, RaggedLayer, cache_bytes
from .compose import ComposePress
from .h2o import H2OPress
from .head_aware import HeadAwarePress
from .knorm import KnormPress
from .pyramidkv import PyramidKVPress
from .snapkv import SnapKVPress
from .streaming import StreamingPress

#: Every press by its name on the command line.
PRESSES: dict[str, type[Press]] = {
    cls.name: cls
    for cls in (
        StreamingPress,
        H2OPress,
        SnapKVPress,
        PyramidKVPress,
        KnormPress,
        AdaKVPress,
        HeadAwarePress,
        ComposePress,
    )
}


def make_press(name: str, **params: Any) -> Press:
    """A press by name with its parameters; PressError for an unknown name or parameter."""
    cls = PRESSES.get(name)
    if cls is None:
        raise PressError(f"unknown press {name!r}; presses: {', '.join(PRESSES)}")
    allowed = settable(cls)
    for key in params:
        if key not in allowed:
            raise PressError(f"press {name} has no parameter {key!r}; its parameters: {', '.join(allowed)}")
    return cls(**params)


def parse_press(spec: str, **defaults: Any) -> Press:
    """``NAME[:key=value...]`` (e.g. ``snapkv:window=32:kernel=7``); ``defaults`` fill what the spec leaves out."""
    parts = [p.strip() for p in split_top(spec.strip(), ":", PressError)]
    name = parts[0]
    if name not in PRESSES:
        raise PressError(f"unknown press {name!r} in {spec!r}; presses: {', '.join(PRESSES)}")
    example = f"{name}:ratio=0.5"
    params = parse_options("press", name, parts[1:], settable(PRESSES[name]), PressError, example)
    for key, value in defaults.items():
        if key in settable(PRESSES[name]):
            params.setdefault(key, value)
    return make_press(name, **params)


__all__ = [
    "PRESSES",
    "AdaKVPress",
    "ComposePress",
    "Compression",
    "H2OPress",
    "HeadAwarePress",
    "KnormPress",
    "LayerView",
    "Press",
    "PressError",
    "PressedLayer",
    "PyramidKVPress",
    "RaggedLayer",
    "ScorerPress",
    "SnapKVPress",
    "StreamingPress",
    "cache_bytes",
    "compress",
    "make_press",
    "parse_press",
]
