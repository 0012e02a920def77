"""``received``: the attention each token receives, per layer.

    received[l](j) = 1/H * sum_h ( 1/|Q(j)| * sum_{i in Q(j)} A_h[i, j] )

Q(j) is the set of real queries i != j that can see key j under the layer's mask: i > j in a
causal model without a window, every other token of the input in an encoder. The value is the
mean attention weight token j gets from the queries that could attend to it, averaged over the
query heads of the layer. The row with layer = -1 is the mean of received[l](j) over layers.
Tokens no query can see (the last token of a causal input) have no value and get no row.

This is the basis of attention sinks (``sinks``) and of Future Attention Influence (``fai``);
see docs/methods/received.md.

The module also holds :class:`TokenProbe`, the base of the token-level probes: per input it keeps
arrays over the input's positions (one per layer at most), never a T x T array.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from ..engine.block import Block
from ..errors import ProbeError
from .base import Batch, Probe

#: Columns of a probe's token frame (the scan adds ``token``).
TOKEN_COLUMNS = ["sample", "position", "token_id", "metric", "layer", "value"]


# -- shared machinery of token probes ----------------------------------------------------------


@dataclass
class Pending:
    """What one forward pass left, before :meth:`TokenProbe.commit`.

    Per layer, sums over key columns in the call's key space (``k_pos``): ``sums[layer][name]``
    is a [B, ..., N] tensor on the model's device, N growing with the columns seen.
    """

    rows: int
    item_start: torch.Tensor  # [B] long: absolute position of each input's token 0
    last: torch.Tensor  # [B] long: last real query position (-1: none yet)
    sums: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    heads: dict[int, int] = field(default_factory=dict)  # heads counted per layer
    layers: set[int] = field(default_factory=set)  # every layer seen
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    """One input of a committed batch."""

    sample: int
    start: int  # column of token 0 in the batch (absolute key position)
    length: int
    ids: np.ndarray  # [T] int64, -1 where the probe was not told the ids


def add_columns(store: dict[str, torch.Tensor], key: str, start: int, values: torch.Tensor) -> None:
    """``store[key][..., start:start + n] += values`` with the buffer grown (zero-filled) as needed.

    Causal blocks reach one key further each time: the buffer at least doubles when it grows, so
    the copies cost O(T) per layer, not O(T x blocks). Columns past the keys stay zero.
    """
    end = start + values.shape[-1]
    buf = store.get(key)
    if buf is None or buf.shape[-1] < end:
        width = end if buf is None else max(end, 2 * buf.shape[-1])
        grown = values.new_zeros((*values.shape[:-1], width))
        if buf is not None:
            grown[..., : buf.shape[-1]] = buf
        store[key] = buf = grown
    buf[..., start:end] += values


def take(arr: np.ndarray, row: Row, b: int) -> np.ndarray:
    """Positions 0..T-1 of batch row ``b`` from a [B, N] array over key columns (zeros past N)."""
    out = np.zeros(row.length, dtype=arr.dtype)
    part = arr[b, row.start : row.start + row.length]
    out[: len(part)] = part
    return out


def positions(lengths: np.ndarray) -> np.ndarray:
    """0..T_b-1 for each input, concatenated."""
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else np.zeros(0, np.int64)
    return np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(offsets, lengths)


def frame(columns: list[dict[str, np.ndarray]]) -> pd.DataFrame:
    """One DataFrame (TOKEN_COLUMNS, fixed dtypes) from pieces of column arrays."""
    dtypes = {"sample": "int64", "position": "int64", "token_id": "int64", "layer": "int64", "value": "float64"}
    if not columns:
        return pd.DataFrame({c: pd.Series(dtype=dtypes.get(c, "object")) for c in TOKEN_COLUMNS})
    data = {c: np.concatenate([np.asarray(p[c]) for p in columns]) for c in TOKEN_COLUMNS}
    out = pd.DataFrame(data)
    return out.astype({**dtypes, "metric": "object"})


def piece(chunk: Mapping[str, np.ndarray], metric: str, layer: int, values: np.ndarray, keep=None) -> dict:
    """Rows of one metric and layer for every token of a chunk where ``values`` is finite (and ``keep``)."""
    ok = np.isfinite(values)
    if keep is not None:
        ok &= keep
    n = int(ok.sum())
    return {
        "sample": np.repeat(chunk["sample"], chunk["length"])[ok],
        "position": positions(chunk["length"])[ok],
        "token_id": chunk["token_id"][ok],
        "metric": np.full(n, metric, dtype=object),
        "layer": np.full(n, layer, dtype=np.int64),
        "value": values[ok].astype(np.float64),
    }


def frozen(arr: np.ndarray) -> np.ndarray:
    arr = np.array(arr, copy=True)
    arr.flags.writeable = False
    return arr


@dataclass
class TokenProbe(Probe):
    """Base of token-level probes: arrays over each input's positions, committed per forward.

    A scan calls ``begin(batch)``, runs one forward pass, the session calls :meth:`commit`, and
    the scan calls ``end(batch, outputs)``. Row b of the forward is input ``batch.index(b)``; its
    position p is key column ``item_start[b] + p`` (left padding removed). Without ``begin``
    (``headmap.observe`` in a loop of one's own), inputs are numbered from 0 in the order seen and
    token ids are -1.

    Subclasses implement ``_update_block(block, pending)`` (add per-column sums with
    :func:`add_columns`), ``_close(rows, pending) -> dict of numpy arrays`` (the committed record of
    the batch, holding at least ``sample``, ``length``, ``token_id``) and ``_pieces(chunk)`` (rows of
    the token frame). Committed records are read-only and never change, so ``state_dict`` hands
    them out without copying.
    """

    _batch: Batch | None = field(default=None, init=False, repr=False)
    _pending: Pending | None = field(default=None, init=False, repr=False)
    _chunks: list[dict[str, np.ndarray]] = field(default_factory=list, init=False, repr=False)
    _next_sample: int = field(default=0, init=False, repr=False)

    #: arrays every committed record holds besides sample, length, token_id
    chunk_keys: ClassVar[tuple[str, ...]] = ()

    # -- hooks -------------------------------------------------------------------------------
    def begin(self, batch: Batch) -> None:
        self._batch = batch
        self._pending = None  # what a forward that raised may have left

    def update(self, block: Block) -> None:
        self._update_block(block, self._track(block))

    def commit(self) -> None:
        pend, self._pending = self._pending, None
        batch, self._batch = self._batch, None
        if pend is None:
            return
        rows = self._rows(pend, batch)
        chunk = self._close(rows, pend)
        chunk = {
            "sample": np.array([r.sample for r in rows], dtype=np.int64),
            "length": np.array([r.length for r in rows], dtype=np.int64),
            "token_id": np.concatenate([r.ids for r in rows]).astype(np.int64),
            **chunk,
        }
        self._chunks.append({k: frozen(v) for k, v in chunk.items()})
        self._next_sample = max(self._next_sample, max(r.sample for r in rows) + 1)

    def token_frame(self) -> pd.DataFrame:
        """Rows of tokens.parquet: ``sample, position, token_id, metric, layer, value`` (no NaN)."""
        out = frame([p for chunk in self._chunks for p in self._pieces(chunk)])
        return out.sort_values(["metric", "sample", "layer", "position"], kind="stable").reset_index(drop=True)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """``next_sample``, ``chunks`` and, per committed batch k, its arrays as ``k.<name>``."""
        state = {"next_sample": np.array(self._next_sample, dtype=np.int64), "chunks": np.array(len(self._chunks))}
        for k, chunk in enumerate(self._chunks):
            for name, arr in chunk.items():
                state[f"{k}.{name}"] = arr
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        try:
            count = int(np.asarray(state["chunks"]))
            nxt = int(np.asarray(state["next_sample"]))
            chunks = []
            for k in range(count):
                prefix = f"{k}."
                chunk = {
                    key[len(prefix) :]: frozen(np.asarray(v)) for key, v in state.items() if key.startswith(prefix)
                }
                missing = {"sample", "length", "token_id", *self.chunk_keys} - set(chunk)
                if missing:
                    raise KeyError(f"batch {k} lacks {', '.join(sorted(missing))}")
                if int(chunk["length"].sum()) != len(chunk["token_id"]) or len(chunk["length"]) != len(chunk["sample"]):
                    raise ValueError(f"batch {k}: lengths do not match the token ids")
                chunks.append(chunk)
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"not a state of probe {self.name}: {exc}") from exc
        self._chunks = chunks
        self._next_sample = nxt
        self._pending = None
        self._batch = None

    # -- helpers -----------------------------------------------------------------------------
    def _track(self, block: Block) -> Pending:
        rows = block.query_valid.shape[0]
        pend = self._pending
        if pend is None:
            start = block.item_start.to(torch.long).clone()
            last = torch.full_like(start, -1)
            pend = self._pending = Pending(rows, start, last)
        elif pend.rows != rows or not torch.equal(pend.item_start, block.item_start.to(torch.long)):
            raise ProbeError(
                f"{self.name} reads one forward pass per batch of inputs; a second forward came before the "
                "commit (generation or a manual commit): commit after every forward"
            )
        q = torch.where(block.query_valid, block.q_pos[None, :].to(torch.long), torch.full_like(pend.last[:, None], -1))
        torch.maximum(pend.last, q.max(dim=1).values, out=pend.last)
        pend.layers.add(block.layer)
        return pend

    def _rows(self, pend: Pending, batch: Batch | None) -> list[Row]:
        starts = pend.item_start.cpu().numpy()
        last = pend.last.cpu().numpy()
        if batch is not None and len(batch.samples) != pend.rows:
            raise ProbeError(
                f"{self.name}: begin() announced {len(batch.samples)} inputs but the forward pass had {pend.rows} rows"
            )
        rows = []
        for b in range(pend.rows):
            length = int(last[b] - starts[b] + 1) if last[b] >= 0 else 0
            if batch is not None:
                ids = np.asarray(batch.samples[b].ids, dtype=np.int64).reshape(-1)
                if len(ids) != length:
                    raise ProbeError(
                        f"{self.name}: input {batch.index(b)} has {len(ids)} token ids but the forward pass saw "
                        f"{length} real tokens in row {b}; call begin() with the batch of this very forward"
                    )
                sample = batch.index(b)
            else:
                ids = np.full(length, -1, dtype=np.int64)
                sample = self._next_sample + b
            rows.append(Row(sample, int(starts[b]), length, ids))
        return rows

    def _update_block(self, block: Block, pend: Pending) -> None:
        raise NotImplementedError

    def _close(self, rows: list[Row], pend: Pending) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _pieces(self, chunk: Mapping[str, np.ndarray]) -> list[dict]:
        raise NotImplementedError


def add_received(block: Block, pend: Pending) -> torch.Tensor:
    """Add the block's key_received mass (summed over heads) and count; return the per-head mass."""
    mass, count = block.key_received()  # [B, H, bk] float64, [B, bk] long
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

    No parameters. Its table holds one row per token and layer, so it is not in the default set.
    """

    name = "received"
    default = True
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
