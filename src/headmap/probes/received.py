"""``received``: the attention each token receives, per layer.

    received[l](j) = 1/H * sum_h ( 1/|Q(j)| * sum_{i in Q(j)} A_h[i, j] )

Q(j) is the set of real queries i != j that can see key j under the layer's mask: i > j in a
causal model without a window, every other token of the input in an encoder. The value is the
mean attention weight token j gets from the queries that could attend to it, averaged over the
query heads of the layer. The row with layer = -1 is the mean of received[l](j) over layers.
Tokens no query can see (the last token of a causal input) have no value and get no row.

This is the basis of attention sinks (``sinks``) and of Future Attention Influence (``fai``);
see docs/methods/received.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..engine.block import Block
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

    No parameters. Its table holds one row per token and layer.
    """

    name = "received"
    chunk_keys = ("layers", "received")

    def _update_block(self, block: Block, pend: Pending) -> None:
        add_received(block, pend)

    def _close(self, rows: list[Row], pend: Pending) -> dict[str, np.ndarray]:
        layers, values = received_matrix(rows, pend)
        return {"layers": layers, "received": values}

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
