"""Queries and keys of every layer, kept during one forward, and attention recomputed from them block by block.

:class:`Capture` is a probe with ``Needs(qk=True)``: the engine hands it each attention call's
:class:`~headmap.engine.block.QKView` (queries and keys after RoPE, values, the call's block mask and
logit settings). Keeping them costs O(L T d). :func:`row_product` then forms, for a weight vector r
over query rows, r^T Ā with Ā the head mean of the attention (or of (dA ⊙ A)^+ given dA's factors),
one block of rows at a time under the engine's byte budget: no T x T matrix exists.
"""

from __future__ import annotations

import torch

from ..engine import rows_per_block
from ..engine.block import Block, QKView
from ..probes.base import Needs, Probe


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


def row_product(view: QKView, r: torch.Tensor, grad_out: torch.Tensor | None = None) -> torch.Tensor:
    """[B, Tk] float64: sum_i r[b, i] * mean_h M[b, h, i, :] for the attention call of ``view``.

    M is the attention A (softmax of the scaled, capped, masked logits, with the sink logit where the
    model has one), or with ``grad_out`` (dy/d output, [B, Tq, H, Dv]) Chefer's (dA ⊙ A)^+ where
    dA = dy/dA = dO V^T. Rows with r = 0 are skipped; rows that see no key count as 0.
    Arithmetic in float64 for float64 models, else float32 (as the engine's softmax).
    """
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
        visible = view.mask.block(q0, q1, 0, keys)  # [B, 1, rows, keys]
        cols = torch.nonzero(visible.any(dim=2).any(dim=1).any(dim=0)).squeeze(-1)
        if not cols.numel():
            continue
        k0, k1 = int(cols[0]), int(cols[-1]) + 1  # keys no row of the block sees are skipped (causal: half)
        visible = visible[..., k0:k1]
        qb = q[:, :, q0:q1].to(dt).reshape(batch, kv_heads, group * rows, dim)
        logits = torch.matmul(qb, k[..., k0:k1]).view(batch, heads, rows, k1 - k0).mul_(scaling)
        if view.softcap is not None:
            logits = torch.tanh(logits / view.softcap) * view.softcap
        logits.masked_fill_(~visible, -torch.inf)
        if view.sink_logits is None:
            probs = torch.softmax(logits, dim=-1)
        else:
            sink = view.sink_logits.to(dt).expand(batch, heads, rows, 1)
            probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
        del logits
        if not bool(visible.any(dim=-1).all()):  # a row that sees no key: 0, not NaN
            probs = torch.nan_to_num_(probs, nan=0.0)
        if grad_out is not None:
            d_out = grad_out[:, q0:q1].transpose(1, 2).to(dt).reshape(batch, kv_heads, group * rows, -1)
            d_probs = torch.matmul(d_out, v[..., k0:k1]).view(batch, heads, rows, k1 - k0)
            probs = d_probs.mul_(probs).clamp_(min=0)
        weights = r[:, None, None, q0:q1].to(dt)  # [B, 1, 1, rows]
        acc[:, k0:k1] += torch.matmul(weights, probs).sum(dim=(1, 2)).double() / heads
    return acc
    lo, hi = int(live[0]), int(live[-1]) + 1
    step = rows_per_block(batch, heads, keys) if grad_out is None else max(1, rows_per_block(batch, heads, keys) // 2)
    scaling = dim**-0.5 if view.scaling is None else float(view.scaling)
    for q0 in range(lo, hi, step):
        q1 = min(hi, q0 + step)
        rows = q1 - q0
        qb = q[:, :, q0:q1].to(dt).reshape(batch, kv_heads, group * rows, dim)
        logits = torch.matmul(qb, k).view(batch, heads, rows, keys) * scaling
        if view.softcap is not None:
            logits = torch.tanh(logits / view.softcap) * view.softcap
        visible = view.mask.block(q0, q1, 0, keys)
        logits = logits.masked_fill(~visible, -torch.inf)
        if view.sink_logits is None:
            probs = torch.softmax(logits, dim=-1)
        else:
            sink = view.sink_logits.to(dt).expand(batch, heads, rows, 1)
            probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
        probs = torch.nan_to_num(probs, nan=0.0)
        if grad_out is not None:
            d_out = grad_out[:, q0:q1].transpose(1, 2).to(dt).reshape(batch, kv_heads, group * rows, -1)
            d_probs = torch.matmul(d_out, v).view(batch, heads, rows, keys)
            probs = (d_probs * probs).clamp_(min=0)
        weights = r[:, q0:q1].to(dt)
        acc += torch.einsum("bi,bhik->bk", weights, probs).double() / heads
    return acc
