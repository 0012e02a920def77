"""``received``: the attention each token receives, per layer.

    received[l](j) = 1/H * sum_h ( 1/|Q(j)| * sum_{i in Q(j)} A_h[i, j] )

Q(j) is the set of real queries i != j that can see key j under the layer's mask: i > j in a
causal model without a window, every other token of the input in an encoder. The value is the
mean attention weight token j gets from the queries that could attend to it, averaged over the
query heads of the layer. The row with layer = -1 is the mean of received[l](j) over layers.
Tokens no query can see (the last token of a causal input) have no value and get no row.

This is the basis of attention sinks (``sinks``) and of Future Attention Influence (``fai``);
see docs/methods/received.md.

Per modality (``received:modality=true``, vision-language models): per query head h, the mean of
received_h(j) (the formula above before the mean over heads) over the image tokens j of the input, and
over its text tokens (real tokens that are not image tokens), then the mean over inputs: head rows
``received_image`` and ``received_text``. Only the language model is read then (blocks of the ``text``
tower, no cross-attention); image tokens are where the input ids hold the model's image token id (from
its config, or ``image_token_id``), the ids coming from the batch or :meth:`ReceivedProbe.set_inputs`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..engine import registry
from ..engine.block import Block, QKView
from ..engine.fused import band_probability, column_mass
from ..errors import ProbeError
from .head import HeadStats
from .token import Pending, Row, TokenProbe, add_columns, piece, take


def key_received(block: Block) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention each key of the block receives from the block's other real queries (i != j).

    ``(mass [B, H, bk] float64, count [B, bk] long)``: per head, the sum over real query rows i of
    the block with i != j of A[i, j], and the number of such rows that can see key j. Computed once
    per block and shared by ``received``, ``fai`` and ``sinks``; accumulated across blocks in
    float64.
    """
    return block.column_sums(exclude_self=True)


def add_received(block: Block, pend: Pending) -> torch.Tensor:
    """Add the block's :func:`key_received` mass (summed over heads) and count; return the per-head mass."""
    mass, count = key_received(block)  # [B, H, bk] float64, [B, bk] long
    store = pend.sums.setdefault(block.layer, {})
    start = int(block.k_pos[0])
    add_columns(store, "mass", start, mass.sum(dim=1))
    add_columns(store, "count", start, count)
    pend.heads[block.layer] = block.num_heads
    return mass


def received_matrix(rows: list[Row], pend: Pending, key: str = "mass") -> tuple[np.ndarray, np.ndarray]:
    """(layers [L], values [L, sum T]): ``sums[l][key] / (heads * count)`` per token, NaN where count = 0."""
    layers = sorted(pend.sums)
    total = sum(r.length for r in rows)
    out = np.full((len(layers), total), np.nan)
    for li, layer in enumerate(layers):
        store = pend.sums[layer]
        mass = store[key].cpu().numpy()
        count = store["count"].cpu().numpy()
        heads = pend.heads[layer] if key == "mass" else 1
        at = 0
        for b, row in enumerate(rows):
            m, c = take(mass, row, b), take(count, row, b)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[li, at : at + row.length] = np.where(c > 0, m / (heads * np.maximum(c, 1)), np.nan)
            at += row.length
    return np.array(layers, dtype=np.int64), out


def layer_mean(values: np.ndarray) -> np.ndarray:
    """Mean over layers (axis 0) of the finite entries; NaN where a token has none."""
    ok = np.isfinite(values)
    n = ok.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.where(ok, values, 0.0).sum(axis=0) / np.maximum(n, 1), np.nan)


# -- the received probe ------------------------------------------------------------------------


@dataclass
class ReceivedProbe(TokenProbe):
    """Received attention of every token at every layer (rows ``received``, layer -1 = mean over layers).

    Its table holds one row per token and layer. ``modality=True`` adds, per head, the mean received by
    image tokens and by text tokens (head rows ``received_image``, ``received_text``).
    """

    #: also report, per head, the attention image tokens and text tokens receive (VLMs)
    modality: bool = False
    #: the image token id (``modality``); None: read from the config of the model the engine runs
    image_token_id: int | None = None

    name = "received"
    chunk_keys = ("layers", "received")
    #: column sums sum_i A_ij from one fused call with queries and keys exchanged (headmap.engine.fused.
    #: column_mass), less the diagonal exp(s_jj - lse_j); the per-modality rows need blocks (not fused)
    fused = True

    _ids: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.modality, bool):
            raise ProbeError(f"received modality must be true or false (got {self.modality!r})")
        if self.modality:
            self.fused = False
        tid = self.image_token_id
        if tid is not None and (isinstance(tid, bool) or not isinstance(tid, int)):
            raise ProbeError(f"received image_token_id must be a token id (got {tid!r})")

    def params(self) -> dict[str, Any]:
        return {"modality": True, "image_token_id": self.image_token_id} if self.modality else {}

    def set_inputs(self, input_ids: torch.Tensor) -> None:
        """The [B, T] input ids of the next forward (``modality`` without a scan's batch)."""
        self._ids = input_ids

    def update(self, block: Block) -> None:
        if self.modality and (block.tower != "text" or block.is_cross):
            return
        super().update(block)

    def update_fused(self, view: QKView) -> None:
        pend = self._track(view)
        # a plain call: every query is real, keys start at position 0 (no offset) and the rows are square
        mass = column_mass(view).to(torch.float64) - band_probability(view, [0])[..., 0].to(torch.float64)
        length = view.key.shape[2]
        count = torch.arange(length, device=mass.device)
        count = (length - 1 - count) if view.is_causal else torch.full_like(count, length - 1)  # |Q(j)|
        store = pend.sums.setdefault(view.layer, {})
        add_columns(store, "mass", 0, mass.sum(dim=1))
        add_columns(store, "count", 0, count.expand(mass.shape[0], length))
        pend.heads[view.layer] = view.num_heads

    def _update_block(self, block: Block, pend: Pending) -> None:
        mass = add_received(block, pend)
        if self.modality:
            if self.image_token_id is None:
                owner = next((s.model for s in registry.active() if s.owns(block.module)), None)
                config = getattr(owner, "config", None)
                for key in ("image_token_id", "image_token_index"):
                    value = getattr(config, key, None)
                    if isinstance(value, int) and not isinstance(value, bool):
                        self.image_token_id = value
                        break
                else:
                    raise ProbeError(
                        "received:modality=true needs an image token id: the model's config has none (is it a "
                        "vision-language model?); pass received:image_token_id=N"
                    )
            add_columns(pend.sums[block.layer], "head_mass", int(block.k_pos[0]), mass)
            pend.extra.setdefault("kv_heads", {})[block.layer] = block.num_kv_heads

    def _close(self, rows: list[Row], pend: Pending) -> dict[str, np.ndarray]:
        layers, values = received_matrix(rows, pend)
        out = {"layers": layers, "received": values}
        if self.modality:
            out["received_image"], out["received_text"] = self._by_modality(rows, pend, layers)
            kv = pend.extra.get("kv_heads", {})
            out["kv_heads"] = np.array([kv.get(int(layer), 1) for layer in layers], dtype=np.int64)
            self._ids = None
        return out

    def _image_flags(self, row: Row, b: int) -> np.ndarray:
        if row.length and row.ids[0] >= 0:
            return row.ids == self.image_token_id
        if self._ids is None:
            raise ProbeError(
                "received:modality=true needs the input ids: call begin(batch) or set_inputs(input_ids) first"
            )
        ids = self._ids[b, row.start : row.start + row.length].cpu().numpy()
        return ids == self.image_token_id

    def _by_modality(self, rows: list[Row], pend: Pending, layers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[inputs, L, H] per-head mean received by the image tokens and by the text tokens of each input."""
        heads = max((pend.heads[int(layer)] for layer in layers), default=0)
        image = np.full((len(rows), len(layers), heads), np.nan)
        text = np.full_like(image, np.nan)
        for li, layer in enumerate(layers):
            store = pend.sums[int(layer)]
            mass = store["head_mass"].cpu().numpy()  # [B, H, N]
            count = store["count"].cpu().numpy()  # [B, N]
            for b, row in enumerate(rows):
                m = np.stack([take(mass[:, h], row, b) for h in range(mass.shape[1])])  # [H, T]
                c = take(count, row, b)
                seen = c > 0
                flags = self._image_flags(row, b)
                r = m / np.maximum(c, 1)
                for out, keep in ((image, flags & seen), (text, ~flags & seen)):
                    if keep.any():
                        out[b, li, : m.shape[0]] = r[:, keep].mean(axis=1)
        return image, text

    def head_rows(self) -> list[dict[str, Any]]:
        """Per-modality head rows (``modality``): ``received_image`` and ``received_text``."""
        if not self.modality:
            return []
        stats: dict[tuple[str, int], HeadStats] = {}
        for chunk in self._chunks:
            for metric in ("received_image", "received_text"):
                values = chunk.get(metric)
                if values is None:
                    continue
                for li, layer in enumerate(chunk["layers"]):
                    key = (metric, int(layer))
                    if key not in stats:
                        stats[key] = HeadStats.empty(values.shape[2], int(chunk["kv_heads"][li]))
                    stats[key].add(values[:, li])
        rows = []
        for (metric, layer), st in sorted(stats.items()):
            group = len(st.total) // st.kv_heads
            for head, (value, se, n) in enumerate(zip(st.mean(), st.stderr(), st.count, strict=True)):
                rows.append(
                    {
                        "probe": self.name,
                        "metric": metric,
                        "layer": layer,
                        "head": head,
                        "kv_head": head // group,
                        "value": float(value),
                        "stderr": float(se) if not math.isnan(se) else math.nan,
                        "n": int(n),
                    }
                )
        return rows

    def _pieces(self, chunk: Mapping[str, np.ndarray]) -> list[dict]:
        values = chunk["received"]
        out = [piece(chunk, "received", int(layer), values[i]) for i, layer in enumerate(chunk["layers"])]
        out.append(piece(chunk, "received", -1, layer_mean(values)))
        return out

    def values(self) -> dict[int, np.ndarray]:
        """Per input (corpus index): [L, T] received attention (NaN where no query sees the token)."""
        out = {}
        for chunk in self._chunks:
            at = 0
            for sample, length in zip(chunk["sample"], chunk["length"], strict=True):
                out[int(sample)] = np.array(chunk["received"][:, at : at + length])
                at += length
        return out
