"""Which sessions are active, and what the attention function needs to know about a module.

The attention function is global (transformers looks it up by name); sessions register here
which modules they own. A module may be owned by several sessions at once (observing while
steering): their probes and edits all apply, in the order the sessions were entered.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from .towers import language_tower, tower_of


class Session(Protocol):
    """What the registry reads of an active session (engine/session.py's Session is one): the
    registry depends on this interface, not on the session's module, so the two import no circle."""

    model: nn.Module
    probes: Any
    edits: Any

    def owns(self, module: nn.Module) -> bool: ...

    def record_layer(self, layer: int, heads: int, kv_heads: int, tower: str) -> None: ...


_LOCK = threading.Lock()
_ACTIVE: list[Session] = []
# Layer numbers for attention modules without an integer ``layer_idx``: order of first call.
_CALL_ORDER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def push(session: Session) -> None:
    with _LOCK:
        _ACTIVE.append(session)


def pop(session: Session) -> None:
    with _LOCK:
        if session in _ACTIVE:
            _ACTIVE.remove(session)


def active() -> tuple[Session, ...]:
    return tuple(_ACTIVE)


def layer_index(module: nn.Module, owner: nn.Module) -> int:
    """``module.layer_idx`` when the model sets it, else the order of first call within ``owner``."""
    idx = getattr(module, "layer_idx", None)
    if isinstance(idx, int):
        return idx
    order = _CALL_ORDER.setdefault(owner, {})
    return order.setdefault(id(module), len(order))


@dataclass
class CallContext:
    """What one attention call needs from the active sessions."""

    layer: int
    probes: tuple
    edits: tuple
    check_finite: bool = False
    model: nn.Module | None = None  # the model of the first session that owns the module
    tower: str = "text"  # the module's tower (engine/towers.py)

    def edits_for(self, layer: int) -> tuple:
        """The edits that act on this call: layer ``layer`` of the module's tower (an edit acts on one
        tower, by default the model's language tower: see :func:`edit_tower`)."""
        return tuple(e for e in self.edits if e.applies_to_layer(layer) and edit_tower(e, self.model) == self.tower)


def edit_tower(edit: object, model: nn.Module | None) -> str:
    """The tower ``edit`` acts on: its ``tower`` when it names one, else the model's language tower
    (``text``; ``decoder`` in an encoder-decoder; ``vision`` in a vision encoder alone)."""
    return getattr(edit, "tower", None) or language_tower(model)


def context_for(module: nn.Module, heads: int, kv_heads: int) -> CallContext | None:
    """The probes and edits of every active session that owns ``module``; None if none does."""
    owners = [s for s in _ACTIVE if s.owns(module)]
    if not owners:
        return None
    layer = layer_index(module, owners[0].model)
    tower = tower_of(module, owners[0].model)[0]
    for s in owners:
        s.record_layer(layer, heads, kv_heads, tower)
    probes = tuple(p for s in owners for p in s.probes)
    edits = tuple(e for s in owners for e in s.edits)
    check = any(getattr(s, "check_finite", False) for s in owners)
    return CallContext(layer=layer, probes=probes, edits=edits, check_finite=check, model=owners[0].model, tower=tower)
