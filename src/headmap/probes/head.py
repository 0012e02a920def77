"""Head-level probes: :class:`HeadStats` (across-input sums per head), :class:`HeadTableProbe` (a probe
whose result is those sums per (tower, layer): their state, table rows and means) and :class:`HeadMeanProbe`
(a head score that is a mean over query rows, folded in block by block).

A head score is first averaged within an input, then across inputs, each input weighing the same
(docs/methods/README.md).

Sums are kept per **(tower, layer)**: a vision-language model's vision tower numbers its layers from 0
like the text model (docs/multimodal.md), so a layer number alone would mix the two. The text tower
keeps its plain integer key (``_stats[layer]``, and the state format of text models is unchanged);
every other tower (``vision``, ``encoder``, ``decoder``, ``cross``) is keyed ``(tower, layer)``.

``state_dict()`` / ``load_state_dict(state)`` save and restore the committed totals as plain numpy
arrays (what ``numpy.savez`` stores exactly), so that a scan can checkpoint, stop,
and resume with totals bit-for-bit equal to a scan that never stopped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..engine.block import Block
from .base import Probe

#: The tower whose heads :meth:`HeadMeanProbe.values` and :meth:`HeadMeanProbe.result` give by default,
#: in order of preference among the towers a probe saw (a text model: ``text``; an encoder-decoder:
#: ``decoder``; a vision encoder alone: ``vision``).
MAIN_TOWERS = ("text", "decoder", "encoder", "vision", "cross")


def tower_key(tower: str, layer: int) -> int | tuple[str, int]:
    """The key of (tower, layer) in a head probe's sums: the layer for ``text``, else ``(tower, layer)``."""
    return int(layer) if tower == "text" else (tower, int(layer))


def split_key(key: int | tuple[str, int]) -> tuple[str, int]:
    """(tower, layer) of a key made by :func:`tower_key`."""
    return ("text", int(key)) if not isinstance(key, tuple) else (key[0], int(key[1]))


def main_tower(towers: Any) -> str | None:
    """The first of :data:`MAIN_TOWERS` among ``towers`` (None when there is none)."""
    present = set(towers)
    return next((t for t in MAIN_TOWERS if t in present), next(iter(sorted(present)), None))


@dataclass
class HeadStats:
    """Across-input sums for one layer: per head sum of x, sum of x^2, and input count."""

    total: np.ndarray
    total_sq: np.ndarray
    count: np.ndarray
    kv_heads: int

    @classmethod
    def empty(cls, heads: int, kv_heads: int) -> HeadStats:
        z = np.zeros(heads, dtype=np.float64)
        return cls(z.copy(), z.copy(), np.zeros(heads, dtype=np.int64), kv_heads)

    def add(self, values: np.ndarray) -> None:
        """``values``: [n_inputs, H] per-input scores (NaN where the input had no counted row)."""
        ok = ~np.isnan(values)
        self.total += np.where(ok, values, 0.0).sum(axis=0)
        self.total_sq += np.where(ok, values * values, 0.0).sum(axis=0)
        self.count += ok.sum(axis=0)

    def copy(self) -> HeadStats:
        return HeadStats(self.total.copy(), self.total_sq.copy(), self.count.copy(), self.kv_heads)

    def merge(self, other: HeadStats) -> None:
        self.total += other.total
        self.total_sq += other.total_sq
        self.count += other.count

    def mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.total / np.maximum(self.count, 1), np.nan)

    def stderr(self) -> np.ndarray:
        n = self.count.astype(np.float64)
        mean = self.mean()
        with np.errstate(invalid="ignore", divide="ignore"):
            spread = self.total_sq - n * mean * mean
            # sum x^2 - n mean^2 cancels: below a few ulps of sum x^2 it is rounding, not spread
            spread = np.where(spread > 16 * np.finfo(np.float64).eps * self.total_sq, spread, 0.0)
            var = spread / np.maximum(n - 1, 1)
            se = np.sqrt(np.maximum(var, 0.0) / np.maximum(n, 1))
        return np.where(n > 1, se, np.nan)


@dataclass
class HeadTableProbe(Probe):
    """A probe whose result is one score per head, averaged across inputs: :class:`HeadStats` by (tower, layer).

    Subclasses fold each input's per-head scores in with :meth:`_fold`; this class keeps the committed
    sums and gives what every such probe gives: ``state_dict`` / ``load_state_dict``, ``merge``,
    ``towers``, ``result``, ``values`` and the rows of ``heads.parquet`` (``head_rows``, with ``tower``).
    """

    #: a scan may give this probe the blocks of every tower (its sums are keyed by tower)
    tower_aware = True

    _stats: dict[int | tuple[str, int], HeadStats] = field(default_factory=dict, init=False, repr=False)

    def _fold(self, key: int | tuple[str, int], kv_heads: int, per_input: np.ndarray) -> None:
        """Add per-input scores [n_inputs, H] (NaN where an input had none) to the sums of ``key`` (a tower_key)."""
        stats = self._stats.setdefault(key, HeadStats.empty(per_input.shape[1], kv_heads))
        stats.add(per_input)

    def merge(self, other: HeadTableProbe) -> None:
        """Add another probe's committed totals (another batch, input set or process)."""
        for layer, stats in other._stats.items():
            mine = self._stats.get(layer)
            if mine is None:
                self._stats[layer] = stats.copy()
            else:
                mine.merge(stats)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Committed totals per layer: ``layers``, ``kv_heads`` and ``total.L``, ``total_sq.L``, ``count.L``.

        Layers of the text tower as ever; a layer of another tower is stored under
        ``total.TOWER:L:KV`` (likewise ``total_sq``, ``count``), KV its key/value heads, so that the
        states of several processes still merge by adding arrays of the same name.
        Pending sums of inputs not yet committed are not included (a scan saves after each commit).
        """
        layers = sorted(k for k in self._stats if not isinstance(k, tuple))
        state = {
            "layers": np.array(layers, dtype=np.int64),
            "kv_heads": np.array([self._stats[layer].kv_heads for layer in layers], dtype=np.int64),
        }
        for layer in layers:
            stats = self._stats[layer]
            state[f"total.{layer}"] = stats.total.copy()
            state[f"total_sq.{layer}"] = stats.total_sq.copy()
            state[f"count.{layer}"] = stats.count.copy()
        for key in sorted(k for k in self._stats if isinstance(k, tuple)):
            stats = self._stats[key]
            name = f"{key[0]}:{key[1]}:{stats.kv_heads}"
            state[f"total.{name}"] = stats.total.copy()
            state[f"total_sq.{name}"] = stats.total_sq.copy()
            state[f"count.{name}"] = stats.count.copy()
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the committed totals by a :meth:`state_dict`."""
        try:
            layers = [int(x) for x in np.asarray(state["layers"]).reshape(-1)]
            kv = [int(x) for x in np.asarray(state["kv_heads"]).reshape(-1)]
            if len(kv) != len(layers):
                raise ValueError("'layers' and 'kv_heads' differ in length")
            loaded: dict[int, HeadStats] = {}
            for layer, kv_heads in zip(layers, kv, strict=True):
                total = np.array(state[f"total.{layer}"], dtype=np.float64).reshape(-1)
                total_sq = np.array(state[f"total_sq.{layer}"], dtype=np.float64).reshape(-1)
                count = np.array(state[f"count.{layer}"], dtype=np.int64).reshape(-1)
                if not (len(total) == len(total_sq) == len(count)) or kv_heads < 1 or len(total) % kv_heads:
                    raise ValueError(f"layer {layer}: arrays of different lengths or a bad kv_heads")
                loaded[layer] = HeadStats(total, total_sq, count, kv_heads)
            for name in state:
                kind, _, rest = name.partition(".")
                if kind != "total" or ":" not in rest:
                    continue
                tower, layer_text, kv_text = rest.split(":")
                total = np.array(state[f"total.{rest}"], dtype=np.float64).reshape(-1)
                total_sq = np.array(state[f"total_sq.{rest}"], dtype=np.float64).reshape(-1)
                count = np.array(state[f"count.{rest}"], dtype=np.int64).reshape(-1)
                kv_heads = int(kv_text)
                if not (len(total) == len(total_sq) == len(count)) or kv_heads < 1 or len(total) % kv_heads:
                    raise ValueError(f"{tower} layer {layer_text}: arrays of different lengths or a bad kv_heads")
                loaded[(tower, int(layer_text))] = HeadStats(total, total_sq, count, kv_heads)
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"not a state of probe {self.name}: {exc}") from exc
        self._stats = loaded

    def towers(self) -> list[str]:
        """The towers this probe has committed sums for, main tower first (:data:`MAIN_TOWERS` order)."""
        seen = {split_key(k)[0] for k in self._stats}
        return sorted(seen, key=lambda t: (MAIN_TOWERS.index(t) if t in MAIN_TOWERS else len(MAIN_TOWERS), t))

    def result(self, tower: str | None = None) -> dict[int, HeadStats]:
        """Committed statistics by layer of ``tower`` (None: the main tower, :func:`main_tower`).

        Commits pending inputs first.
        """
        self.commit()
        if tower is None:
            tower = main_tower(self.towers()) or "text"
        mine = {split_key(k)[1]: v for k, v in self._stats.items() if split_key(k)[0] == tower}
        return dict(sorted(mine.items()))

    def head_rows(self) -> list[dict[str, Any]]:
        rows = []
        self.commit()
        for tower in self.towers():
            rows += self._tower_rows(tower)
        return rows

    def _tower_rows(self, tower: str) -> list[dict[str, Any]]:
        rows = []
        for layer, stats in self.result(tower).items():
            group = len(stats.total) // stats.kv_heads
            for head, (value, se, n) in enumerate(zip(stats.mean(), stats.stderr(), stats.count, strict=True)):
                rows.append(
                    {
                        "probe": self.name,
                        "metric": self.name,
                        "tower": tower,
                        "layer": int(layer),
                        "head": head,
                        "kv_head": head // group,
                        "value": float(value),
                        "stderr": float(se) if not math.isnan(se) else math.nan,
                        "n": int(n),
                    }
                )
        return rows

    def values(self, tower: str | None = None) -> np.ndarray:
        """[layers, heads] mean scores of ``tower`` (None: the main tower; NaN where a layer was never seen)."""
        res = self.result(tower)
        if not res:
            return np.zeros((0, 0))
        heads = max(len(s.total) for s in res.values())
        out = np.full((max(res) + 1, heads), np.nan)
        for layer, stats in res.items():
            out[layer, : len(stats.total)] = stats.mean()
        return out


@dataclass
class HeadMeanProbe(HeadTableProbe):
    """A head-level score that is the mean over counted query rows of a per-row quantity.

    Subclasses implement ``row_values(block) -> (values [B, H, bq], counted [B, bq])``.
    Sums are keyed by (tower, layer) (:func:`tower_key`), so every tower of a multimodal model gets its
    own rows (``tower`` in :meth:`head_rows`).
    """

    _pending: dict[int, list] = field(default_factory=dict, init=False, repr=False)

    def row_values(self, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def update(self, block: Block) -> None:
        values, counted = self.row_values(block)
        self._add_rows(getattr(block, "tower", "text"), block.layer, block.num_kv_heads, values, counted)

    def _add_rows(self, tower: str, layer: int, kv_heads: int, values: torch.Tensor, counted: torch.Tensor) -> None:
        """Fold per-row values [B, H, rows] of the counted rows [B, rows] into the pending sums."""
        weights = counted.to(torch.float64)
        # a statistic, not part of any graph: a forward that takes gradients (explain) must not make it one
        num = (values.detach().to(torch.float64) * weights[:, None, :]).sum(dim=-1)  # [B, H]
        den = weights.sum(dim=-1)  # [B]
        key = tower_key(tower, layer)
        slot = self._pending.get(key)
        if slot is None or slot[0].shape != num.shape:
            self._pending[key] = [num, den, kv_heads]
        else:
            slot[0] += num
            slot[1] += den

    def commit(self) -> None:
        for layer, (num, den, kv_heads) in self._pending.items():
            den_np = den.cpu().numpy()[:, None]
            with np.errstate(invalid="ignore", divide="ignore"):
                per_input = np.where(den_np > 0, num.cpu().numpy() / np.maximum(den_np, 1), np.nan)
            self._fold(layer, kv_heads, per_input)
        self._pending.clear()

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the committed totals by a :meth:`state_dict`; drops anything pending."""
        super().load_state_dict(state)
        self._pending.clear()
