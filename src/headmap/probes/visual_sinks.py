"""``visual_sinks``: image tokens with massive activation in the sink dimensions, and the attention they draw.

After Kang, Kim, Kim, Hwang 2025, "See What You Are Told: Visual Attention Sink in Large Multimodal
Models" (ICLR 2025; VAR). For one input and a layer l of the language model (``text`` tower), with
x_j the hidden state of token j entering layer l (``outputs.hidden_states[l]``) and f the input's
first real token:

    D_l     = { d : |x_f[d]| > lam * median_d' |x_f[d']| }          (the first token's massive dimensions)
    phi(x)  = max_{d in D_l} |x[d]| / rms(x),   rms(x) = sqrt(mean_d x[d]^2)
    S_l     = { j image token, j != f : phi(x_j) >= tau }             (the visual sink tokens)

and per query head h, the attention the sinks draw from text queries (real tokens that are not image
tokens and see at least one image token, as in ``modality_mass``):

    visual_sink_mass[l, h] = mean over inputs of ( mean over text queries i of sum_{j in S_l} A_h[i, j] )

``lam`` is headmap's massive-value rule (``massive_values``: above lam times the median, lam = 5);
``tau`` = 20 is the paper's threshold on the sink dimension value (phi is at most sqrt(hidden size),
so tiny models need a smaller tau). The paper fixes the sink dimensions once per model from the BOS
token (e.g. {1415, 2533} in LLaMA-2); here they are found per input and layer from that input's first
token. :meth:`VisualSinksProbe.sinks` gives every input's sink positions per layer,
:meth:`VisualSinksProbe.sink_counts` the mean number of sinks per layer, and the token table holds
phi of every image token (metric ``sink_dim_value``). See docs/methods/visual_sinks.md.

The attention is summed per key column during the forward (the sinks are known only from the hidden
states, which the model returns after it), and folded in at :meth:`end`; a forward needs
``output_hidden_states=True``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..corpus import Batch
from ..engine import registry
from ..engine.block import Block
from ..errors import ProbeError
from .base import Needs, Probe
from .head import HeadStats
from .modality_mass import at_columns, image_token_id
from .token import add_columns

_VISION_NAMES = {"vision_tower", "vision_model", "visual", "vision_encoder", "image_encoder", "vision"}


def text_layers(model: nn.Module) -> nn.ModuleList | None:
    """The language model's stack of layers in a VLM (or a text model): the first ModuleList as long as the
    text layer count whose path names no vision tower and no encoder; None when there is none."""
    from .. import models

    try:
        count = models.model_shape(model).layers
    except Exception:  # noqa: BLE001 - any model without a readable shape has no layer list here
        return None
    for path, module in model.named_modules():
        parts = {p.lower() for p in path.split(".")}
        if isinstance(module, nn.ModuleList) and len(module) == count and not (parts & _VISION_NAMES):
            if "encoder" in parts and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
                continue
            return module
    return None


def sink_dims(first: torch.Tensor, lam: float) -> torch.Tensor:
    """[B, D] bool: the massive dimensions of each input's first token ``first`` [B, D] (> lam x its median |x|)."""
    mag = first.abs()
    median = torch.quantile(mag, 0.5, dim=-1, keepdim=True)  # as numpy.median (massive_values)
    return mag > lam * median


def sink_dim_value(hidden: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    """[B, T] phi: the largest |x[d]| / rms(x) over the dimensions ``dims`` [B, D] (0 where there is none)."""
    x = hidden.to(torch.float64)
    rms = x.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(torch.finfo(torch.float64).tiny)
    ratio = (x.abs() / rms) * dims[:, None, :].to(torch.float64)
    return ratio.max(dim=-1).values


def visual_sink_mask(
    hidden: torch.Tensor, image: torch.Tensor, first: torch.Tensor, lam: float, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sinks [B, T] bool, phi [B, T] float64) of one layer.

    ``hidden`` [B, T, D] is the hidden state entering the layer, ``image`` [B, T] flags image tokens and
    ``first`` [B] long is the column of each input's first real token (never a visual sink).
    """
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    first = first.to(hidden.device)
    dims = sink_dims(hidden[rows, first].to(torch.float64), lam)
    phi = sink_dim_value(hidden, dims)
    sinks = image.to(hidden.device) & (phi >= tau)
    sinks[rows, first] = False
    return sinks, phi


def check_positive(name: str, key: str, value: Any, above: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= above:
        raise ProbeError(f"{name} {key} must be a finite number > {above:g} (got {value!r})")
    return float(value)


@dataclass
class VisualSinksProbe(Probe):
    """Visual sink tokens per layer (VAR) and, per head, the attention text queries pay them."""

    #: a sink token's largest |x[d]| / rms(x) over the sink dimensions is at least tau (the paper: 20)
    tau: float = 20.0
    #: a dimension of the first token is massive above lam times its median |x| (``massive_values``: 5)
    lam: float = 5.0
    #: the image token id; None: read from the config of the model the engine runs
    image_token_id: int | None = None

    name = "visual_sinks"
    needs = Needs(hidden_states=True, default=False)

    _ids: torch.Tensor | None = field(default=None, init=False, repr=False)
    _pending: dict = field(default_factory=dict, init=False, repr=False)
    _start: torch.Tensor | None = field(default=None, init=False, repr=False)
    _stats: dict[int, HeadStats] = field(default_factory=dict, init=False, repr=False)
    _counts: dict[int, list] = field(default_factory=dict, init=False, repr=False)
    _sinks: list = field(default_factory=list, init=False, repr=False)
    _phi_rows: list = field(default_factory=list, init=False, repr=False)
    _next: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.tau = check_positive(self.name, "tau", self.tau, 0.0)
        self.lam = check_positive(self.name, "lam", self.lam, 1.0)

    def params(self) -> dict[str, Any]:
        return {"tau": self.tau, "lam": self.lam, "image_token_id": self.image_token_id}

    # -- inputs ------------------------------------------------------------------------------
    def begin(self, batch: Batch) -> None:
        if batch.input_ids is None:
            raise ProbeError("visual_sinks needs the batch's input ids to find the image tokens")
        self._ids = batch.input_ids
        self._pending, self._start = {}, None

    def set_inputs(self, input_ids: torch.Tensor) -> None:
        """The [B, T] input ids of the next forward call (what :meth:`begin` takes from a scan's batch)."""
        self._ids = input_ids
        self._pending, self._start = {}, None

    def _image_mask(self, block: Block) -> torch.Tensor:
        if self._ids is None:
            raise ProbeError("visual_sinks needs the input ids: call begin(batch) or set_inputs(input_ids) first")
        if self.image_token_id is None:
            owner = next((s.model for s in registry.active() if s.owns(block.module)), None)
            self.image_token_id = image_token_id(owner) if owner is not None else None
            if self.image_token_id is None:
                raise ProbeError(
                    "visual_sinks needs an image token id: the model's config has no image_token_id "
                    "(is it a vision-language model?); pass visual_sinks:image_token_id=N"
                )
        return self._ids.to(block.q_pos.device) == self.image_token_id

    # -- hooks -------------------------------------------------------------------------------
    def update(self, block: Block) -> None:
        if block.tower != "text" or block.is_cross:
            return
        image = self._image_mask(block)
        img_k = at_columns(block.k_pos, image)  # [B, bk]
        img_q = at_columns(block.q_pos, image)
        sees = (block.visible()[:, 0] & img_k[:, None, :]).any(dim=-1)  # [B, bq]
        rows = (block.query_valid & ~img_q & sees).to(torch.float64)  # counted text rows
        cols = torch.einsum("bq,bhqk->bhk", rows, block.probs.to(torch.float64))  # [B, H, bk]
        store = self._pending.setdefault(block.layer, {})
        add_columns(store, "mass", int(block.k_pos[0]), cols)
        store["rows"] = store.get("rows", 0) + rows.sum(dim=-1)
        store["kv_heads"] = block.num_kv_heads
        if self._start is None:
            self._start = block.item_start.to(torch.long).clone()

    def commit(self) -> None:
        """Nothing: the sums wait for the hidden states, which :meth:`end` brings."""

    def end(self, batch: Batch | None, outputs: Any) -> None:
        """Find each layer's visual sinks from ``outputs.hidden_states`` and fold the batch in."""
        pending, self._pending = self._pending, {}
        if not pending:
            return
        hidden = getattr(outputs, "hidden_states", None)
        if hidden is None:
            raise ProbeError("visual_sinks reads the hidden states: run the forward with output_hidden_states=True")
        ids = self._ids
        first = self._start
        image_all = ids == self.image_token_id
        batch_rows = ids.shape[0]
        samples = [batch.index(b) if batch is not None else self._next + b for b in range(batch_rows)]
        per_input_sinks: list[dict[int, np.ndarray]] = [{} for _ in range(batch_rows)]
        phis: list[dict[int, np.ndarray]] = [{} for _ in range(batch_rows)]
        for layer, store in sorted(pending.items()):
            if layer >= len(hidden) - 1:
                raise ProbeError(f"visual_sinks: the outputs hold no hidden state entering layer {layer}")
            h = hidden[layer]
            image = image_all.to(h.device)[:, : h.shape[1]]
            sinks, phi = visual_sink_mask(h, image, first, self.lam, self.tau)
            mass = store["mass"]  # [B, H, N] over key columns
            width = min(mass.shape[-1], sinks.shape[1])
            on_sinks = (mass[..., :width] * sinks[:, None, :width].to(mass.device, torch.float64)).sum(-1)
            counted = store["rows"].to(mass.device)[:, None]
            per_input = torch.where(counted > 0, on_sinks / counted.clamp_min(1), torch.nan)
            stats = self._stats.setdefault(layer, HeadStats.empty(per_input.shape[1], store["kv_heads"]))
            stats.add(per_input.cpu().numpy())
            count = self._counts.setdefault(layer, [0.0, 0])
            count[0] += float(sinks.sum())
            count[1] += batch_rows
            for b in range(batch_rows):
                start = int(first[b])
                per_input_sinks[b][layer] = (torch.nonzero(sinks[b]).squeeze(-1).cpu().numpy() - start).astype(np.int64)
                keep = image[b].clone()
                keep[:start] = False
                pos = torch.nonzero(keep).squeeze(-1)
                phis[b][layer] = (pos.cpu().numpy() - start, phi[b, pos].cpu().numpy())
        for b in range(batch_rows):
            self._sinks.append((samples[b], per_input_sinks[b]))
            for layer, (pos, val) in phis[b].items():
                self._phi_rows.append((samples[b], layer, pos, np.full(len(pos), self.image_token_id), val))
        self._next = max(self._next, max(samples) + 1)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        layers = sorted(self._stats)
        state = {
            "layers": np.array(layers, dtype=np.int64),
            "kv_heads": np.array([self._stats[layer].kv_heads for layer in layers], dtype=np.int64),
            "next": np.array(self._next, dtype=np.int64),
        }
        for layer in layers:
            stats = self._stats[layer]
            state[f"total.{layer}"] = stats.total.copy()
            state[f"total_sq.{layer}"] = stats.total_sq.copy()
            state[f"count.{layer}"] = stats.count.copy()
            state[f"sinks.{layer}"] = np.array(self._counts.get(layer, [0.0, 0]), dtype=np.float64)
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        try:
            layers = [int(x) for x in np.asarray(state["layers"]).reshape(-1)]
            kv = [int(x) for x in np.asarray(state["kv_heads"]).reshape(-1)]
            stats, counts = {}, {}
            for layer, kv_heads in zip(layers, kv, strict=True):
                stats[layer] = HeadStats(
                    np.array(state[f"total.{layer}"], dtype=np.float64),
                    np.array(state[f"total_sq.{layer}"], dtype=np.float64),
                    np.array(state[f"count.{layer}"], dtype=np.int64),
                    kv_heads,
                )
                total, n = np.asarray(state[f"sinks.{layer}"], dtype=np.float64)
                counts[layer] = [float(total), int(n)]
            nxt = int(np.asarray(state["next"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"not a state of probe {self.name}: {exc}") from exc
        self._stats, self._counts, self._next = stats, counts, nxt
        self._pending, self._sinks, self._phi_rows = {}, [], []

    # -- results -----------------------------------------------------------------------------
    def values(self) -> np.ndarray:
        """[layers, heads] mean attention text queries pay the visual sinks (NaN where never seen)."""
        if not self._stats:
            return np.zeros((0, 0))
        heads = max(len(s.total) for s in self._stats.values())
        out = np.full((max(self._stats) + 1, heads), np.nan)
        for layer, stats in self._stats.items():
            out[layer, : len(stats.total)] = stats.mean()
        return out

    def sink_counts(self) -> dict[int, float]:
        """Per layer, the mean number of visual sink tokens per input."""
        return {layer: total / n for layer, (total, n) in sorted(self._counts.items()) if n}

    def sinks(self) -> dict[int, dict[int, np.ndarray]]:
        """Per input (corpus index, or order seen): per layer, the sink positions inside the input (0 = first
        real token). Only inputs seen by this process (not restored from a state)."""
        return {sample: layers for sample, layers in self._sinks}

    def head_rows(self) -> list[dict[str, Any]]:
        rows = []
        for layer, stats in sorted(self._stats.items()):
            group = len(stats.total) // stats.kv_heads
            for head, (value, se, n) in enumerate(zip(stats.mean(), stats.stderr(), stats.count, strict=True)):
                rows.append(
                    {
                        "probe": self.name,
                        "metric": "visual_sink_mass",
                        "layer": int(layer),
                        "head": head,
                        "kv_head": head // group,
                        "value": float(value),
                        "stderr": float(se),
                        "n": int(n),
                    }
                )
        return rows

    def token_frame(self) -> pd.DataFrame | None:
        """phi of every image token at every layer (metric ``sink_dim_value``)."""
        if not self._phi_rows:
            return None
        parts = [
            pd.DataFrame(
                {
                    "sample": np.full(len(pos), sample, dtype=np.int64),
                    "position": pos.astype(np.int64),
                    "token_id": ids.astype(np.int64),
                    "metric": "sink_dim_value",
                    "layer": np.full(len(pos), layer, dtype=np.int64),
                    "value": val.astype(np.float64),
                }
            )
            for sample, layer, pos, ids, val in self._phi_rows
        ]
        return pd.concat(parts, ignore_index=True)
