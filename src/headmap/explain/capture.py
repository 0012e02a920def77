"""Queries and keys of every layer, kept during one forward, and attention recomputed from them block by block.

:class:`Capture` is a probe with ``Needs(qk=True)``: the engine hands it each attention call's
:class:`~headmap.engine.block.QKView` (queries and keys after RoPE, values, the call's block mask and
logit settings). Keeping them costs O(L T d). :func:`row_product` then forms, for a weight vector r
over query rows, r^T Ā with Ā the head mean of the attention (or of (dA ⊙ A)^+ given dA's factors),
one block of rows at a time under the engine's byte budget: no T x T matrix exists. Views that
:mod:`._flash` made (the fused kernel ran the call, ``view.lse`` set) take its routes instead.
"""

from __future__ import annotations

import torch

from ..engine import CONFIG, rows_per_block
from ..engine.block import Block, QKView
from ..probes.base import Needs, Probe
from . import _flash

#: The kernel route's blocks (:func:`headmap.explain._flash.lse_product`) take this many times the
#: engine's block budget (``CONFIG.budget_bytes``): 1 GiB of probabilities and temporaries by default.
LSE_BUDGET_FACTOR = 16


class Capture(Probe):
    """Keeps the QKView of every attention call of a forward, by layer."""

    name = "explain_capture"
    needs = Needs(qk=True, default=False)

    def __init__(self) -> None:
        self.views: dict[int, QKView] = {}

    def update_qk(self, view: QKView) -> None:
        self.views[view.layer] = view

    def update(self, block: Block) -> None:  # the probabilities are recomputed later, on demand
        pass

    def layers(self) -> list[QKView]:
        return [self.views[k] for k in sorted(self.views)]


def _plan(view: QKView, q0: int, q1: int, keys: int, plans: dict | None) -> tuple[int, int, tuple, bool] | None:
    """(k0, k1, segments, empty_rows) of a block of rows, or None when no row sees a key.

    [k0, k1) are the key columns some row sees; ``segments`` the column ranges (relative to k0) that
    hold a hidden entry (the rest is visible to every row, as in the engine's block plans);
    ``empty_rows``: some row sees no key. Layers that share the mask object share the plan.
    """
    key = (id(view.mask), q0, q1, keys)
    if plans is not None and key in plans:
        return plans[key]
    visible = view.mask.block(q0, q1, 0, keys)[:, 0]  # [B, rows, keys]
    cols = torch.nonzero(visible.any(dim=1).any(dim=0)).squeeze(-1)
    plan = None
    if cols.numel():
        k0, k1 = int(cols[0]), int(cols[-1]) + 1
        full = torch.nonzero(visible[..., k0:k1].all(dim=1).all(dim=0)).squeeze(-1)
        if full.numel() and bool(visible[..., k0 + int(full[0]) : k0 + int(full[-1]) + 1].all()):
            a, b = int(full[0]), int(full[-1]) + 1
            segments = tuple(seg for seg in ((0, a), (b, k1 - k0)) if seg[1] > seg[0])
        else:
            segments = ((0, k1 - k0),)
        plan = (k0, k1, segments, not bool(visible.any(dim=-1).all()))
    if plans is not None:
        plans[key] = plan
    return plan


def row_product(
    view: QKView, r: torch.Tensor, grad_out: torch.Tensor | None = None, plans: dict | None = None
) -> torch.Tensor:
    """[B, Tk] float64: sum_i r[b, i] * mean_h M[b, h, i, :] for the attention call of ``view``.

    M is the attention A (softmax of the scaled, capped, masked logits, with the sink logit where the
    model has one), or with ``grad_out`` (dy/d output, [B, Tq, H, Dv]) Chefer's (dA ⊙ A)^+ where
    dA = dy/dA = dO V^T. Rows with r = 0 are skipped; rows that see no key count as 0. Key columns
    no row of a block sees are skipped (causal: half the work), and only the columns that hold a
    hidden entry are masked. ``plans``: a dict shared across the layers of one forward (block plans).
    Arithmetic in float64 for float64 models, else float32 (as the engine's softmax).
    """
    if getattr(view, "lse", None) is not None:  # the forward ran through the fused kernel (_flash)
        live = int((r.abs().sum(dim=0) > 0).sum())
        if grad_out is None and 4 * live >= r.shape[1] and bool((r >= 0).all()):
            return _flash.swapped_product(view, r)
        batch, heads, keys = view.query.shape[0], view.query.shape[1], view.key.shape[2]
        # Blocks of LSE_BUDGET_FACTOR times the engine's budget: thin blocks cost far more than their
        # share here (measured: 56-row blocks 5x slower than 896-row ones at T = 4096); still constant in T.
        step = rows_per_block(batch, heads, keys, budget_bytes=CONFIG.budget_bytes * LSE_BUDGET_FACTOR)
        return _flash.lse_product(view, r, grad_out, step if grad_out is None else max(1, step // 2))
    q, k = view.query.detach(), view.key.detach()
    batch, heads, _, dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    group = heads // kv_heads
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    k = k.to(dt).transpose(-1, -2)
    v = view.value.detach().to(dt).transpose(-1, -2) if grad_out is not None else None
    acc = torch.zeros(batch, keys, dtype=torch.float64, device=q.device)
    live = torch.nonzero(r.abs().sum(dim=0) > 0)
    if not live.numel():
        return acc
    lo, hi = int(live[0]), int(live[-1]) + 1
    step = rows_per_block(batch, heads, keys) if grad_out is None else max(1, rows_per_block(batch, heads, keys) // 2)
    scaling = dim**-0.5 if view.scaling is None else float(view.scaling)
    for q0 in range(lo, hi, step):
        q1 = min(hi, q0 + step)
        rows = q1 - q0
        plan = _plan(view, q0, q1, keys, plans)
        if plan is None:
            continue
        k0, k1, segments, empty_rows = plan
        # the scale on Q (rows x d) rather than on the logits (rows x T): the same up to one rounding
        qb = (q[:, :, q0:q1].to(dt) * scaling).reshape(batch, kv_heads, group * rows, dim)
        logits = torch.matmul(qb, k[..., k0:k1]).view(batch, heads, rows, k1 - k0)
        if view.softcap is not None:
            logits = torch.tanh(logits / view.softcap) * view.softcap
        for a, b in segments:
            hidden = ~view.mask.block(q0, q1, k0 + a, k0 + b)
            logits[..., a:b].masked_fill_(hidden, -torch.inf)
        if view.sink_logits is None:
            probs = torch.softmax(logits, dim=-1)
        else:
            sink = view.sink_logits.to(dt).expand(batch, heads, rows, 1)
            probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
        del logits
        if empty_rows:  # a row that sees no key: 0, not NaN
            probs = torch.nan_to_num_(probs, nan=0.0)
        if grad_out is not None:
            d_out = grad_out[:, q0:q1].transpose(1, 2).to(dt).reshape(batch, kv_heads, group * rows, -1)
            d_probs = torch.matmul(d_out, v[..., k0:k1]).view(batch, heads, rows, k1 - k0)
            probs = d_probs.mul_(probs).clamp_(min=0)
        weights = r[:, None, None, q0:q1].to(dt)  # [B, 1, 1, rows]
        acc[:, k0:k1] += torch.matmul(weights, probs).sum(dim=(1, 2)).double() / heads
    return acc
