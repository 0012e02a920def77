"""``pai``: pay more attention to the image (after Liu et al. 2024, "Paying More Attention to Image:
A Training-Free Method for Alleviating Hallucination in LVLMs").

In the chosen layers and heads of the language model (blocks of the ``text`` tower), for every text
query i (a token that is not an image token) and every image key j:

    z'[i, j] = z[i, j] + log(alpha)          (before the mask and the softmax)

so that A'[i, j] = alpha A[i, j] / (1 + (alpha - 1) m_i) for image keys and A[i, k] / (1 + (alpha - 1) m_i)
for the others, with m_i = sum over image keys of A[i, j]: the row's image mass becomes

    m'_i = alpha m_i / (1 + (alpha - 1) m_i).

alpha = 1 is the identity (the logits are returned as they are); alpha > 1 moves mass onto the image,
alpha < 1 away from it. Image keys are where the input ids hold the model's image token id (read from
the config when the edit is bound, or given as ``image_token_id``); the ids are those of the model's
last forward call that started a sequence (a call without a filled cache), recorded by a forward
pre-hook that the edit puts on the model while a session holds it. The paper adds alpha |z| (a multiple
of the logit's magnitude) to the image logits, here the constant log(alpha) is added: the effect on the
probabilities is then the exact reweighting above. See docs/methods/pai.md.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..engine import Block
from ..errors import EditError
from .base import Edit, check_number, prefill_ids, session_ended


def _image_token_id(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("image_token_id", "image_token_index"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class Pai(Edit):
    """Add log(``alpha``) to the logits of image keys for text queries, in ``layers`` (None: every layer)."""

    name = "pai"
    towers = ("text",)  # image keys are positions of the language model

    def __init__(
        self,
        heads: Any = None,
        alpha: float = 1.0,
        layers: Any = None,
        image_token_id: int | None = None,
        atlas: Any = None,
    ) -> None:
        self.alpha = check_number(self.name, "alpha", alpha, strict=True)
        if layers is not None:
            if isinstance(layers, int) and not isinstance(layers, bool):
                layers = [layers]
            if not isinstance(layers, (list, tuple)) or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers
            ):
                raise EditError(f"{self.name}: layers must be a list of layer numbers, got {layers!r}")
            layers = sorted(set(layers))
        self.layers = layers
        if image_token_id is not None and (isinstance(image_token_id, bool) or not isinstance(image_token_id, int)):
            raise EditError(f"{self.name}: image_token_id must be a token id, got {image_token_id!r}")
        self.image_token_id = image_token_id
        self._ids: torch.Tensor | None = None
        self._hook = None
        super().__init__(heads=heads, atlas=atlas)

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "layers": self.layers}

    def bind(self, model: nn.Module) -> None:
        super().bind(model)
        if self.image_token_id is None:
            self.image_token_id = _image_token_id(model)
            if self.image_token_id is None:
                raise EditError(
                    f"{self.name}: the model has no image token id in its config (is it a vision-language "
                    "model?); pai edits attention to image tokens"
                )
        if self._hook is None:
            self._hook = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def set_inputs(self, input_ids: torch.Tensor) -> None:
        """The [B, T] ids of the sequence the next forward calls extend (what the pre-hook records)."""
        self._ids = input_ids

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if session_ended(self):  # the session that bound us has ended
            self._hook.remove()
            self._hook = None
            return
        ids = prefill_ids(args, kwargs)
        if ids is not None:
            self._ids = ids

    def applies_to_layer(self, layer: int) -> bool:
        return super().applies_to_layer(layer) and (self.layers is None or layer in self.layers)

    def edit_logits(self, block: Block, logits: torch.Tensor) -> torch.Tensor:
        if self.alpha == 1.0:  # the engine gives it the blocks of the text tower only (edits/base.py)
            return logits
        if self._ids is None:
            raise EditError(f"{self.name}: no input ids seen yet; run the model with input_ids")
        image = self._ids.to(logits.device) == self.image_token_id  # [B, T]

        def at(pos: torch.Tensor) -> torch.Tensor:
            inside = pos < image.shape[1]
            return image[:, pos.clamp(max=image.shape[1] - 1)] & inside[None, :]

        add = at(block.q_pos)[:, :, None].logical_not() & at(block.k_pos)[:, None, :]  # [B, bq, bk]
        shift = add[:, None].to(logits.dtype) * math.log(self.alpha)
        return self.on_heads(block, logits, lambda x, heads: x + shift)
