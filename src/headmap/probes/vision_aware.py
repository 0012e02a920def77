"""``vision_aware``: how much each head's output changes when the image is blanked (VHD).

After He, Zhu, Guo, et al. 2025, "Cracking the Code of Hallucination in LVLMs with Vision-aware Head
Divergence" (ACL 2025; VHD and VHR). Two forwards of the same input ids: one with the image, one with
the image *blanked* (every pixel tensor of the inputs set to 0, which after the processor's
normalisation is the mean image of its statistics). For a head h of layer l of the language model
(``text`` tower) and a query i, o_h(i) is the head's output (its attention-weighted sum of values,
before the output projection); then

    vision_aware[l, h] = mean over inputs of ( mean over text queries i of || o_h(i; image) - o_h(i; blank) ||_2 )

Text queries are real tokens that are not image tokens and see at least one image token. Blanking
(rather than removing the image tokens, as the paper does) keeps every position, so the two outputs
of one query are compared at the same position with the same rotary phases, and Qwen2-VL's
multimodal positions stay as they were; the score then measures what the image's *content* adds. The
paper scores the tokens it generates; here every text query of the prompt counts. See
docs/methods/vision_aware.md.

The probe drives its own pair of forwards: :meth:`VisionAwareProbe.measure` ``(model, inputs)`` with
the processor's inputs (``input_ids``, ``pixel_values``, ...), and inside ``headmap scan`` (an image
corpus such as ``--corpus shapes``) :meth:`VisionAwareProbe.run` makes those inputs from each batch
(the scan's padded ids and mask, the processor's image tensors, positions counted from each input's
first real token as for every other probe) and measures them under the scan's own session. Its rows
say ``tower = text``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..engine import observe, registry
from ..engine.block import Block, QKView
from ..engine.towers import tower_of
from ..errors import ProbeError
from ..models import logits_to_keep, position_ids
from .base import Needs
from .head import HeadTableProbe, tower_key
from .modality_mass import image_token_id

#: Input keys that carry images (blanked in the second forward).
PIXEL_KEYS = ("pixel_values", "pixel_values_videos", "pixel_values_images")


def blank_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``inputs`` with every pixel tensor set to 0; ProbeError when there is none."""
    out = dict(inputs)
    found = False
    for key in PIXEL_KEYS:
        value = out.get(key)
        if isinstance(value, torch.Tensor):
            out[key] = torch.zeros_like(value)
            found = True
    if not found:
        raise ProbeError(
            "vision_aware compares a forward with the image and one with it blanked, but the inputs hold no "
            f"image ({' or '.join(PIXEL_KEYS)}); give inputs prepared by the model's processor with an image"
        )
    return out


@dataclass
class VisionAwareProbe(HeadTableProbe):
    """Per head, the l2 distance between its outputs with the image and with the image blanked (VHD).

    Its table (state, ``head_rows``, ``values``) is :class:`~headmap.probes.head.HeadTableProbe`'s, with
    sums of the ``text`` tower only.
    """

    #: the image token id; None: read from the config of the model
    image_token_id: int | None = None

    name = "vision_aware"
    needs = Needs(corpus="images", default_corpus="shapes", qk=True, drives_model=True, default=False)
    #: reads the ``text`` tower only, on purpose (the vision tower's calls are left out in update_qk)
    tower_aware = True

    _views: list = field(default_factory=list, init=False, repr=False)
    _with_image: dict = field(default_factory=dict, init=False, repr=False)
    _kv: dict[int, int] = field(default_factory=dict, init=False, repr=False)

    def params(self) -> dict[str, Any]:
        return {"image_token_id": self.image_token_id, "blank": "zeros"}

    def applies_to(self, samples: Any) -> str | None:
        items = list(getattr(samples, "samples", samples))
        if items and "image" not in (items[0].info or {}):
            return "vision_aware needs an image corpus (inputs with images, such as --corpus shapes)"
        return None

    def run(self, model: Any, batch: Any, session: Any) -> None:
        """The scan's call (``needs.drives_model``): :meth:`measure` on the batch's inputs, under ``session``."""
        if batch is None or getattr(batch, "input_ids", None) is None or not getattr(batch, "inputs", None):
            raise ProbeError(
                "vision_aware runs two forwards per input (with the image and with it blanked) and needs a batch of "
                "image inputs prepared by the model's processor (--corpus shapes, or a JSONL corpus with images); "
                "outside a scan call VisionAwareProbe().measure(model, processor_inputs)"
            )
        inputs: dict[str, Any] = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        params = inspect.signature(model.forward).parameters
        takes_positions = "position_ids" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        # as the scan's own forward: positions from each input's first real token (left padding), unless the
        # model computes multimodal positions itself (Qwen2-VL: image_grid_thw)
        if batch.left_pad and takes_positions and "image_grid_thw" not in batch.inputs:
            inputs["position_ids"] = position_ids(batch.attention_mask)
        inputs.update(logits_to_keep(model))  # the probe reads attention outputs, not the logits
        inputs.update(batch.inputs)
        self.measure(model, inputs)

    # -- the two forwards --------------------------------------------------------------------
    def measure(self, model: nn.Module, inputs: Mapping[str, Any]) -> np.ndarray:
        """Run ``model`` on ``inputs`` and on the same inputs with the image blanked; fold in the batch.

        Returns the batch's per-input scores [B, layers, heads] (NaN where an input has no text query).
        """
        ids = inputs.get("input_ids")
        if not isinstance(ids, torch.Tensor):
            raise ProbeError("vision_aware needs input_ids among the inputs to find the image tokens")
        if self.image_token_id is None:
            self.image_token_id = image_token_id(model)
            if self.image_token_id is None:
                raise ProbeError(
                    "vision_aware needs an image token id: the model's config has no image_token_id "
                    "(is it a vision-language model?); pass vision_aware:image_token_id=N"
                )
        image = ids == self.image_token_id
        if not bool(image.any(dim=-1).all()):
            raise ProbeError(
                f"vision_aware: an input has no image token (id {self.image_token_id}); every input needs an image"
            )
        blank = blank_inputs(inputs)
        # inside a session that already holds this probe on this model (a scan), run under it: a second
        # session would hand the probe every attention call twice
        held = any(self in s.probes and s.model is model for s in registry.active())
        outs = []
        for feed in (inputs, blank):
            self._views = []
            with torch.no_grad():
                if held:
                    model(**feed)
                else:
                    with observe(model, probes=[self]):
                        model(**feed)
            outs.append({layer: (out, rows) for layer, out, rows in self._collect(image)})
            self._views = []
        scores = []
        for layer in sorted(outs[0]):
            a, rows = outs[0][layer]
            b, _ = outs[1][layer]
            dist = (a.to(torch.float64) - b.to(torch.float64)).norm(dim=-1)  # [B, T, H]
            w = rows.to(torch.float64)[:, :, None]
            n = rows.sum(dim=-1).to(torch.float64)[:, None]
            per_input = torch.where(n > 0, (dist * w).sum(dim=1) / n.clamp_min(1), torch.nan)  # [B, H]
            self._fold(tower_key("text", layer), self._kv.get(layer, 1), per_input.cpu().numpy())
            scores.append(per_input.cpu().numpy())
        return np.stack(scores, axis=1) if scores else np.zeros((ids.shape[0], 0, 0))

    def _collect(self, image: torch.Tensor):
        """(layer, output [B, T, H, Dv], counted rows [B, T]) of every text-tower self-attention call seen."""
        for view, layer in self._views:
            out = view.output
            if out is None:
                continue
            device = out.device
            img = image.to(device)
            t = out.shape[1]
            vis = view.mask.block(0, t, 0, view.key.shape[2])[:, 0]  # [B, T, Tk] bool
            img_k = img[:, : view.key.shape[2]]
            sees = (vis & img_k[:, None, :]).any(dim=-1)
            rows = view.query_valid & ~img[:, :t] & sees
            yield layer, out.detach().clone(), rows

    # -- engine hooks ------------------------------------------------------------------------
    def update_qk(self, view: QKView) -> None:
        owner = next((s.model for s in registry.active() if s.owns(view.module)), None)
        tower, cross = tower_of(view.module, owner)
        if tower != "text" or cross:
            return
        if view.query.shape[2] != view.key.shape[2]:
            raise ProbeError("vision_aware reads whole prompts, not decoding steps with a KV cache")
        self._views.append((view, view.layer))
        self._kv[view.layer] = view.num_kv_heads

    def update(self, block: Block) -> None:
        """Nothing per block: the outputs come from the attention calls (:meth:`update_qk`)."""
