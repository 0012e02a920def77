"""A faster exact route for the attention methods: the forward through PyTorch's fused attention kernel.

The engine's block-wise forward materialises every block of probabilities for its probes; rollout and
attn_grad need none of them during the forward, only each layer's queries, keys, values, output and
the log-sum-exp of each attention row (lse_i = log sum_j exp(s_ij), s the scaled logits). On CPU,
PyTorch's flash attention kernel (``aten._scaled_dot_product_flash_attention_for_cpu``) returns the
output and lse at the cost of one sdpa forward, with a backward of its own (no T x T matrix either).

This module registers a private attention implementation, ``headmap_explain`` (mask: the engine's
:func:`~headmap.engine.mask.headmap_mask`, linear in T), used by :func:`forward` for the duration of
one forward. Per attention call: when the call is *plain* (CPU, float32 or float64, square, no padding,
causal or bidirectional mask without any other pattern, no softcap, sink logit, position bias or
dropout) the kernel runs it and the view carries ``lse`` and ``flash`` ("causal" / "full"); any other
call (sliding windows, padding, ...) runs the headmap engine's function, as before. Either way the
view is a :class:`~headmap.engine.block.QKView` like the engine's. The attention rows then follow
exactly from the kept tensors: A_ij = exp(s_ij - lse_i) (:mod:`.capture`).

The gradient methods and occlusion need no view: :func:`plain_forward` runs the same implementation
with nothing captured, each plain call through the fused kernel of its device and dtype (forward and
the kernel's own backward), on a batch without padding; :func:`score` picks that route or the engine's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from ..engine import fused as engine_fused
from ..engine import headmap_attention_forward
from ..engine import registry as engine_registry
from ..engine.attention import softmax_dtype
from ..engine.block import QKView
from ..engine.fused import plain_pattern
from ..engine.mask import as_block_mask, headmap_mask
from .base import Job

IMPLEMENTATION = "headmap_explain"
_CAPTURE: ContextVar[Any] = ContextVar("headmap_explain_capture", default=None)
_REGISTERED = False


def _kernel():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _register() -> None:
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(IMPLEMENTATION, _attention)
        AttentionMaskInterface.register(IMPLEMENTATION, headmap_mask)
        _REGISTERED = True


def usable(job: Job) -> bool:
    """Whether :func:`forward` may run ``job``'s model: the engine can run it, it sits on the CPU, no
    headmap session (probes, edits) is active on it, and the kernel exists in this torch."""
    if job.engine is not None or _kernel() is None:
        return False
    if any(s.model is job.model for s in engine_registry.active()):
        return False
    return next(job.model.parameters()).device.type == "cpu"


@contextmanager
def _installed(model: nn.Module, capture: Any) -> Iterator[None]:
    _register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(IMPLEMENTATION)
    token = _CAPTURE.set(capture)
    try:
        yield
    finally:
        _CAPTURE.reset(token)
        model.set_attn_implementation(previous)


def forward(job: Job, capture: Any, embeds: torch.Tensor | None = None, score: bool = False) -> Any:
    """``job.outputs(embeds=embeds)`` (or ``job.score``), every attention call handing its view to ``capture``.

    The job's own forward builds the model's inputs; it runs outside any engine session (a copy of the
    job marked as not engine-run), under this module's implementation.
    """
    plain = dataclasses.replace(job, engine="(the explain fast path installs its own attention)")
    with _installed(job.model, capture):
        return plain.score(embeds=embeds) if score else plain.outputs(embeds=embeds)


def _attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: object,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    is_causal: bool | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """The ``headmap_explain`` attention function (transformers' AttentionInterface signature)."""
    capture = _CAPTURE.get()
    args = (module, query, key, value, attention_mask)
    kw = dict(scaling=scaling, dropout=dropout, softcap=softcap, s_aux=s_aux, is_causal=is_causal, **kwargs)
    if capture is _PLAIN:  # plain_forward(): the gradient methods' route, nothing captured
        return _plain_attention(*args, **kw)
    if capture is None:  # outside forward(): the engine, without probes
        return headmap_attention_forward(*args, **kw)
    batch, heads, q_len, head_dim = query.shape
    k_len = key.shape[2]
    causal = is_causal if is_causal is not None else bool(getattr(module, "is_causal", True))
    masks = as_block_mask(attention_mask, batch, q_len, k_len, causal, query.device)
    kind = plain_pattern(masks, q_len, k_len)
    fast = (
        kind is not None
        and query.device.type == "cpu"
        and query.dtype in (torch.float32, torch.float64)
        and key.dtype == value.dtype == query.dtype
        and value.shape[-1] == head_dim
        and softcap is None
        and s_aux is None
        and kwargs.get("position_bias") is None
        and not (module.training and dropout > 0)
    )
    scale = head_dim**-0.5 if scaling is None else float(scaling)
    idx = getattr(module, "layer_idx", None)
    layer = idx if isinstance(idx, int) else len(capture.views)  # else: the order of the calls
    # Without gradients (rollout) only Q, K and lse are read later: keep dense copies of Q and K (the
    # model's may be views into a fused QKV tensor, which they would keep whole) and no V or output.
    grad = torch.is_grad_enabled()
    view = _view(layer, module, query if grad else query.contiguous(), key, value if grad else None, masks, scale)
    view.softcap = softcap
    if s_aux is not None:  # as the engine's view: one sink logit per head, in the softmax's dtype
        view.sink_logits = s_aux.reshape(1, heads, 1, 1).to(softmax_dtype(query.dtype))
    if fast:
        out, lse = _kernel()(query, key, value, 0.0, kind == "causal", scale=scale)
        out = out.transpose(1, 2).contiguous()
        view.lse, view.flash = lse.detach(), kind
    else:
        out, _ = headmap_attention_forward(*args, **kw)
    view.output = out if grad else None
    capture.update_qk(view)
    return out, None


def _view(layer: int, module, query, key, value, masks, scale: float) -> QKView:
    """The QKView the engine would hand a probe for this call (see headmap_attention_forward)."""
    value = None if value is None else value.contiguous()
    view = QKView.for_call(layer, module, query, key.contiguous(), value, masks, scale)
    view.flash = None
    return view


def swapped_product(view: QKView, r: torch.Tensor) -> torch.Tensor:
    """[B, Tk] float64: sum_i r[b, i] mean_h A[b, h, i, :] for a view the kernel ran, r >= 0, by one kernel call.

    A_ij = exp(s_ij - lse_i), so column j of r^T A is sum_i exp(s_ij + log r_i - lse_i): the
    log-sum-exp of an attention call with the roles of queries and keys exchanged (keys ask, queries
    answer) and the additive bias log r_i - lse_i on each answering query. The kernel returns that
    log-sum-exp; a causal mask (key j is seen by rows i >= j) becomes the kernel's causal mask once
    both sequences are reversed. Columns no live row sees are 0 (the kernel would give log 1 there).
    """
    q, k = view.query.detach(), view.key.detach()
    batch, heads, length, _ = q.shape
    group = heads // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
    dt = q.dtype
    rr = r.to(dt)
    bias = torch.log(rr)[:, None, :] - view.lse.to(dt)  # [B, H, T]; log 0 = -inf drops the row
    live = rr > 0
    if view.flash == "causal":
        asking, answering, bias = k.flip(-2), q.flip(-2), bias.flip(-1)
        seen = live.flip(-1).to(torch.int32).cumsum(-1).flip(-1) > 0  # some live row i >= j
    else:
        asking, answering = k, q
        seen = live.any(dim=-1, keepdim=True).expand(batch, length)
    # stride 0 over the asking axis; the kernel reads a dense [B, H, T] bias fast (lse is [B, T, H] in memory)
    mask = bias.contiguous()[:, :, None, :].expand(batch, heads, length, length)
    _, lse = _kernel()(asking, answering, answering, 0.0, view.flash == "causal", attn_mask=mask, scale=view.scaling)
    if view.flash == "causal":
        lse = lse.flip(-1)
    cols = torch.exp(lse.double()).sum(dim=1) / heads  # [B, Tk]
    return cols.masked_fill_(~seen, 0.0)


def lse_product(view: QKView, r: torch.Tensor, grad_out: torch.Tensor | None, step: int) -> torch.Tensor:
    """row_product for a view the kernel ran, block by block, with A = exp(s - lse) (no softmax pass).

    Blocks of ``step`` query rows over the rows where r != 0; a causal block reads the keys up to its
    last row and zeroes the entries above the diagonal. With ``grad_out``: Chefer's A ⊙ (dO V^T)^+.
    """
    q, k = view.query.detach(), view.key.detach()
    batch, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    dt = q.dtype
    acc = torch.zeros(batch, length, dtype=torch.float64, device=q.device)
    live = torch.nonzero(r.abs().sum(dim=0) > 0)
    if not live.numel():
        return acc
    lo, hi = int(live[0]), int(live[-1]) + 1
    kt = k.transpose(-1, -2)
    vt = view.value.detach().transpose(-1, -2) if grad_out is not None else None
    lse = view.lse.to(dt)
    causal = view.flash == "causal"
    scale = float(view.scaling)
    for q0 in range(lo, hi, step):
        q1 = min(hi, q0 + step)
        rows, keys = q1 - q0, (q1 if causal else length)
        qb = (q[:, :, q0:q1] * scale).reshape(batch, kv_heads, group * rows, dim)
        neg = -lse[:, :, q0:q1].reshape(batch, kv_heads, group * rows, 1)
        probs = torch.matmul(qb, kt[..., :keys]).add_(neg).exp_().view(batch, heads, rows, keys)
        if causal:
            above = torch.ones(rows, rows, dtype=torch.bool, device=q.device).triu_(1)
            probs[..., q0:q1].masked_fill_(above, 0.0)
        if grad_out is not None:
            d_out = grad_out[:, q0:q1].detach().transpose(1, 2).to(dt).reshape(batch, kv_heads, group * rows, -1)
            d_probs = torch.matmul(d_out, vt[..., :keys]).view(batch, heads, rows, keys)
            probs = probs.mul_(d_probs.clamp_(min=0))
        weights = r[:, None, None, q0:q1].to(dt)
        acc[:, :keys] += torch.matmul(weights, probs).sum(dim=(1, 2)).double() / heads
    return acc


# -- the route of the gradient methods and occlusion --------------------------------------------------
#
# saliency, integrated_gradients and occlusion need no attention rows, only the model's output and its
# gradient at the input embeddings. For a batch without padding, plain_forward() runs every plain call
# (causal or bidirectional, square, no softcap, sink logit, position bias or dropout) through the fused
# kernel the engine's fused route would pick for the device and dtype (flash attention on the CPU; flash,
# or memory-efficient for float32, on CUDA), whose backward is the kernel's own: output and log-sum-exp
# are kept, the probabilities recomputed block by block, memory linear in T. Any other call runs the
# engine's function (block by block, checkpointed backward), as the engine's route does.

#: the context value while plain_forward() runs: no capture, plain calls through the fused kernel
_PLAIN = object()


def plain_usable(job: Job) -> bool:
    """Whether :func:`plain_forward` may run ``job``: the engine can run its model, no headmap session
    (probes, edits) is active on it, the batch has no padding, and a fused kernel takes the model's
    device and dtype (:func:`headmap.engine.fused.kernel_for`). Else the gradient methods and occlusion
    take the engine's route (:meth:`Job.score`), as before."""
    if job.engine is not None:
        return False
    if any(s.model is job.model for s in engine_registry.active()):
        return False
    param = next(job.model.parameters(), None)
    if param is None or engine_fused.kernel_for(param.device, param.dtype) is None:
        return False
    return bool(job.mask.all())  # padding: every call would take the engine's function anyway


def plain_forward(job: Job, ids: torch.Tensor | None = None, embeds: torch.Tensor | None = None) -> Any:
    """``job.outputs(ids=ids, embeds=embeds)`` with every plain attention call through the fused kernel.

    Outside any engine session, as :func:`forward`; the model's attention implementation is put back after.
    """
    free = dataclasses.replace(job, engine="(the explain fast path installs its own attention)")
    with _installed(job.model, _PLAIN):
        return free.outputs(ids=ids, embeds=embeds)


def score(job: Job, ids: torch.Tensor | None = None, embeds: torch.Tensor | None = None, fast: bool | None = None):
    """[B] target values on ``ids`` or ``embeds``: through :func:`plain_forward` when ``fast`` (default:
    :func:`plain_usable`), else the engine's route (:meth:`Job.score`)."""
    if fast is None:
        fast = plain_usable(job)
    if not fast:
        return job.score(ids=ids, embeds=embeds)
    out = plain_forward(job, ids=ids, embeds=embeds)
    return job.target.read(out, job.rows, job.chosen, job.mask)


def _plain_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: object,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    is_causal: bool | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """One call under :func:`plain_forward`: the fused kernel when the call is plain, else the engine's function."""
    batch, _, q_len, head_dim = query.shape
    k_len = key.shape[2]
    causal = is_causal if is_causal is not None else bool(getattr(module, "is_causal", True))
    masks = as_block_mask(attention_mask, batch, q_len, k_len, causal, query.device)
    kind = engine_fused.plain_pattern(masks, q_len, k_len)
    train_dropout = dropout if module.training and dropout > 0 else 0.0
    kernel = engine_fused.call_kernel(
        kind, query, key, value, softcap, s_aux, kwargs.get("position_bias"), train_dropout
    )  # fmt: skip
    if kernel is None:
        kw = dict(scaling=scaling, dropout=dropout, softcap=softcap, s_aux=s_aux, is_causal=is_causal, **kwargs)
        return headmap_attention_forward(module, query, key, value, attention_mask, **kw)
    scale = head_dim**-0.5 if scaling is None else float(scaling)
    out, _ = engine_fused.attend(kernel, query, key, value, kind == "causal", scale)
    return out.transpose(1, 2).contiguous(), None
