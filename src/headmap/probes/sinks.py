"""``sinks``: tokens that collect attention (primary, secondary and hidden sinks), their lifetime and norms.

With received[l](j) as in ``received`` (mean over heads and over the real queries i != j that
see j of A[i, j]) and received_h[l](j) the same for one head h, for an input of T tokens:

    threshold  = max(tau, ratio / T)                      (tau = 0.2, ratio = 10: 10x the uniform share)
    sink       : received[l](j) >= threshold              (primary at j = 0, secondary at j != 0)
    hidden sink: j != 0, not a sink at l, and received_h[l](j) >= threshold for some head h

The lifetime of a token is its longest run of consecutive layers where it is a (primary or
secondary) sink. For every token that is a sink of any kind at some layer, the probe records
the l2 norm of its hidden state at every layer, ||x_l(j)||, where x_l = ``hidden_states[l]`` is
the residual stream entering layer l, and the ratio of that norm to the median norm of the
input's real tokens at that layer (sinks tend to carry massive activations).

Papers: "On the Existence and Behaviour of Secondary Attention Sinks" (sinks beyond the first
token, with their layer span and norms); Yu et al. 2024, "Unveiling and Harnessing Hidden
Attention Sinks" (ACT: sinks that show in single heads, not in the head average); Sun et al. 2024,
"Massive Activations in Large Language Models" (sink tokens carry huge hidden-state values).
See docs/methods/sinks.md for the choices made here. ``Needs(hidden_norms=True)``: ``end(batch, outputs)``
reads ``outputs.hidden_norms`` (the norms a scan records with layer hooks) or, when absent,
``outputs.hidden_states`` (a forward with ``output_hidden_states=True``).
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

from ..corpus import Batch
from ..engine.block import Block
from ..errors import ProbeError
from .base import Needs
from .received import add_received, received_matrix
from .token import Pending, Row, TokenProbe, add_columns, piece

#: rows of hidden states turned into float64 at a time when taking norms
_NORM_ROWS = 1024


def _real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def first_tokens(lengths: np.ndarray) -> np.ndarray:
    """[sum T] bool: True at position 0 of every input."""
    lengths = np.asarray(lengths, dtype=np.int64)
    out = np.zeros(int(lengths.sum()), dtype=bool)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else lengths
    out[starts[lengths > 0]] = True
    return out


def longest_run(flags: np.ndarray, layers: np.ndarray) -> np.ndarray:
    """Per token (columns), the longest run of True over consecutive layer indices (rows)."""
    best = np.zeros(flags.shape[1], dtype=np.int64)
    run = np.zeros(flags.shape[1], dtype=np.int64)
    prev = None
    for i, layer in enumerate(layers):
        if prev is not None and layer != prev + 1:
            run[:] = 0
        run = np.where(flags[i], run + 1, 0)
        best = np.maximum(best, run)
        prev = layer
    return best


@dataclass
class SinksProbe(TokenProbe):
    #: absolute threshold on received attention
    tau: float = 0.2
    #: relative threshold, in multiples of the uniform share 1 / T
    ratio: float = 10.0

    name = "sinks"
    needs = Needs(hidden_norms=True)
    chunk_keys = ("layers", "received", "head_max")

    _awaiting: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not _real(self.tau) or not 0.0 < self.tau <= 1.0:
            raise ProbeError(f"sinks tau must be a number in (0, 1] (got {self.tau!r}); the default is 0.2")
        if not _real(self.ratio) or self.ratio < 0:
            raise ProbeError(f"sinks ratio must be a number >= 0 (got {self.ratio!r}); the default is 10")
        self.tau, self.ratio = float(self.tau), float(self.ratio)

    def params(self) -> dict[str, Any]:
        return {"tau": self.tau, "ratio": self.ratio}

    # -- accumulation ------------------------------------------------------------------------
    def _update_block(self, block: Block, pend: Pending) -> None:
        # Per-head sums of one layer at a time (layers come one after the other): folded into the
        # per-token max over heads when the next layer starts, so no [L, B, H, T] array exists.
        open_layer = pend.extra.get("open")
        if open_layer is not None and open_layer[0] != block.layer:
            self._fold(pend)
        if block.layer in pend.extra.setdefault("folded", set()):
            raise ProbeError(
                f"sinks: the attention of layer {block.layer} came in two separate passes; sinks reads one "
                "forward pass per batch"
            )
        mass = add_received(block, pend)  # [B, H, bk]
        store = pend.extra.setdefault("open", (block.layer, {}))[1]
        add_columns(store, "per_head", int(block.k_pos[0]), mass)

    def _fold(self, pend: Pending) -> None:
        layer, store = pend.extra.pop("open")
        per_head = store["per_head"]  # [B, H, N]
        pend.sums[layer]["head_max"] = per_head.max(dim=1).values
        pend.extra["folded"].add(layer)

    def _close(self, rows: list[Row], pend: Pending) -> dict[str, np.ndarray]:
        if "open" in pend.extra:
            self._fold(pend)
        layers, received = received_matrix(rows, pend)
        _, head_max = received_matrix(rows, pend, key="head_max")
        self._awaiting = (len(self._chunks), [r.start for r in rows])
        return {"layers": layers, "received": received, "head_max": head_max}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        super().load_state_dict(state)
        self._awaiting = None

    # -- hidden states -----------------------------------------------------------------------
    def end(self, batch: Batch, outputs: Any) -> None:
        """Norms of every token's hidden state entering each layer, and their per-input medians."""
        waiting, self._awaiting = self._awaiting, None
        if waiting is None:
            return
        index, starts = waiting
        chunk = self._chunks[index]
        if batch is not None and [batch.index(b) for b in range(len(batch.samples))] != chunk["sample"].tolist():
            raise ProbeError("sinks: end() got another batch than the forward pass that was just committed")
        given = getattr(outputs, "hidden_norms", None)  # a scan's per-layer norms, [B, W] float64 each
        states = given if given is not None else getattr(outputs, "hidden_states", None)
        if states is None and isinstance(outputs, Mapping):
            states = outputs.get("hidden_states")
        if states is None:
            raise ProbeError("sinks needs the hidden states: run the forward pass with output_hidden_states=True")
        layers = chunk["layers"]
        n_layers = int(layers.max()) + 1 if len(layers) else 0
        if len(states) != n_layers + 1:
            raise ProbeError(
                f"sinks: the model returned {len(states)} hidden states for {n_layers} attention layers "
                f"(expected {n_layers + 1}: the embeddings and one per layer)"
            )
        lengths = chunk["length"]
        norms = np.full((len(layers), int(lengths.sum())), np.nan)
        medians = np.full((len(lengths), len(layers)), np.nan)
        for li, layer in enumerate(layers):
            state = states[int(layer)]
            full = state.cpu().numpy() if given is not None else _row_norms(state)  # [B, W] float64
            at = 0
            for b, (start, length) in enumerate(zip(starts, lengths, strict=True)):
                part = full[b, start : start + length]
                norms[li, at : at + length] = part
                if length:
                    medians[b, li] = np.median(part)
                at += length
        updated = dict(chunk)
        updated["norm"] = norms
        updated["median"] = medians
        for key in ("norm", "median"):
            updated[key].flags.writeable = False
        self._chunks[index] = updated

    # -- output ------------------------------------------------------------------------------
    def _flags(self, chunk: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(threshold [sum T], average-sink [L, sum T], hidden-sink [L, sum T]) of a committed batch."""
        lengths = chunk["length"]
        threshold = np.repeat(np.maximum(self.tau, self.ratio / np.maximum(lengths, 1)), lengths)
        received, head_max = chunk["received"], chunk["head_max"]
        with np.errstate(invalid="ignore"):
            sink = np.isfinite(received) & (received >= threshold)
            hidden = ~sink & np.isfinite(head_max) & (head_max >= threshold)
        hidden[:, first_tokens(lengths)] = False  # position 0 is the primary sink's place, not a hidden one
        return threshold, sink, hidden

    def _pieces(self, chunk: Mapping[str, np.ndarray]) -> list[dict]:
        _, sink, hidden = self._flags(chunk)
        layers = chunk["layers"]
        received, head_max = chunk["received"], chunk["head_max"]
        zero = first_tokens(chunk["length"])
        out = []
        for i, layer in enumerate(layers):
            out.append(piece(chunk, "primary_sink", int(layer), received[i], keep=sink[i] & zero))
            out.append(piece(chunk, "secondary_sink", int(layer), received[i], keep=sink[i] & ~zero))
            out.append(piece(chunk, "hidden_sink", int(layer), head_max[i], keep=hidden[i]))
        lifetime = longest_run(sink, layers)
        out.append(piece(chunk, "sink_lifetime", -1, lifetime.astype(np.float64), keep=lifetime > 0))
        if "norm" in chunk:
            flagged = sink.any(axis=0) | hidden.any(axis=0)
            median = np.repeat(chunk["median"], chunk["length"], axis=0).T  # [L, sum T]
            for i, layer in enumerate(layers):
                norm = chunk["norm"][i]
                out.append(piece(chunk, "sink_norm", int(layer), norm, keep=flagged))
                with np.errstate(invalid="ignore", divide="ignore"):
                    ratio = np.where(median[i] > 0, norm / np.where(median[i] > 0, median[i], 1.0), np.nan)
                out.append(piece(chunk, "sink_norm_ratio", int(layer), ratio, keep=flagged))
        return out

    def medians(self) -> pd.DataFrame:
        """Median hidden-state norm of each input's real tokens per layer: ``sample, layer, median_norm``."""
        parts = []
        for chunk in self._chunks:
            if "median" not in chunk:
                continue
            n, n_layers = chunk["median"].shape
            parts.append(
                pd.DataFrame(
                    {
                        "sample": np.repeat(chunk["sample"], n_layers),
                        "layer": np.tile(chunk["layers"], n),
                        "median_norm": chunk["median"].reshape(-1),
                    }
                )
            )
        if not parts:
            return pd.DataFrame({"sample": [], "layer": [], "median_norm": []})
        return pd.concat(parts, ignore_index=True)


def _row_norms(states: torch.Tensor) -> np.ndarray:
    """[B, W] float64 l2 norms of a [B, W, d] hidden-state tensor, a slab of rows at a time."""
    batch, width = states.shape[0], states.shape[1]
    out = torch.empty(batch, width, dtype=torch.float64, device=states.device)
    for a in range(0, width, _NORM_ROWS):
        slab = states[:, a : a + _NORM_ROWS].to(torch.float64)
        out[:, a : a + _NORM_ROWS] = torch.linalg.vector_norm(slab, dim=-1)
    return out.cpu().numpy()
