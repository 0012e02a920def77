"""``var``: Visual Attention Redistribution (Kang, Kim, Kim, Hwang 2025, "See What You Are Told: Visual
Attention Sink in Large Multimodal Models", ICLR 2025).

In the chosen layers and heads of the language model (``text`` tower), for every text query i (a real
token that is not an image token), with I the image tokens, S the visual sink tokens of the layer (as
the ``visual_sinks`` probe finds them: image tokens whose largest |x[d]| / rms(x) over the first token's
massive dimensions is at least tau, x the hidden state entering the layer), and

    s_i = sum_{j in S} A[i, j],      o_i = sum_{j in I \\ S} A[i, j],

the row is *image-centric* when o_i / (s_i + o_i) >= rho (the paper's visual non-sink ratio) and
s_i > 0, o_i > 0. Then a fraction p of the sinks' attention goes to the other image tokens, in
proportion to the attention they already have:

    A'[i, j] = (1 - p) A[i, j]                      (j in S)
    A'[i, k] = A[i, k] (1 + p s_i / o_i)             (k in I \\ S)

and every other entry, row and head is unchanged; the row keeps its mass. p = 0 is the identity.
Defaults: p = 0.6, rho = 0.5, tau = 20 (the paper's settings for LLaVA-1.5 as we read it; check its
appendix for other models), lam = 5 (headmap's massive-value rule, see ``massive_values``).

The hidden states are read by forward pre-hooks on the language model's layers during the forward
call that starts a sequence (one without a filled cache); generated tokens are never sinks. The
input ids are recorded by a forward pre-hook on the model (or given with :meth:`Var.set_inputs` together
with :meth:`Var.set_hidden`). See docs/methods/var.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..engine import Block
from ..errors import EditError
from ..probes.modality_mass import at_columns
from ..probes.visual_sinks import text_layers, visual_sink_mask
from .base import Edit, check_number, prefill_ids, session_ended
from .span import config_image_token_id


def parse_layers(edit: str, layers: Any) -> list[int] | None:
    """``layers=`` as a sorted list of layer numbers (None: every layer); EditError otherwise."""
    if layers is None:
        return None
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, (list, tuple)) or not all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers
    ):
        raise EditError(f"{edit}: layers must be a list of layer numbers, got {layers!r}")
    return sorted(set(layers))


class Var(Edit):
    """VAR: in image-centric rows, move a fraction ``p`` of the visual sinks' attention to the other image tokens."""

    name = "var"
    towers = ("text",)  # image keys and visual sinks are positions of the language model

    def __init__(
        self,
        heads: Any = None,
        p: float = 0.6,
        rho: float = 0.5,
        tau: float = 20.0,
        lam: float = 5.0,
        layers: Any = None,
        image_token_id: int | None = None,
        atlas: Any = None,
    ) -> None:
        self.p = check_number(self.name, "p", p)
        if self.p > 1:
            raise EditError(f"{self.name}: p is a fraction of the sinks' attention, in [0, 1]; got {self.p:g}")
        self.rho = check_number(self.name, "rho", rho)
        if self.rho > 1:
            raise EditError(f"{self.name}: rho is a share of the image attention, in [0, 1]; got {self.rho:g}")
        self.tau = check_number(self.name, "tau", tau, strict=True)
        self.lam = check_number(self.name, "lam", lam, low=1.0, strict=True)
        self.layers = parse_layers(self.name, layers)
        if image_token_id is not None and (isinstance(image_token_id, bool) or not isinstance(image_token_id, int)):
            raise EditError(f"{self.name}: image_token_id must be a token id, got {image_token_id!r}")
        self.image_token_id = image_token_id
        self._ids: torch.Tensor | None = None
        self._first: torch.Tensor | None = None
        self._fresh = False
        self._sinks: dict[int, torch.Tensor] = {}
        self._hooks: list = []
        super().__init__(heads=heads, atlas=atlas)

    def params(self) -> dict[str, Any]:
        return {"p": self.p, "rho": self.rho, "tau": self.tau, "lam": self.lam, "layers": self.layers}

    # -- binding and the hooks that read the inputs ----------------------------------------------
    def bind(self, model: nn.Module) -> None:
        super().bind(model)
        if self.image_token_id is None:
            self.image_token_id = config_image_token_id(model)
            if self.image_token_id is None:
                raise EditError(
                    f"{self.name}: the model has no image token id in its config (is it a vision-language model?); "
                    "var redistributes attention among image tokens"
                )
        if self._hooks:
            return
        layers = text_layers(model)
        if layers is None:
            raise EditError(f"{self.name}: cannot find the language model's layers of {type(model).__name__}")
        self._hooks.append(model.register_forward_pre_hook(self._record, with_kwargs=True))
        for index, layer in enumerate(layers):
            if self.layers is None or index in self.layers:
                self._hooks.append(layer.register_forward_pre_hook(self._layer_hook(index), with_kwargs=True))

    def _unhook(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if session_ended(self):  # the session that bound us has ended
            self._unhook()
            return
        ids = prefill_ids(args, kwargs)
        self._fresh = ids is not None
        if self._fresh:
            mask = kwargs.get("attention_mask")
            self.set_inputs(ids, mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None)

    def _layer_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if self._fresh and isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
                self.set_hidden(index, hidden)

        return hook

    def set_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """The [B, T] ids (and 2D attention mask) of the sequence the next forward calls extend."""
        self._ids = input_ids
        if attention_mask is None:
            self._first = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        else:
            self._first = attention_mask.to(torch.long).argmax(dim=-1)  # the first real column
        self._sinks = {}

    def set_hidden(self, layer: int, hidden: torch.Tensor) -> None:
        """Find layer ``layer``'s visual sinks from the hidden state entering it ([B, T, D])."""
        if self._ids is None or hidden.shape[1] != self._ids.shape[1]:
            return
        image = self._ids.to(hidden.device) == self.image_token_id
        self._sinks[layer], _ = visual_sink_mask(hidden.detach(), image, self._first, self.lam, self.tau)

    # -- the edit --------------------------------------------------------------------------------
    def applies_to_layer(self, layer: int) -> bool:
        return super().applies_to_layer(layer) and (self.layers is None or layer in self.layers)

    def edit_probs(self, block: Block, probs: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0:  # the engine gives it the blocks of the text tower only (edits/base.py)
            return probs
        sinks = self._sinks.get(block.layer)
        if self._ids is None or sinks is None:
            raise EditError(f"{self.name}: no hidden state of layer {block.layer} seen; run the model with input_ids")
        image = self._ids.to(probs.device) == self.image_token_id
        img_k = at_columns(block.k_pos, image)  # [B, bk]
        sink_k = at_columns(block.k_pos, sinks.to(probs.device))
        text_q = ~at_columns(block.q_pos, image)  # [B, bq]
        sink = sink_k[:, None, None, :]
        other = (img_k & ~sink_k)[:, None, None, :]
        p, rho = self.p, self.rho

        def redistribute(x: torch.Tensor, heads) -> torch.Tensor:
            on_sinks = (x * sink).sum(dim=-1, keepdim=True)
            on_other = (x * other).sum(dim=-1, keepdim=True)
            ok = text_q[:, None, :, None] & (on_sinks > 0) & (on_other > 0) & (on_other >= rho * (on_sinks + on_other))
            gain = 1.0 + p * on_sinks / torch.where(ok, on_other, torch.ones_like(on_other))
            new = torch.where(sink, x * (1.0 - p), torch.where(other, x * gain, x))
            return torch.where(ok, new, x)

        return self.on_heads(block, probs, redistribute)
