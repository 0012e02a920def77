"""``cross_alignment``: how sharply and how monotonically each cross-attention head aligns output to source.

For each cross-attention head of an encoder-decoder (blocks of the ``cross`` tower: T5, BART, Whisper,
Mllama's cross layers), over the real decoder query rows i of an input, with S(i) the source keys row i
sees (|S(i)| >= 2):

    cross_entropy[l, h]      = mean over inputs of ( mean over i of  H(A_h[i, S(i)]) / log |S(i)| )
    cross_monotonicity[l, h] = mean over inputs of  Spearman( i, argmax_j A_h[i, j] )

H(p) = -sum p log p (0 log 0 = 0): 0 for a head that looks at one source token, 1 for a uniform one.
Spearman's rho is Pearson's correlation of the ranks (ties get their mean rank) of the output positions
and of their argmax source positions: 1 for an alignment that moves forward along the source (speech or
translation read in order), near 0 for none. An input with fewer than two rows, or whose argmax never
moves, has no monotonicity value. Decoder rows are real when the decoder's own self-attention marks
them real (its padding mask), read from the ``decoder`` blocks of the same forward call. Its rows in
heads.parquet say ``tower = cross`` (the layer numbers are those of the cross-attention layers, which
restart at 0 beside the encoder's and the decoder's). See docs/methods/cross_alignment.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..engine.block import Block
from .base import Needs, Probe
from .head import HeadStats


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho of two 1-D arrays (mean ranks for ties); NaN when either is constant or n < 2."""
    if len(x) < 2:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / den) if den > 0 else math.nan


def _ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v), dtype=np.float64)
    ranks[order] = np.arange(len(v), dtype=np.float64)
    for value in np.unique(v):  # ties: their mean rank
        tied = v == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


@dataclass
class CrossAlignmentProbe(Probe):
    """Normalised entropy and Spearman monotonicity of each cross-attention head."""

    name = "cross_alignment"
    needs = Needs(default=False)
    #: reads the ``cross`` tower only, on purpose (its sums are keyed by cross-attention layer)
    tower_aware = True
    #: the tower of its rows
    tower = "cross"

    _decoder_valid: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    # per layer: entropy sums [B, H] and row counts [B]; argmax rows: (q_pos, argmax [B, H, bq], rows [B, bq])
    _ent: dict[int, list] = field(default_factory=dict, init=False, repr=False)
    _arg: dict[int, list] = field(default_factory=dict, init=False, repr=False)
    _stats: dict[str, dict[int, HeadStats]] = field(
        default_factory=lambda: {"cross_entropy": {}, "cross_monotonicity": {}}, init=False, repr=False
    )

    def update(self, block: Block) -> None:
        if block.tower == "decoder" and not block.is_cross:
            for r, pos in enumerate(block.q_pos.tolist()):
                self._decoder_valid[pos] = block.query_valid[:, r].clone()
            return
        if not block.is_cross:
            return
        rows = block.query_valid.clone()
        for r, pos in enumerate(block.q_pos.tolist()):
            if pos in self._decoder_valid:  # decoder padding, when a decoder self-attention said it
                rows[:, r] &= self._decoder_valid[pos].to(rows.device)
        probs = block.probs.to(torch.float64)  # [B, H, bq, bk]
        n_keys = block.row_counts().to(torch.float64)  # [B, bq]
        plogp = torch.where(probs > 0, probs * torch.log(probs.clamp_min(1e-300)), torch.zeros_like(probs))
        entropy = -plogp.sum(dim=-1) / torch.log(n_keys.clamp_min(2))[:, None, :]  # [B, H, bq]
        counted = rows & (n_keys >= 2)
        w = counted.to(torch.float64)
        num = (entropy * w[:, None, :]).sum(dim=-1)
        slot = self._ent.get(block.layer)
        if slot is None or slot[0].shape != num.shape:
            self._ent[block.layer] = [num, w.sum(dim=-1), block.num_kv_heads]
        else:
            slot[0] += num
            slot[1] += w.sum(dim=-1)
        argmax = block.probs.argmax(dim=-1) + int(block.k_pos[0])  # [B, H, bq] source position
        self._arg.setdefault(block.layer, []).append((block.q_pos.cpu(), argmax.cpu(), rows.cpu(), block.num_kv_heads))

    def commit(self) -> None:
        for layer, (num, den, kv) in self._ent.items():
            d = den.cpu().numpy()[:, None]
            with np.errstate(invalid="ignore", divide="ignore"):
                per_input = np.where(d > 0, num.cpu().numpy() / np.maximum(d, 1), np.nan)
            self._stats["cross_entropy"].setdefault(layer, HeadStats.empty(per_input.shape[1], kv)).add(per_input)
        for layer, parts in self._arg.items():
            q = torch.cat([p[0] for p in parts])  # [R]
            arg = torch.cat([p[1] for p in parts], dim=-1).numpy()  # [B, H, R]
            rows = torch.cat([p[2] for p in parts], dim=-1).numpy()  # [B, R]
            batch, heads = arg.shape[:2]
            per_input = np.full((batch, heads), np.nan)
            for b in range(batch):
                keep = rows[b]
                for h in range(heads):
                    per_input[b, h] = spearman(q.numpy()[keep].astype(np.float64), arg[b, h, keep].astype(np.float64))
            kv = parts[0][3]
            self._stats["cross_monotonicity"].setdefault(layer, HeadStats.empty(heads, kv)).add(per_input)
        self._ent.clear()
        self._arg.clear()
        self._decoder_valid.clear()

    def values(self, metric: str = "cross_entropy") -> np.ndarray:
        """[layers, heads] means of ``cross_entropy`` or ``cross_monotonicity`` (NaN where none)."""
        self.commit()
        stats = self._stats[metric]
        if not stats:
            return np.zeros((0, 0))
        heads = max(len(s.total) for s in stats.values())
        out = np.full((max(stats) + 1, heads), np.nan)
        for layer, s in stats.items():
            out[layer, : len(s.total)] = s.mean()
        return out

    def head_rows(self) -> list[dict[str, Any]]:
        self.commit()
        rows = []
        for metric, by_layer in self._stats.items():
            for layer, s in sorted(by_layer.items()):
                group = len(s.total) // s.kv_heads
                for head, (v, se, n) in enumerate(zip(s.mean(), s.stderr(), s.count, strict=True)):
                    rows.append(
                        dict(
                            probe=self.name,
                            metric=metric,
                            tower=self.tower,
                            layer=int(layer),
                            head=head,
                            kv_head=head // group,
                            value=float(v),
                            stderr=float(se),
                            n=int(n),
                        )
                    )
        return rows

    def state_dict(self) -> dict[str, np.ndarray]:
        state: dict[str, np.ndarray] = {}
        for metric, by_layer in self._stats.items():
            for layer, s in by_layer.items():
                for key in ("total", "total_sq", "count"):
                    state[f"{metric}.{key}.{layer}"] = getattr(s, key).copy()
                state[f"{metric}.kv_heads.{layer}"] = np.array([s.kv_heads], dtype=np.int64)
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        loaded: dict[str, dict[int, HeadStats]] = {"cross_entropy": {}, "cross_monotonicity": {}}
        try:
            for key in state:
                metric, kind, layer = key.split(".")
                if kind != "kv_heads":
                    continue
                layer_i = int(layer)
                loaded[metric][layer_i] = HeadStats(
                    np.array(state[f"{metric}.total.{layer}"], dtype=np.float64),
                    np.array(state[f"{metric}.total_sq.{layer}"], dtype=np.float64),
                    np.array(state[f"{metric}.count.{layer}"], dtype=np.int64),
                    int(np.asarray(state[key]).reshape(-1)[0]),
                )
        except (KeyError, ValueError) as exc:
            raise ValueError(f"not a state of probe {self.name}: {exc}") from exc
        self._ent.clear()
        self._arg.clear()
        self._stats = loaded
