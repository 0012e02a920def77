"""``position_profile``: attention from the final query to each of k items, by item position.

For an input made of k items (retrieved documents, few-shot examples) in order, item m the
token span [s_m, e_m) and t = T - 1 the input's last real token:

    item_m[l, h]           = mean over inputs of sum_{j in [s_m, e_m)} A[t, j]        (m = 0 .. k - 1)
    position_profile[l, h] = mean over inputs of ( (item_0 + item_{k-1}) / 2 - mean(item_1 .. item_{k-2}) )

The second is the depth of the "attention basin" (k >= 3 only): positive when the head puts
more attention on the first and last items than on the middle ones, 0 for a flat profile.
Items come from each sample's ``info["items"]`` (the built-in ``items`` corpus); every input
of a run must have the same k.

Yi et al. 2025, "Attention Basin: Why Contextual Position Matters in Large Language Models"
(AttnRank). See docs/methods/position_profile.md for where this reading differs from theirs.

Only the last query row of each input is read: the probe picks that row out of the block
before any reduction, so its cost does not grow with the number of rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..corpus import Batch
from ..engine.block import Block
from ..errors import ProbeError
from .base import Needs, Probe
from .head import HeadStats
from .span import seen_lengths, token_span

#: Name of the basin-depth metric (the probe's own name); items are ``item_0`` ... ``item_{k-1}``.
BASIN = "position_profile"


def metric_names(k: int) -> list[str]:
    """The metrics of a run on k items, in the order of the probe's state arrays."""
    return [f"item_{m}" for m in range(k)] + ([BASIN] if k >= 3 else [])


@dataclass
class PositionProfileProbe(Probe):
    """Per head: attention mass from the last token to each item, and the basin depth."""

    name = "position_profile"
    needs = Needs(corpus="items", default_corpus="items", causal=True)

    # committed: per layer, one HeadStats per metric (``metric_names(k)``)
    _stats: dict[int, list[HeadStats]] = field(default_factory=dict, init=False, repr=False)
    _k: int | None = field(default=None, init=False, repr=False)
    # per batch (from ``begin``): item bounds [B, k, 2], lengths [B], corpus index of row 0
    _items: torch.Tensor | None = field(default=None, init=False, repr=False)
    _lengths: torch.Tensor | None = field(default=None, init=False, repr=False)
    _first: int = field(default=0, init=False, repr=False)
    _on_device: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False)
    # pending, per layer: [mass [B, H, k] float64, rows found [B] long, kv_heads]
    _pending: dict[int, list] = field(default_factory=dict, init=False, repr=False)
    _seen: torch.Tensor | None = field(default=None, init=False, repr=False)

    @property
    def k(self) -> int | None:
        """Number of items per input (None until the first batch or a loaded state says)."""
        return self._k

    # -- items of one input ----------------------------------------------------------------

    def items_of(self, sample: Any, index: int) -> list[tuple[int, int]]:
        """The item spans of one sample, checked; ProbeError naming input ``index`` if they are wrong."""
        ids = getattr(sample, "ids", None)
        length = len(ids) if ids is not None else 0
        info = getattr(sample, "info", None) or {}
        if "items" not in info:
            raise ProbeError(
                f"position_profile: input {index} says nothing about items (no 'items' in its info); it reads "
                "inputs made of several items (documents, examples): use the 'items' corpus (--corpus items)"
            )
        raw = info["items"]
        spans = [token_span(x) for x in raw] if isinstance(raw, (list, tuple)) else [None]
        if not spans or any(s is None for s in spans):
            raise ProbeError(
                f"position_profile: 'items' of input {index} must be a non-empty list of [start, end] token spans "
                f"(got {raw!r}); fix the corpus"
            )
        if "k" in info and info["k"] != len(spans):
            raise ProbeError(
                f"position_profile: input {index} says k = {info['k']!r} but lists {len(spans)} item spans; "
                "fix the corpus"
            )
        previous_end = 0
        for m, (start, end) in enumerate(spans):
            if not (previous_end <= start < end <= length):
                raise ProbeError(
                    f"position_profile: item {m} of input {index} is [{start}, {end}); items must be non-empty, in "
                    f"order, not overlapping and inside the input's {length} tokens (positions 0 to {length - 1}, "
                    "padding excluded); fix the corpus"
                )
            previous_end = end
        return spans

    def _check_k(self, k: int, index: int) -> None:
        if self._k is not None and k != self._k:
            raise ProbeError(
                f"position_profile needs the same number of items in every input: input {index} has {k} items "
                f"but the run has {self._k}; build the corpus with one k (e.g. --corpus items with one item count)"
            )

    def applies_to(self, samples: Any) -> str | None:
        """None when every sample lists its items and all have the same k; else why not."""
        k = self._k
        for index, sample in enumerate(getattr(samples, "samples", samples)):
            try:
                n = len(self.items_of(sample, index))
                if k is not None and n != k:
                    raise ProbeError(
                        f"position_profile needs the same number of items in every input: input {index} has {n} "
                        f"items but input 0 has {k}; build the corpus with one k"
                    )
                k = n
            except ProbeError as exc:
                return str(exc)
        return None

    # -- hooks -----------------------------------------------------------------------------

    def begin(self, batch: Batch) -> None:
        """Read the items of every input of the next forward call; all must have the run's k."""
        rows = []
        for b, sample in enumerate(batch.samples):
            spans = self.items_of(sample, batch.index(b))
            if rows and len(spans) != len(rows[0]):
                raise ProbeError(
                    f"position_profile needs the same number of items in every input: input {batch.index(b)} has "
                    f"{len(spans)} items but input {batch.index(0)} has {len(rows[0])}; build the corpus with one k"
                )
            self._check_k(len(spans), batch.index(b))
            rows.append(spans)
        if rows:
            self._k = len(rows[0])
        self._items = torch.tensor(rows, dtype=torch.long).reshape(len(rows), -1, 2)
        self._lengths = torch.tensor([len(s.ids) for s in batch.samples], dtype=torch.long)
        self._first = batch.first
        self._on_device = None

    def _tensors(self, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
        if self._items is None:
            raise ProbeError(
                "position_profile reads the items of each input, and no batch was announced: call "
                "probe.begin(Batch(...)) with the samples before each forward pass (headmap.scan does)"
            )
        batch = block.probs.shape[0]
        if self._items.shape[0] != batch:
            rows = self._items.shape[0]
            self._clear()
            raise ProbeError(
                f"position_profile: begin() announced {rows} inputs but the forward pass has {batch} batch rows; "
                "call begin(batch) with the samples of each forward pass, in batch order"
            )
        device = block.probs.device
        if self._on_device is None or self._on_device[0].device != device:
            self._on_device = (self._items.to(device), self._lengths.to(device))
        return self._on_device

    def update(self, block: Block) -> None:
        items, lengths = self._tensors(block)  # [B, k, 2], [B]
        probs = block.probs  # [B, H, bq, bk]; hidden entries are 0
        batch, heads, rows, keys = probs.shape
        # the block row of each input's last real token (absolute position item_start + T - 1)
        row = block.item_start + lengths - 1 - block.q_pos[0]  # [B]
        here = (row >= 0) & (row < rows)
        index = row.clamp(0, rows - 1).view(batch, 1, 1, 1).expand(batch, heads, 1, keys)
        last = probs.gather(2, index)[:, :, 0, :].to(torch.float64)  # [B, H, bk]: only that row
        here = here & block.query_valid.gather(1, row.clamp(0, rows - 1)[:, None])[:, 0]
        rel_k = block.rel_k()[:, None, :]  # [B, 1, bk]
        member = (rel_k >= items[:, :, 0:1]) & (rel_k < items[:, :, 1:2])  # [B, k, bk]
        mass = torch.einsum("bhj,bmj->bhm", last, member.to(torch.float64)) * here[:, None, None]
        slot = self._pending.get(block.layer)
        if slot is None:
            self._pending[block.layer] = [mass, here.long(), block.num_kv_heads]
        else:
            slot[0] += mass
            slot[1] += here.long()
        seen = seen_lengths(block)
        self._seen = seen if self._seen is None else torch.maximum(self._seen, seen)

    def commit(self) -> None:
        pending, self._pending = self._pending, {}
        seen, self._seen = self._seen, None
        lengths, first = self._lengths, self._first
        self._clear()
        if not pending:
            return
        expected = lengths.tolist()
        for b, real in enumerate(seen.tolist()):
            if real != expected[b]:
                raise ProbeError(
                    f"position_profile: begin() said input {first + b} has {expected[b]} tokens but batch row {b} of "
                    f"the forward pass had {real} real tokens; call begin(batch) with the samples of each forward "
                    "pass, in batch order"
                )
        for layer, (_, found, _) in pending.items():
            if bool((found != 1).any()):
                raise ProbeError(
                    f"position_profile: layer {layer} did not show the last token of every input exactly once; "
                    "it reads full forward passes (no cached decoding steps)"
                )
        k = self._k
        for layer, (mass, _, kv_heads) in pending.items():
            values = mass.cpu().numpy()  # [B, H, k]
            per_metric = [values[:, :, m] for m in range(k)]
            if k >= 3:
                edges = (values[:, :, 0] + values[:, :, k - 1]) / 2
                per_metric.append(edges - values[:, :, 1 : k - 1].mean(axis=-1))
            stats = self._stats.get(layer)
            if stats is None:
                stats = self._stats[layer] = [HeadStats.empty(values.shape[1], kv_heads) for _ in per_metric]
            for s, v in zip(stats, per_metric, strict=True):
                s.add(v)

    def _clear(self) -> None:
        self._items = None
        self._lengths = None
        self._first = 0
        self._on_device = None

    # -- results ---------------------------------------------------------------------------

    def result(self) -> dict[int, dict[str, HeadStats]]:
        """Committed statistics by layer, then by metric (commits pending inputs first)."""
        self.commit()
        names = metric_names(self._k or 0)
        return {layer: dict(zip(names, self._stats[layer], strict=True)) for layer in sorted(self._stats)}

    def head_rows(self) -> list[dict[str, Any]]:
        rows = []
        for layer, by_metric in self.result().items():
            for metric, stats in by_metric.items():
                group = len(stats.total) // stats.kv_heads
                for head, (value, se, n) in enumerate(zip(stats.mean(), stats.stderr(), stats.count, strict=True)):
                    rows.append(
                        {
                            "probe": self.name,
                            "metric": metric,
                            "layer": int(layer),
                            "head": head,
                            "kv_head": head // group,
                            "value": float(value),
                            "stderr": float(se) if not math.isnan(se) else math.nan,
                            "n": int(n),
                        }
                    )
        return rows

    def values(self, metric: str = BASIN) -> np.ndarray:
        """[layers, heads] mean of one metric (``item_m`` or ``position_profile``); NaN where unseen."""
        res = self.result()
        if not res:
            return np.zeros((0, 0))
        names = metric_names(self._k or 0)
        if metric not in names:
            raise ProbeError(f"position_profile has no metric {metric!r} for k = {self._k}; choose from {names}")
        heads = max(len(s[metric].total) for s in res.values())
        out = np.full((max(res) + 1, heads), np.nan)
        for layer, by_metric in res.items():
            out[layer, : len(by_metric[metric].total)] = by_metric[metric].mean()
        return out

    def merge(self, other: PositionProfileProbe) -> None:
        """Add another probe's committed totals (same k)."""
        if other._k is not None:
            self._check_k(other._k, 0)
            self._k = other._k
        for layer, stats in other._stats.items():
            mine = self._stats.get(layer)
            if mine is None:
                self._stats[layer] = [s.copy() for s in stats]
            else:
                for a, b in zip(mine, stats, strict=True):
                    a.merge(b)

    def state_dict(self) -> dict[str, np.ndarray]:
        """``k``, ``layers``, ``kv_heads`` and per layer L ``total.L``, ``total_sq.L``, ``count.L`` ([metrics, H]).

        Metrics are in the order of ``metric_names(k)``; ``k`` is 0 before any input was seen.
        """
        layers = sorted(self._stats)
        state = {
            "k": np.array([self._k or 0], dtype=np.int64),
            "layers": np.array(layers, dtype=np.int64),
            "kv_heads": np.array([self._stats[layer][0].kv_heads for layer in layers], dtype=np.int64),
        }
        for layer in layers:
            stats = self._stats[layer]
            state[f"total.{layer}"] = np.stack([s.total for s in stats])
            state[f"total_sq.{layer}"] = np.stack([s.total_sq for s in stats])
            state[f"count.{layer}"] = np.stack([s.count for s in stats])
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the committed totals (and k) by a :meth:`state_dict`; drops anything pending."""
        try:
            k = int(np.asarray(state["k"]).reshape(-1)[0])
            layers = [int(x) for x in np.asarray(state["layers"]).reshape(-1)]
            kv = [int(x) for x in np.asarray(state["kv_heads"]).reshape(-1)]
            if k < 0 or len(kv) != len(layers):
                raise ValueError("bad 'k', or 'layers' and 'kv_heads' differ in length")
            metrics = len(metric_names(k))
            loaded: dict[int, list[HeadStats]] = {}
            for layer, kv_heads in zip(layers, kv, strict=True):
                total = np.array(state[f"total.{layer}"], dtype=np.float64)
                total_sq = np.array(state[f"total_sq.{layer}"], dtype=np.float64)
                count = np.array(state[f"count.{layer}"], dtype=np.int64)
                if not (total.shape == total_sq.shape == count.shape) or total.ndim != 2 or len(total) != metrics:
                    raise ValueError(f"layer {layer}: arrays of different shapes or not {metrics} metrics for k = {k}")
                if kv_heads < 1 or total.shape[1] % kv_heads:
                    raise ValueError(f"layer {layer}: bad kv_heads")
                loaded[layer] = [
                    HeadStats(total[m].copy(), total_sq[m].copy(), count[m].copy(), kv_heads) for m in range(metrics)
                ]
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            raise ValueError(f"not a state of probe {self.name}: {exc}") from exc
        self._pending.clear()
        self._seen = None
        self._clear()
        self._stats = loaded
        self._k = k or None
