"""What the engine hands to probes and edits: one block of complete attention rows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class Block:
    """A block of query rows of one attention call, with every key those rows can see.

    Rows are complete: ``[k_start, k_end)`` covers every key visible from rows
    ``[q_start, q_end)``, so a reduction over the last axis of ``probs`` is a reduction over the
    whole attention row. Positions (``q_pos``, ``k_pos``, ``item_start``) are absolute indices in
    the call's key space (cache positions); ``q_pos - item_start[b]`` is the position of a query
    inside input ``b`` once its left padding is removed.

    Attributes: ``layer``, ``module``, ``num_heads``, ``num_kv_heads``, ``q_start``, ``q_end``,
    ``k_start``, ``k_end``, ``q_pos`` [bq] long, ``k_pos`` [bk] long, ``query_valid`` [B, bq]
    bool (the query is a real token), ``item_start`` [B] long, ``probs`` [B, H, bq, bk] float32
    (set after the softmax), ``is_causal``, and ``mask`` (see below); ``tower`` (``text``,
    ``vision``, ``encoder``, ``decoder`` or ``cross``) and ``is_cross`` (the keys come from another
    sequence: positions of queries and keys are not comparable), by the rule of
    :mod:`headmap.engine.towers`.
    """

    def __init__(
        self,
        layer: int,
        module: nn.Module | None,
        num_heads: int,
        num_kv_heads: int,
        q_start: int,
        q_end: int,
        k_start: int,
        k_end: int,
        q_pos: torch.Tensor,
        k_pos: torch.Tensor,
        query_valid: torch.Tensor,
        item_start: torch.Tensor,
        probs: torch.Tensor | None = None,
        is_causal: bool = True,
        mask: torch.Tensor | None = None,
        mask_source: tuple[Any, Callable[[int, int], torch.Tensor]] | None = None,
        tower: str = "text",
        is_cross: bool = False,
    ) -> None:
        self.layer = layer
        self.module = module
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.q_start, self.q_end = q_start, q_end
        self.k_start, self.k_end = k_start, k_end
        self.q_pos, self.k_pos = q_pos, k_pos
        self.query_valid = query_valid
        self.item_start = item_start
        self.probs = probs
        #: [B, H, bq, bk] float32 logits after edits and the mask (hidden entries: a huge negative
        #: number, or -inf when some row sees no key), set with ``probs``; do not change them
        self.logits: torch.Tensor | None = None
        self.is_causal = is_causal
        self.tower = tower
        self.is_cross = is_cross
        # Either a mask given outright, or (plan, source) from the engine, where
        # ``source(a, b)`` builds the mask of key columns [a, b) only when someone reads it.
        self._mask = mask
        self.mask_source = mask_source
        #: Scratch space that readers of the same block share (e.g. :meth:`column_sums`).
        self.cache: dict[str, Any] = {}

    @property
    def plan(self) -> Any:
        """The engine's plan of this block (key span, masked column ranges), if it made one."""
        return self.mask_source[0] if self.mask_source is not None else None

    @property
    def mask(self) -> torch.Tensor | None:
        """[B, 1, bq, bk] bool, True = visible; None when every entry is visible."""
        if self._mask is None and self.mask_source is not None and self.mask_source[0].segments:
            self._mask = self.mask_source[1](0, self.k_end - self.k_start)
        return self._mask

    def mask_columns(self, a: int, b: int) -> torch.Tensor:
        """The mask of key columns [a, b) of the block (relative to ``k_start``)."""
        if self._mask is not None or self.mask_source is None:
            return self.visible()[..., a:b]
        return self.mask_source[1](a, b)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_head(self, head: int) -> int:
        """The key/value head that query head ``head`` reads (GQA/MQA)."""
        return head // self.group_size

    def visible(self) -> torch.Tensor:
        """[B, 1, bq, bk] bool mask, materialised (all True where ``mask`` is None)."""
        if self.mask is not None:
            return self.mask
        return torch.ones(
            (self.query_valid.shape[0], 1, self.q_end - self.q_start, self.k_end - self.k_start),
            dtype=torch.bool,
            device=self.q_pos.device,
        )

    def rel_q(self) -> torch.Tensor:
        """[B, bq] long: query positions inside each input (0 = its first real token)."""
        return self.q_pos[None, :] - self.item_start[:, None]

    def rel_k(self) -> torch.Tensor:
        """[B, bk] long: key positions inside each input."""
        return self.k_pos[None, :] - self.item_start[:, None]

    def hidden_segments(self) -> tuple[tuple[int, int], ...] | None:
        """Column ranges (relative to ``k_start``) that hold hidden entries; None when unknown."""
        if self._mask is not None or self.mask_source is None:
            return None
        return tuple(self.mask_source[0].segments)

    def row_counts(self) -> torch.Tensor:
        """[B, bq] long: |K(i)|, the number of keys each query row sees (cached per block).

        Only the columns that hold hidden entries are looked at (the rest are visible to every row).
        """
        hit = self.cache.get("row_counts")
        if hit is not None:
            return hit
        batch, rows, keys = self.query_valid.shape[0], self.q_end - self.q_start, self.k_end - self.k_start
        segments = self.hidden_segments()
        if segments is None:
            counts = self.visible()[:, 0].sum(dim=-1)
        else:
            counts = torch.full((batch, rows), keys, dtype=torch.long, device=self.q_pos.device)
            for a, b in segments:
                counts -= (~self.mask_columns(a, b)[:, 0]).sum(dim=-1)
        self.cache["row_counts"] = counts
        return counts

    def column_sums(
        self, probs: torch.Tensor | None = None, *, exclude_self: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per key column, the sum of ``probs`` over the block's real query rows, and how many of them see it.

        Returns ``(mass [B, H, bk] float64, count [B, bk] long)``: ``mass[b, h, j]`` is the sum over
        real query rows i of ``probs[b, h, i, j]`` (hidden entries are 0), ``count[b, j]`` the number
        of real rows that can see key j under the mask. ``exclude_self`` leaves out the entry of the
        row whose position is the key's own (i = j), from both. ``probs`` defaults to ``self.probs``;
        then the result is computed once per block and shared by every caller.

        The sum over rows is one matrix-vector product per head in the dtype of ``probs``, then
        widened to float64 (exactly); the left-out diagonal is subtracted in float64.
        """
        shared = probs is None
        key = ("column_sums", exclude_self)
        if shared:
            hit = self.cache.get(key)
            if hit is not None:
                return hit
            probs = self.probs
        qv = self.query_valid  # [B, bq]
        weights = qv.to(probs.dtype)[:, None, None, :]  # [B, 1, 1, bq]
        mass = torch.matmul(weights, probs).squeeze(-2).to(torch.float64)  # [B, H, bk]
        segments = self.hidden_segments()
        if segments is None:
            seen = self.visible()[:, 0] & qv[:, :, None]  # [B, bq, bk]
            count = seen.sum(dim=1)  # [B, bk]
        else:
            batch, keys = qv.shape[0], probs.shape[-1]
            count = qv.sum(dim=1, keepdim=True).expand(batch, keys).clone()  # visible to every real row
            for a, b in segments:
                count[:, a:b] = (self.mask_columns(a, b)[:, 0] & qv[:, :, None]).sum(dim=1)
        if exclude_self:
            self._drop_diagonal(probs, mass, count, None if segments is not None else seen)
        if shared:
            self.cache[key] = (mass, count)
        return mass, count

    def _drop_diagonal(
        self, probs: torch.Tensor, mass: torch.Tensor, count: torch.Tensor, seen: torch.Tensor | None
    ) -> None:
        """Subtract the entries i = j from ``mass`` and ``count`` in place (``seen``: the [B, bq, bk] mask if built)."""
        qv = self.query_valid
        col = self.q_pos - self.k_pos[0]  # query position q_pos[r] is key column q_pos[r] - k_pos[0]
        rows = torch.nonzero((col >= 0) & (col < probs.shape[-1])).squeeze(-1)
        if not rows.numel():
            return
        cols = col[rows]
        mass[:, :, cols] -= probs[:, :, rows, cols].to(torch.float64) * qv[:, rows].to(torch.float64)[:, None, :]
        if seen is not None:
            count[:, cols] -= seen[:, rows, cols].to(count.dtype)
            return
        diag_seen = torch.ones_like(qv[:, rows])  # the diagonal entry of a real row is visible (a token sees itself)
        for a, b in self.hidden_segments():
            inside = (cols >= a) & (cols < b)
            if bool(inside.any()):
                r_in, c_in = rows[inside], cols[inside]
                diag_seen[:, inside] = self.mask_columns(a, b)[:, 0][:, r_in, c_in - a]
        count[:, cols] -= (diag_seen & qv[:, rows]).to(count.dtype)


class QKView:
    """Queries and keys of one attention call (after RoPE), for probes that read them.

    Observers with ``reads_qk = True`` get ``update_qk(view)`` once per attention call, before the
    blocks. ``query`` [B, H, Tq, D] and ``key`` [B, Hkv, Tk, D] are the model's tensors (do not
    change them); ``query_valid`` [B, Tq] and ``key_valid`` [B, Tk] flag real tokens;
    ``q_pos`` [Tq] and ``k_pos`` [Tk] are absolute positions and ``item_start`` [B] the position
    of each input's first real token.

    So that an observer can recompute this call's attention later, block by block, the view also
    holds ``value`` [B, Hkv, Tk, Dv], ``mask`` (the call's block mask: ``mask.block(q0, q1, k0, k1)``
    gives [B, 1, bq, bk] bool, True = visible), the logit settings ``scaling``, ``softcap`` and
    ``sink_logits`` ([1, H, 1, 1] or None), and, once the call returns, ``output`` [B, Tq, H, Dv]
    (the tensor the model receives, part of the autograd graph when gradients are on).

    A view made by :meth:`for_call` (every view the engine and explain's fast path hand out) also has
    ``lse`` [B, H, Tq] and ``kernel`` (a fused call's log-sum-exps and kernel name; None otherwise) and
    ``is_causal``, ``tower`` and ``is_cross`` where its maker knows them (None otherwise).
    """

    def __init__(
        self,
        layer,
        module,
        query,
        key,
        query_valid,
        key_valid,
        q_pos,
        k_pos,
        item_start,
        value=None,
        mask=None,
        scaling=None,
        softcap=None,
        sink_logits=None,
    ) -> None:
        self.layer = layer
        self.module = module
        self.query = query
        self.key = key
        self.query_valid = query_valid
        self.key_valid = key_valid
        self.q_pos = q_pos
        self.k_pos = k_pos
        self.item_start = item_start
        self.value = value
        self.mask = mask
        self.scaling = scaling
        self.softcap = softcap
        self.sink_logits = sink_logits
        self.output = None

    @classmethod
    def for_call(
        cls,
        layer: int,
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor | None,
        masks: Any,
        scaling: float,
        *,
        item_start: torch.Tensor | None = None,
        key_valid: torch.Tensor | None = None,
        softcap: float | None = None,
        sink_logits: torch.Tensor | None = None,
        lse: torch.Tensor | None = None,
        kernel: str | None = None,
        is_causal: bool | None = None,
        tower: str | None = None,
        is_cross: bool | None = None,
    ) -> QKView:
        """The view of one attention call of ``module``, its positions and validity flags read from the
        call's block mask ``masks`` (:mod:`headmap.engine.mask`), on the query's device.

        ``q_pos`` and ``k_pos`` count from the mask's ``q_offset`` and ``kv_offset``; ``query_valid`` is the
        mask's, asked on the mask's own device; ``key_valid`` is given (a caller that knows there is no
        padding) or the mask's (every key where it has none); ``item_start`` is given or the mask's (zeros
        where it has none). The tensors are kept as given (a caller that wants them dense passes them so).
        """
        batch, q_len, k_len = query.shape[0], query.shape[2], key.shape[2]
        device = query.device
        q_pos = torch.arange(q_len, device=device) + masks.q_offset
        k_pos = torch.arange(k_len, device=device) + masks.kv_offset
        where = getattr(masks, "device", device)
        query_valid = masks.query_valid(q_pos.to(where)).to(device)
        if key_valid is None:
            key_valid = masks.key_valid()
        if key_valid is None:
            key_valid = torch.ones(batch, k_len, dtype=torch.bool, device=device)
        if item_start is None:
            item_start = (
                masks.item_start().to(device)
                if hasattr(masks, "item_start")
                else torch.zeros(batch, dtype=torch.long, device=device)
            )
        view = cls(
            layer,
            module,
            query,
            key,
            query_valid,
            key_valid.to(device),
            q_pos,
            k_pos,
            item_start,
            value=value,
            mask=masks,
            scaling=scaling,
            softcap=softcap,
            sink_logits=sink_logits,
        )
        view.lse, view.kernel = lse, kernel
        view.is_causal, view.tower, view.is_cross = is_causal, tower, is_cross
        return view

    @property
    def num_heads(self) -> int:
        return self.query.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.key.shape[1]
