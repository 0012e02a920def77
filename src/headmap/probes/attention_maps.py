"""``attention_maps``: downsampled attention maps of every head on the first few inputs.

For input s (one of the first ``samples`` inputs of the probe's corpus) of T real tokens, layer l
and query head h, positions are grouped into n = min(bins, T) bins of (nearly) equal width,
bin(p) = floor(p * n / T), and each cell holds the mean attention probability over its pairs:

    map[s, l, h, r, c] = 1 / (|R_r| * |C_c|) * sum_{i in R_r} sum_{j in C_c} A_h[i, j]

with R_r (query positions) and C_c (key positions) the positions of bins r and c. Entries the
mask hides count as 0, so the map is the average-pooled T x T attention image (the upper
triangle of a causal model is 0) and each row of cells times its column widths sums to 1.

Pooling is two small matrix products per block and input, with one-hot bin matrices over the
block's rows and keys: no T x T array is ever built. Only forward passes that see a whole input
(no KV cache) are pooled. The maps feed the head panels of the HTML report
(``headmap report``); the table is ``maps.parquet``. See docs/methods/attention_maps.md.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..atlas import bin_sizes
from ..corpus import Batch
from ..engine.block import Block, QKView
from ..errors import ProbeError
from .base import Needs, Probe

#: Columns of ``maps.parquet``.
MAP_COLUMNS = ["sample", "layer", "head", "row_bin", "col_bin", "length", "value"]
#: Largest ``bins`` accepted (a map holds bins^2 cells per head).
MAX_BINS = 128


def _whole(x: Any, low: int, high: int | None = None) -> bool:
    ok = isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= low
    return ok and (high is None or x <= high)


def bin_index(positions: torch.Tensor, length: int, bins: int) -> torch.Tensor:
    """Bin of each position of an input of ``length`` tokens cut into ``bins`` bins (-1 outside)."""
    inside = (positions >= 0) & (positions < length)
    index = torch.div(positions.clamp(0, max(length - 1, 0)) * bins, max(length, 1), rounding_mode="floor")
    return torch.where(inside, index, torch.full_like(index, -1))


@dataclass
class AttentionMapsProbe(Probe):
    """Average-pooled attention maps, ``bins x bins`` per layer and head, of the first ``samples`` inputs."""

    #: how many inputs (the first ones of the probe's corpus) get maps
    samples: int = 2
    #: bins per side (inputs shorter than this get one bin per token)
    bins: int = 16

    name = "attention_maps"
    needs = Needs(qk=True)

    _batch: Batch | None = field(default=None, init=False, repr=False)
    #: the current forward: per batch row, (sample, length) for rows that get a map, else None
    _rows: list | None = field(default=None, init=False, repr=False)
    #: per layer of the current forward: True when the call holds whole inputs (no KV cache)
    _whole: dict = field(default_factory=dict, init=False, repr=False)
    #: pending sums of the current forward: (row, layer) -> [H, n, n] float64 tensor
    _pending: dict = field(default_factory=dict, init=False, repr=False)
    #: committed maps: sample -> (length, {layer: [H, n, n] float64 mean probabilities})
    _maps: dict = field(default_factory=dict, init=False, repr=False)
    _next_sample: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not _whole(self.samples, 0):
            raise ProbeError(f"attention_maps samples must be a whole number >= 0 (got {self.samples!r}); default 2")
        if not _whole(self.bins, 1, MAX_BINS):
            raise ProbeError(
                f"attention_maps bins must be a whole number from 1 to {MAX_BINS} (got {self.bins!r}); default 16"
            )
        self.samples, self.bins = int(self.samples), int(self.bins)

    def params(self) -> dict[str, Any]:
        return {"samples": self.samples, "bins": self.bins}

    # -- hooks -------------------------------------------------------------------------------
    def begin(self, batch: Batch) -> None:
        self._batch = batch
        self._rows = None
        self._pending.clear()

    def update_qk(self, view: QKView) -> None:
        """Learn each row's sample and length from the first attention call of a forward."""
        whole = view.query.shape[2] == view.key.shape[2]
        self._whole[view.layer] = whole
        if not whole or self._rows is not None:
            return
        lengths = view.query_valid.sum(dim=1).tolist()
        rows: list = []
        for b, length in enumerate(lengths):
            sample = self._batch.index(b) if self._batch is not None else self._next_sample + b
            rows.append((sample, int(length)) if sample < self.samples and length > 0 else None)
        self._rows = rows

    def update(self, block: Block) -> None:
        if not self._rows or not self._whole.get(block.layer, False) or not any(self._rows):
            return
        probs = block.probs  # [B, H, bq, bk]
        rel_q, rel_k = block.rel_q(), block.rel_k()  # [B, bq], [B, bk]
        for b, row in enumerate(self._rows):
            if row is None:
                continue
            _, length = row
            n = min(self.bins, length)
            r_bin = bin_index(rel_q[b], length, n)
            r_bin = torch.where(block.query_valid[b], r_bin, torch.full_like(r_bin, -1))
            present = r_bin[r_bin >= 0]
            if present.numel() == 0:
                continue
            lo, hi = int(present.min()), int(present.max())
            # one-hot over the bins this block's rows fall in ([k, bq]) and over every bin ([bk, n])
            rows_onehot = (r_bin[None, :] == torch.arange(lo, hi + 1, device=r_bin.device)[:, None]).to(probs.dtype)
            c_bin = bin_index(rel_k[b], length, n)
            cols_onehot = (c_bin[:, None] == torch.arange(n, device=c_bin.device)[None, :]).to(probs.dtype)
            pooled = torch.matmul(torch.matmul(rows_onehot, probs[b]), cols_onehot)  # [H, k, n]
            key = (b, block.layer)
            acc = self._pending.get(key)
            if acc is None:
                acc = self._pending[key] = torch.zeros(probs.shape[1], n, n, dtype=torch.float64, device=probs.device)
            acc[:, lo : hi + 1] += pooled.to(torch.float64)

    def commit(self) -> None:
        rows, self._rows = self._rows, None
        batch, self._batch = self._batch, None
        pending, self._pending = self._pending, {}
        self._whole = {}
        if rows is None:
            return
        for (b, layer), sums in sorted(pending.items()):
            sample, length = rows[b]
            n = min(self.bins, length)
            sizes = bin_sizes(length, n).astype(np.float64)
            mean = sums.cpu().numpy() / (sizes[:, None] * sizes[None, :])[None]
            self._maps.setdefault(sample, (length, {}))[1][int(layer)] = mean
        count = len(batch.samples) if batch is not None else len(rows)
        first = batch.first if batch is not None else self._next_sample
        self._next_sample = max(self._next_sample, first + count)

    # -- results -----------------------------------------------------------------------------
    def maps(self) -> dict[int, tuple[int, dict[int, np.ndarray]]]:
        """sample -> (length, {layer: [heads, n, n] mean probabilities}), committed inputs only."""
        return {s: (length, dict(sorted(layers.items()))) for s, (length, layers) in sorted(self._maps.items())}

    def map_frame(self) -> pd.DataFrame:
        """Rows of ``maps.parquet``: ``sample, layer, head, row_bin, col_bin, length, value``."""
        parts = []
        for sample, (length, layers) in self.maps().items():
            for layer, grid in layers.items():
                heads, n, _ = grid.shape
                h, r, c = np.meshgrid(np.arange(heads), np.arange(n), np.arange(n), indexing="ij")
                parts.append(
                    {
                        "sample": np.full(h.size, sample, dtype=np.int64),
                        "layer": np.full(h.size, layer, dtype=np.int64),
                        "head": h.reshape(-1).astype(np.int64),
                        "row_bin": r.reshape(-1).astype(np.int64),
                        "col_bin": c.reshape(-1).astype(np.int64),
                        "length": np.full(h.size, length, dtype=np.int64),
                        "value": grid.reshape(-1).astype(np.float64),
                    }
                )
        if not parts:
            return pd.DataFrame({c: pd.Series(dtype="float64" if c == "value" else "int64") for c in MAP_COLUMNS})
        return pd.DataFrame({c: np.concatenate([p[c] for p in parts]) for c in MAP_COLUMNS})

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """``next_sample``, ``samples`` [n], ``lengths`` [n] and per sample s and layer l ``map.s.l``."""
        maps = self.maps()
        state = {
            "next_sample": np.array(self._next_sample, dtype=np.int64),
            "samples": np.array(list(maps), dtype=np.int64),
            "lengths": np.array([length for length, _ in maps.values()], dtype=np.int64),
        }
        for sample, (_, layers) in maps.items():
            for layer, grid in layers.items():
                state[f"map.{sample}.{layer}"] = grid.copy()
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        try:
            samples = [int(x) for x in np.asarray(state["samples"]).reshape(-1)]
            lengths = [int(x) for x in np.asarray(state["lengths"]).reshape(-1)]
            nxt = int(np.asarray(state["next_sample"]))
            if len(samples) != len(lengths):
                raise ValueError("'samples' and 'lengths' differ in length")
            maps: dict = {}
            for sample, length in zip(samples, lengths, strict=True):
                n = min(self.bins, length)
                layers = {}
                prefix = f"map.{sample}."
                for key, value in state.items():
                    if key.startswith(prefix):
                        grid = np.array(value, dtype=np.float64)
                        if grid.ndim != 3 or grid.shape[1:] != (n, n):
                            raise ValueError(f"map {key} has shape {grid.shape}, expected [heads, {n}, {n}]")
                        layers[int(key[len(prefix) :])] = grid
                maps[sample] = (length, layers)
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"not a state of probe {self.name}: {exc}") from exc
        self._maps = maps
        self._next_sample = nxt
        self._rows, self._batch, self._pending, self._whole = None, None, {}, {}
