"""``modality_mass``: how much of each head's attention goes to image tokens.

For each head of the language model (blocks of the ``text`` tower; vision towers and cross-attention
are left out), with I the image token positions of the input and K(i) the keys query i can see:

    modality_mass[l, h]  = mean over inputs of ( mean over text queries i that see an image token
                                                 of  sum_{j in I} A_h[i, j] )
    image_to_image[l, h] = mean over inputs of ( mean over image queries i of sum_{j in I} A_h[i, j] )

Text queries are real tokens (not padding) that are not image tokens; a text query counts when K(i)
holds at least one image token (in a causal model, text after the image; in a prefix-LM such as
PaliGemma the whole prompt). This is the image attention ratio of the hallucination papers (PAI,
Liu et al. 2024, "Paying More Attention to Image"). Image positions are where the input ids hold the
model's image token id (``config.image_token_id`` or ``image_token_index``), read from the ids the
scan hands to :meth:`begin`. See docs/methods/modality_mass.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..corpus import Batch
from ..engine import registry
from ..engine.block import Block
from ..errors import ProbeError
from .base import Needs
from .head import HeadMeanProbe


def image_token_id(model_or_config: Any) -> int | None:
    """The image placeholder token id of a VLM's config (``image_token_id`` or ``image_token_index``), or None."""
    config = getattr(model_or_config, "config", model_or_config)
    for key in ("image_token_id", "image_token_index"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def at_columns(pos: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """[B, len(pos)] bool: whether the input columns ``pos`` (absolute positions: block.q_pos, block.k_pos)
    hold image tokens; ``image`` [B, T] flags the columns of the input ids (False past them: generated)."""
    cols = pos.to(image.device)
    inside = cols < image.shape[1]
    return image[:, cols.clamp(max=image.shape[1] - 1)] & inside[None, :]


def _accumulate(probe: HeadMeanProbe, block: Block, values: torch.Tensor, counted: torch.Tensor) -> None:
    """What :meth:`HeadMeanProbe.update` does with ``row_values``: per input, sums over the counted rows."""
    weights = counted.to(torch.float64)
    num = (values.to(torch.float64) * weights[:, None, :]).sum(dim=-1)  # [B, H]
    den = weights.sum(dim=-1)  # [B]
    slot = probe._pending.get(block.layer)
    if slot is None or slot[0].shape != num.shape:
        probe._pending[block.layer] = [num, den, block.num_kv_heads]
    else:
        slot[0] += num
        slot[1] += den


@dataclass
class _ImageToImage(HeadMeanProbe):
    name = "image_to_image"


@dataclass
class ModalityMassProbe(HeadMeanProbe):
    """Share of text queries' attention on image tokens (``modality_mass``) and image-to-image share."""

    name = "modality_mass"
    needs = Needs(corpus="images", default_corpus="shapes", default=False)

    #: the image token id; None: read from the config of the model the engine runs
    image_token_id: int | None = None
    _ids: torch.Tensor | None = field(default=None, init=False, repr=False)
    _inner: _ImageToImage = field(default_factory=_ImageToImage, init=False, repr=False)

    def begin(self, batch: Batch) -> None:
        if batch.input_ids is None:
            raise ProbeError("modality_mass needs the batch's input ids to find the image tokens")
        self._ids = batch.input_ids

    def set_inputs(self, input_ids: torch.Tensor) -> None:
        """The [B, T] input ids of the next forward call (what :meth:`begin` takes from a scan's batch)."""
        self._ids = input_ids

    def _image_mask(self, block: Block) -> torch.Tensor:
        ids = self._ids
        if ids is None:
            raise ProbeError("modality_mass needs the input ids: call begin(batch) or set_inputs(input_ids) first")
        if self.image_token_id is None:
            owner = next((s.model for s in registry.active() if s.owns(block.module)), None)
            self.image_token_id = image_token_id(owner) if owner is not None else None
            if self.image_token_id is None:
                raise ProbeError(
                    "modality_mass needs an image token id: the model's config has no image_token_id "
                    "(is it a vision-language model?); pass modality_mass:image_token_id=N"
                )
        return ids.to(block.q_pos.device) == self.image_token_id

    def _rows(self, block: Block) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image mass [B, H, bq], counted text rows [B, bq], counted image rows [B, bq])."""
        image = self._image_mask(block)
        img_k = at_columns(block.k_pos, image)  # [B, bk]
        img_q = at_columns(block.q_pos, image)  # [B, bq]
        mass = (block.probs * img_k[:, None, None, :].to(block.probs.dtype)).sum(dim=-1)  # [B, H, bq]
        sees = (block.visible()[:, 0] & img_k[:, None, :]).any(dim=-1)  # [B, bq]
        return mass, block.query_valid & ~img_q & sees, img_q & block.query_valid

    def update(self, block: Block) -> None:
        if block.tower != "text" or block.is_cross:
            return
        mass, text_rows, image_rows = self._rows(block)
        _accumulate(self, block, mass, text_rows)
        _accumulate(self._inner, block, mass, image_rows)

    def commit(self) -> None:
        super().commit()
        self._inner.commit()

    def state_dict(self) -> dict[str, np.ndarray]:
        state = super().state_dict()
        state.update({f"image_to_image/{k}": v for k, v in self._inner.state_dict().items()})
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        inner = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith("image_to_image/")}
        super().load_state_dict({k: v for k, v in state.items() if "/" not in k})
        self._inner.load_state_dict(inner)

    def image_to_image(self) -> np.ndarray:
        """[layers, heads] mean image-to-image share."""
        return self._inner.values()

    def head_rows(self) -> list[dict[str, Any]]:
        rows = super().head_rows()
        for row in self._inner.head_rows():
            rows.append({**row, "probe": self.name, "metric": "image_to_image"})
        return rows

    def params(self) -> dict[str, Any]:
        return {"image_token_id": self.image_token_id}
