"""The exact block-wise attention engine and the sessions that install it."""

from .attention import CONFIG, EngineConfig, headmap_attention_forward, rows_per_block
from .block import Block
from .mask import LazyMask, headmap_mask
from .registry import active as active_sessions
from .session import IMPLEMENTATION, TESTED_MODEL_TYPES, Session, check_supported, observe, register
from .towers import TOWERS, language_tower, model_towers

__all__ = [
    "CONFIG",
    "IMPLEMENTATION",
    "TESTED_MODEL_TYPES",
    "TOWERS",
    "Block",
    "EngineConfig",
    "LazyMask",
    "Session",
    "active_sessions",
    "check_supported",
    "headmap_attention_forward",
    "headmap_mask",
    "language_tower",
    "model_towers",
    "observe",
    "register",
    "rows_per_block",
]
