"""headmap: see what attention does inside transformer models, exactly, at long context."""

from __future__ import annotations

from . import explain  # the package is callable: headmap.explain(model, tokenizer, texts, ...)
from .atlas import Atlas
from .engine import CONFIG as engine_config
from .engine import Block, Session, observe, register
from .errors import HeadmapError
from .models import load_model
from .presses import compress
from .probes import PROBES, Probe, SinkProbe, make_probes
from .scan import scan
from .steer import steer

__version__ = "0.1.0"

register()

__all__ = [
    "PROBES",
    "Atlas",
    "Block",
    "HeadmapError",
    "Probe",
    "Session",
    "SinkProbe",
    "__version__",
    "compress",
    "engine_config",
    "explain",
    "load_model",
    "make_probes",
    "observe",
    "register",
    "scan",
    "steer",
]
