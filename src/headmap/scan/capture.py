"""What a scan's forward passes record beyond attention, for the probes that declare it in their needs.

``needs.hidden_states``: the forward runs with ``output_hidden_states=True``. ``needs.hidden_norms``:
forward pre-hooks on the model's layers record the l2 norm of every token's residual stream
(:class:`HiddenNorms`), without keeping the states; when the layers cannot be found, the forward
keeps the hidden states instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..models import layer_list
from ..probes import Probe


class HiddenNorms:
    """Records the l2 norm of every token's residual stream entering each layer, with forward pre-hooks.

    What ``output_hidden_states=True`` would give for probes that need the norms only, without
    keeping L + 1 [B, W, d] tensors alive: one [B, W] float64 per layer. Norms are taken in float64
    from the tensor the layer receives, so they equal the norms of ``hidden_states[l]``.
    """

    def __init__(self, layers: torch.nn.ModuleList) -> None:
        self.layers = layers
        self.norms: list[torch.Tensor | None] = [None] * len(layers)
        self._hooks: list[Any] = []

    def __enter__(self) -> HiddenNorms:
        for i, layer in enumerate(self.layers):
            self._hooks.append(layer.register_forward_pre_hook(self._hook(i), with_kwargs=True))
        return self

    def _hook(self, index: int):
        def record(module, args, kwargs):
            states = args[0] if args else kwargs.get("hidden_states")
            if isinstance(states, torch.Tensor) and states.ndim == 3:
                self.norms[index] = torch.linalg.vector_norm(states.to(torch.float64), dim=-1)

        return record

    def take(self) -> tuple[torch.Tensor, ...] | None:
        norms, self.norms = self.norms, [None] * len(self.layers)
        if any(n is None for n in norms):
            return None
        return (*norms, norms[-1])  # L + 1 entries, as hidden_states has (the last is not read)

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


class Outputs:
    """The model's outputs plus ``hidden_norms`` for probes that asked for them."""

    def __init__(self, outputs: Any, hidden_norms: Any) -> None:
        self._outputs = outputs
        self.hidden_norms = hidden_norms

    def __getattr__(self, name: str) -> Any:
        return getattr(self._outputs, name)


class Capture:
    """How the forward passes of a scan record what its probes need (decided once for all groups)."""

    def __init__(self, model: torch.nn.Module, probes: Sequence[Probe]) -> None:
        want_norms = any(p.needs.hidden_norms for p in probes)
        layers = layer_list(model) if want_norms else None
        self.norms = HiddenNorms(layers) if layers is not None else None
        #: the forward keeps hidden states (asked for, or the norms' fallback)
        self.hidden_states = any(p.needs.hidden_states for p in probes) or (want_norms and self.norms is None)

    def forward_kwargs(self) -> dict[str, Any]:
        return {"output_hidden_states": True} if self.hidden_states else {}

    def run(self, probes: Sequence[Probe], forward: Callable[[], Any]) -> Any:
        """``forward()``, with the hooks on when one of ``probes`` needs the hidden norms."""
        if self.norms is None or not any(p.needs.hidden_norms for p in probes):
            return forward()
        with self.norms:
            outputs = forward()
        return Outputs(outputs, self.norms.take())
