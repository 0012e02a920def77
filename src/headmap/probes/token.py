"""Token-level probes: :class:`TokenProbe` and the machinery it shares with its subclasses.

A token probe keeps, per input, arrays over the input's positions (one per layer at most), never
a T x T array: per-column sums of each forward (:class:`Pending`, grown with :func:`add_columns`)
are closed per input (:class:`Row`) at ``commit`` into read-only records that become the rows of
``tokens.parquet`` (:data:`TOKEN_COLUMNS`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from ..corpus import Batch
from ..engine.block import Block
from ..errors import ProbeError
from .base import Probe

#: Columns of a probe's token frame (the scan adds ``token``).
TOKEN_COLUMNS = ["sample", "position", "token_id", "metric", "layer", "value"]


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
        """The forward's pending rows, updated with ``block``. Under a device map the layers sit on several
        devices: the pending state stays on the first layer's device and each later block's tensors are
        moved there (a no-op on one device) before they are compared or combined."""
        rows = block.query_valid.shape[0]
        pend = self._pending
        if pend is None:
            start = block.item_start.to(torch.long).clone()
            last = torch.full_like(start, -1)
            pend = self._pending = Pending(rows, start, last)
        elif pend.rows != rows or not torch.equal(
            pend.item_start, block.item_start.to(device=pend.item_start.device, dtype=torch.long)
        ):
            raise ProbeError(
                f"{self.name} reads one forward pass per batch of inputs; a second forward came before the "
                "commit (generation or a manual commit): commit after every forward"
            )
        home = pend.last.device
        valid, q_pos = block.query_valid.to(home), block.q_pos.to(device=home, dtype=torch.long)
        q = torch.where(valid, q_pos[None, :], torch.full_like(pend.last[:, None], -1))
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
