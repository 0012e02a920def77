"""``fai``: Future Attention Influence of every token, and its peaks (anchor tokens).

    FAI(j) = 1/|G| * sum_{(l, h) in G} ( 1/|F(j)| * sum_{i in F(j)} A_lh[i, j] )

F(j) holds the future positions of token j: every i with j < i < T by default, or
j + lo <= i <= j + hi with ``horizon=(lo, hi)``. Queries that do not see j (a sliding window)
count with A = 0: FAI is a mean over positions, not over visible queries. G is a group of heads:
every head of the middle and upper layers (l >= L // 2) by default, ``layers="all"``, a list of
layers, or ``heads=[(layer, head), ...]`` (for instance the most global heads of an atlas).
Tokens with no future position (the last one) get no FAI.

Anchors are the peaks of FAI: the ``anchors`` tokens of highest FAI in each input (a number, or
a fraction of the input's eligible tokens), position 0 excluded (it collects the attention sink).

Li et al. 2025, "Attention Illuminates LLM Reasoning: The Preplan-and-Anchor Rhythm Enables
Fine-Grained Policy Optimization" (arXiv:2510.13554), Sec. 4.1: FAI averages the attention a token
receives from later positions within a horizon (their RL runs use H in [10, 50]) on the map
averaged over the most global 30 % of heads; anchors are its top tokens. Differences are listed
in docs/methods/fai.md. Causal models only.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..engine.block import Block
from ..errors import ProbeError
from .base import Needs
from .received import key_received
from .token import Pending, Row, TokenProbe, add_columns, piece, take


def _whole(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclass
class FaiProbe(TokenProbe):
    #: "upper" (layers >= L // 2), "all", or a list of layer indices (negative: from the end)
    layers: Any = "upper"
    #: (layer, head) pairs forming the group instead of whole layers; None: use ``layers``
    heads: Any = None
    #: (lo, hi): future positions j + lo .. j + hi (hi None: to the end); None: every later position
    horizon: Any = None
    #: anchors per input: a count k >= 0, or a fraction in (0, 1) of the tokens that have an FAI
    anchors: Any = 5

    name = "fai"
    needs = Needs(causal=True)
    chunk_keys = ("fai", "anchor")

    def __post_init__(self) -> None:
        lay = self.layers
        if isinstance(lay, str):
            if lay not in ("upper", "all"):
                raise ProbeError(f"fai layers must be 'upper', 'all' or a list of layer indices (got {lay!r})")
        else:
            try:
                items = list(lay)
            except TypeError:
                items = None
            if not items or not all(_whole(x) for x in items) or len(set(items)) != len(items):
                raise ProbeError(
                    f"fai layers must be 'upper', 'all' or a non-empty list of distinct layer indices (got {lay!r})"
                )
            self.layers = [int(x) for x in items]
        if self.heads is not None:
            if self.layers != "upper":
                raise ProbeError("fai takes either layers or heads, not both")
            try:
                pairs = [tuple(p) for p in self.heads]
            except TypeError:
                pairs = []
            if not pairs or not all(len(p) == 2 and all(_whole(x) and x >= 0 for x in p) for p in pairs):
                raise ProbeError(f"fai heads must be a non-empty list of (layer, head) pairs >= 0 (got {self.heads!r})")
            self.heads = sorted({(int(layer), int(head)) for layer, head in pairs})
        if self.horizon is not None:
            try:
                lo, hi = self.horizon
            except (TypeError, ValueError):
                lo = hi = "bad"
            if not (_whole(lo) and lo >= 1 and (hi is None or (_whole(hi) and hi >= lo))):
                raise ProbeError(
                    f"fai horizon must be (lo, hi) with whole numbers 1 <= lo <= hi, or hi None "
                    f"(got {self.horizon!r}); the paper uses (10, 50)"
                )
            self.horizon = (int(lo), None if hi is None else int(hi))
        k = self.anchors
        ok = (_whole(k) and k >= 0) or (isinstance(k, float) and 0.0 < k < 1.0)
        if not ok:
            raise ProbeError(f"fai anchors must be a whole number >= 0 or a fraction in (0, 1) (got {k!r})")

    def params(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "heads": None if self.heads is None else [list(p) for p in self.heads],
            "horizon": None if self.horizon is None else list(self.horizon),
            "anchors": self.anchors,
        }

    # -- accumulation ------------------------------------------------------------------------
    def _update_block(self, block: Block, pend: Pending) -> None:
        if not block.is_causal:
            raise ProbeError("fai needs a causal (decoder) model: an encoder's tokens have no 'future' to influence")
        if self.heads is None:
            picked = None
        else:
            picked = [h for layer, h in self.heads if layer == block.layer]
            if not picked:
                return
            if max(picked) >= block.num_heads:
                raise ProbeError(f"fai heads: layer {block.layer} has {block.num_heads} heads, not {max(picked) + 1}")
        if self.horizon is None:
            mass = key_received(block)[0]  # causal: rows i > j only
        else:
            lo, hi = self.horizon
            dist = block.q_pos[:, None] - block.k_pos[None, :]  # [bq, bk]
            inside = dist >= lo if hi is None else (dist >= lo) & (dist <= hi)
            weights = (inside[None] & block.query_valid[:, :, None]).to(block.probs.dtype)  # [B, bq, bk]
            mass = (block.probs * weights[:, None]).sum(dim=2, dtype=torch.float64)  # [B, H, bk]
        if picked is not None:
            mass = mass[:, picked]
        add_columns(pend.sums.setdefault(block.layer, {}), "mass", int(block.k_pos[0]), mass.sum(dim=1))
        pend.heads[block.layer] = mass.shape[1]

    def _group(self, pend: Pending) -> list[int]:
        seen = sorted(pend.layers)
        n_layers = max(seen) + 1
        if self.heads is not None:
            missing = sorted({layer for layer, _ in self.heads} - set(seen))
            if missing:
                raise ProbeError(f"fai heads name layer(s) {missing}; the model has {n_layers} layers")
            return sorted(pend.sums)
        if self.layers == "upper":
            return [layer for layer in seen if layer >= n_layers // 2]
        if self.layers == "all":
            return seen
        picked = sorted({x + n_layers if x < 0 else x for x in self.layers})
        bad = [x for x in picked if x not in seen]
        if bad:
            raise ProbeError(f"fai layers {self.layers} name layer(s) the model lacks: it has {n_layers} layers")
        return picked

    def _close(self, rows: list[Row], pend: Pending) -> dict[str, np.ndarray]:
        group = [layer for layer in self._group(pend) if layer in pend.sums]
        heads = sum(pend.heads[layer] for layer in group)
        mass = None
        for layer in group:
            part = pend.sums[layer]["mass"].cpu().numpy()
            if mass is None:
                mass = part.copy()
            else:
                width = max(mass.shape[1], part.shape[1])
                mass = np.pad(mass, ((0, 0), (0, width - mass.shape[1])))
                mass += np.pad(part, ((0, 0), (0, width - part.shape[1])))
        lo, hi = self.horizon if self.horizon is not None else (1, None)
        fai, anchor = [], []
        for b, row in enumerate(rows):
            t = row.length
            j = np.arange(t)
            last = np.full(t, t - 1) if hi is None else np.minimum(t - 1, j + hi)
            future = np.maximum(0, last - (j + lo) + 1)  # |F(j)|
            m = take(mass, row, b) if mass is not None else np.zeros(t)
            with np.errstate(invalid="ignore", divide="ignore"):
                value = np.where((future > 0) & (heads > 0), m / (max(heads, 1) * np.maximum(future, 1)), np.nan)
            fai.append(value)
            anchor.append(self._anchors(value))
        return {"fai": np.concatenate(fai), "anchor": np.concatenate(anchor)}

    def _anchors(self, value: np.ndarray) -> np.ndarray:
        """The top tokens by FAI (ties: the earlier position first), position 0 excluded."""
        out = np.zeros(len(value), dtype=bool)
        eligible = np.flatnonzero(np.isfinite(value) & (np.arange(len(value)) >= 1))
        k = self.anchors
        count = k if _whole(k) else math.ceil(k * len(eligible))
        if count and len(eligible):
            order = eligible[np.argsort(-value[eligible], kind="stable")]
            out[order[:count]] = True
        return out

    # -- output ------------------------------------------------------------------------------
    def _pieces(self, chunk: Mapping[str, np.ndarray]) -> list[dict]:
        fai = chunk["fai"]
        return [
            piece(chunk, "fai", -1, fai),
            piece(chunk, "anchor", -1, np.ones(len(fai)), keep=chunk["anchor"].astype(bool)),
        ]

    def values(self) -> dict[int, np.ndarray]:
        """Per input (corpus index): [T] FAI (NaN where a token has no future position)."""
        out = {}
        for chunk in self._chunks:
            at = 0
            for sample, length in zip(chunk["sample"], chunk["length"], strict=True):
                out[int(sample)] = np.array(chunk["fai"][at : at + length])
                at += length
        return out
