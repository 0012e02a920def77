"""The engine's fused route: one fused attention kernel per call, for probes that need only log-sum-exps.

The block route materialises every block of probabilities so that any probe can read them; its cost
on a GPU is the memory traffic of those blocks (several passes over H x T^2/2 floats per layer). Many
statistics need far less: the probability of a chosen key is ``A_ij = exp(s_ij - lse_i)``, with
``s_ij = scale * q_i . k_j`` and ``lse_i = log sum_j exp(s_ij)`` the row's log-sum-exp, which PyTorch's
fused kernels (flash attention on CPU and CUDA, memory-efficient attention on CUDA for float32) return
beside the output at the cost of one sdpa forward. A probe that computes its statistic from the call's
queries, keys and ``lse`` declares ``fused = True`` and implements ``update_fused(view)``
(:class:`~headmap.probes.base.Probe`); when every probe of a session does, and the call is *plain*, the
engine takes this route (:func:`usable` lists the conditions; anything else takes the block route).

Helpers for probes, none of which builds a T x T matrix: :func:`key_probability` (one key column per
input), :func:`band_probability` (keys at fixed lags from each query), :func:`product` (``sum_j A_ij v_j``
for other values, one more fused call, shared by tag across the probes of a call) and
:func:`column_mass` (column sums ``sum_i A_ij``, one fused call with queries and keys exchanged). The
engine knows no probe by name: a probe asks for what it needs through these.

Exactness: the probabilities are those of the kernel's own attention, the one whose output the model
receives, in float32 (float64 for a float64 model on CPU). For a float32 or float64 model they equal
the block route's to the rounding of the logits (tests/test_fused.py bounds it); for a bfloat16 or
float16 model the kernel keeps the logits in float32 where eager and the block route round them to the
model's dtype first, so the two routes differ by that rounding (up to about 2^-8 relative in a logit).
``headmap.engine_config.fused = False`` turns the route off.
"""

from __future__ import annotations

from typing import Any

import torch

from .mask import CausalMask, FullMask, LazyMask

#: Dtypes each device's kernel takes (CUDA float32 goes to the memory-efficient kernel).
_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def plain_pattern(masks: object, q_len: int, k_len: int) -> str | None:
    """``"causal"`` or ``"full"`` when a call's mask is exactly that pattern over a square call without
    padding (a padding mask that marks every token real counts as none); else None."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    if q_len != k_len:
        return None
    if isinstance(masks, CausalMask):
        return "causal"
    if isinstance(masks, FullMask):
        return "full"
    if not isinstance(masks, LazyMask) or masks.q_offset or masks.kv_offset:
        return None
    if masks.mask_function is causal_mask_function:
        kind = "causal"
    elif masks.mask_function is bidirectional_mask_function:
        kind = "full"
    else:
        return None
    if masks.padding_mask is not None:
        # one host read per forward: the answer is kept on the mask, which every layer shares
        plans = masks.plans if masks.plans is not None else {}
        masks.plans = plans
        if "no_padding" not in plans:
            plans["no_padding"] = bool(masks.padding_mask[:, :k_len].all())
        if not plans["no_padding"]:
            return None
    return kind


def kernel_for(device: torch.device, dtype: torch.dtype) -> str | None:
    """Name of the fused kernel that runs ``dtype`` on ``device``, or None."""
    if device.type == "cpu" and dtype in _CPU_DTYPES:
        return "flash_cpu" if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu") else None
    if device.type == "cuda" and dtype in _CUDA_DTYPES:
        return "efficient_cuda" if dtype == torch.float32 else "flash_cuda"
    return None


def usable(
    probes: tuple,
    edits: tuple,
    kind: str | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    softcap: Any,
    sink_logits: Any,
    bias: Any,
    dropout: float,
    track_grad: bool,
    enabled: bool,
) -> str | None:
    """The kernel to run this call with, when the fused route applies; else None.

    It applies when the route is enabled, the session has probes and every one of them is fused,
    no edit is active on the layer, no gradient is taken, the mask is plain (causal or full, square,
    no padding), there is no softcap, sink logit, position bias or dropout, values have the queries'
    head size, and a kernel takes the device and dtype.
    """
    if not enabled or not probes or edits or track_grad:
        return None
    if not all(getattr(p, "fused", False) for p in probes):
        return None
    return call_kernel(kind, query, key, value, softcap, sink_logits, bias, dropout)


def call_kernel(
    kind: str | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    softcap: Any,
    sink_logits: Any,
    bias: Any,
    dropout: float,
) -> str | None:
    """The kernel that can run this call itself, or None: the mask is plain (``kind``, from
    :func:`plain_pattern`), there is no softcap, sink logit, position bias or dropout, values have the
    queries' head size and dtype, and a kernel takes the device and dtype. (:func:`usable` adds what the
    engine's route needs of its session; explain's gradient route asks this alone.)"""
    if kind is None:
        return None
    if softcap is not None or sink_logits is not None or bias is not None or dropout:
        return None
    if value.shape[-1] != query.shape[-1] or not (key.dtype == value.dtype == query.dtype):
        return None
    return kernel_for(query.device, query.dtype)


def attend(
    name: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [B, H, T, Dv], lse [B, H, T] float32 or float64) of one call by the named kernel.

    Grouped key/value heads are repeated to the query heads first (O(T H d) memory, no T x T).
    """
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads != kv_heads:
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    aten = torch.ops.aten
    if name == "flash_cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, causal, scale=scale)
    elif name == "flash_cuda":
        res = aten._scaled_dot_product_flash_attention(query, key, value, 0.0, causal, False, scale=scale)
        out, lse = res[0], res[1]
    elif name == "efficient_cuda":
        res = aten._scaled_dot_product_efficient_attention(query, key, value, None, True, 0.0, causal, scale=scale)
        out, lse = res[0], res[1]
    else:
        raise ValueError(f"unknown fused kernel {name!r}")
    return out, lse[..., : query.shape[2]]


def key_probability(view: Any, columns: torch.Tensor) -> torch.Tensor:
    """[B, H, Tq]: the probability each query row gives key column ``columns[b]`` of its input.

    ``view`` is a fused call's :class:`~headmap.engine.block.QKView` (``lse`` set). The logit is
    recomputed in the lse's dtype: ``exp(scale * q_i . k_c - lse_i)``.
    """
    q, k, lse = view.query, view.key, view.lse
    batch, heads = q.shape[0], q.shape[1]
    kv_heads = k.shape[1]
    idx = columns.to(k.device).view(batch, 1, 1, 1).expand(batch, kv_heads, 1, k.shape[-1])
    kc = k.gather(2, idx).to(lse.dtype)  # [B, Hkv, 1, D]
    if heads != kv_heads:
        kc = kc.repeat_interleave(heads // kv_heads, dim=1)
    s = torch.matmul(q.to(lse.dtype), kc.transpose(-1, -2)).squeeze(-1) * view.scaling  # [B, H, Tq]
    return torch.exp(s - lse)


def product(view: Any, values: torch.Tensor, part: str = "all", tag: str | None = None) -> tuple:
    """``(out [B, H, Tq, Dv], mass [B, H, Tq] or None)``: one more fused attention call of this call's
    queries and keys with other ``values``, in the lse's dtype (float32; float64 for a float64 model).

    ``out[b, h, i] = sum_j P_ij values[b, h, j]`` with ``P`` the call's softmax restricted to ``part`` of
    each row's keys and renormalised there: ``"all"`` every key the call sees, ``"before"`` the keys
    ``j <= i``, ``"after"`` the keys ``j >= i`` (the causal kernel on the sequences reversed). ``mass`` is
    the share of the call's attention on that part, ``exp(lse_part - lse)`` [B, H, Tq] (None where it is
    the whole row), so that ``sum_{j in part} A_ij v_j = mass * out``. ``values`` has the call's query
    heads, its kv heads or one head ([B or 1, heads, Tk, Dv]); half-precision models run this call in
    float32, where positions and keys are exact and the kernel's probabilities are not rounded to 8 bits.
    No T x T matrix: one kernel call, O(T H Dv) memory. ``tag``: products with the same tag and part are
    computed once per call (probes of one session share them).
    """
    cache = view.__dict__.setdefault("_products", {})
    if tag is not None and (tag, part) in cache:
        return cache[(tag, part)]
    if part not in ("all", "before", "after"):
        raise ValueError(f"part must be 'all', 'before' or 'after' (got {part!r})")
    dtype = view.lse.dtype
    query, key = view.query.to(dtype), view.key.to(dtype)
    batch, heads = query.shape[0], query.shape[1]
    if key.shape[1] != heads:
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
    values = values.to(dtype)
    if values.shape[1] != heads:
        values = values.repeat_interleave(heads // values.shape[1], dim=1)
    values = values.expand(batch, heads, *values.shape[2:]).contiguous()
    causal = view.is_causal if part == "all" else True
    if part == "after":
        query, key, values = query.flip(2), key.flip(2), values.flip(2)
    kernel = kernel_for(query.device, dtype)
    if kernel is None:
        raise ValueError(f"no fused kernel takes {dtype} on {query.device}")
    out, lse = attend(kernel, query, key, values, causal, view.scaling)
    if part == "after":
        out, lse = out.flip(2), lse.flip(2)
    mass = None if part == "all" or (part == "before" and view.is_causal) else torch.exp(lse - view.lse)
    if tag is not None:
        cache[(tag, part)] = (out, mass)
    return out, mass


def band_probability(view: Any, lags: Any) -> torch.Tensor:
    """[B, H, Tq, len(lags)]: the probability each query row i gives key ``i - lag``, for each lag (0 where
    the call does not show that key: outside the input, or after the query in a causal call).

    Per lag one gather of the keys and one dot product per row, ``exp(scale * q_i . k_{i-lag} - lse_i)``
    in the lse's dtype: O(T H d) each, no T x T.
    """
    q, k, lse = view.query, view.key, view.lse
    batch, heads, q_len, dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    qg = q.to(lse.dtype).view(batch, kv_heads, group, q_len, dim)
    rows = view.q_pos - view.k_pos[0]  # [Tq]: the key column of each query's own position
    out = []
    for lag in lags:
        cols = rows - lag
        inside = (cols >= 0) & (cols < k_len)
        if view.is_causal and lag < 0:
            inside = torch.zeros_like(inside)
        kc = k.index_select(2, cols.clamp(0, k_len - 1)).to(lse.dtype)  # [B, Hkv, Tq, D]
        s = (qg * kc[:, :, None]).sum(-1).view(batch, heads, q_len) * view.scaling
        out.append(torch.exp(s - lse) * inside)
    return torch.stack(out, dim=-1)


def rows_mass(view: Any, first: int, chunk: int = 256) -> torch.Tensor:
    """[B, H, Tk] float64: ``sum_{i >= first} A_ij``, the attention each key receives from the query rows
    ``first`` to the end of a fused call (the last rows of a prefill), key j included only where row i sees it.

    Each probability is ``exp(scale q_i . k_j - lse_i)`` in the lse's dtype, from one [rows, Tk] product per
    ``chunk`` rows (O(chunk Tk) memory, no T x T matrix); the sums over rows are float64, as the block route's.
    """
    q, k, lse = view.query, view.key, view.lse
    batch, heads, q_len, _ = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    dtype = lse.dtype
    keys = k.to(dtype)[:, :, None].transpose(-1, -2)  # [B, Hkv, 1, D, Tk]
    total = torch.zeros(batch, heads, k_len, dtype=torch.float64, device=q.device)
    for r0 in range(first, q_len, chunk):
        r1 = min(r0 + chunk, q_len)
        qs = q[:, :, r0:r1].to(dtype).reshape(batch, kv_heads, group, r1 - r0, -1)
        s = torch.matmul(qs, keys).reshape(batch, heads, r1 - r0, k_len) * view.scaling
        p = torch.exp(s - lse[:, :, r0:r1, None])
        if view.is_causal:
            hidden = view.k_pos[None, :] > view.q_pos[r0:r1, None]  # [rows, Tk]
            p = p.masked_fill(hidden, 0.0)
        total += p.to(torch.float64).sum(dim=2)
    return total


def column_mass(view: Any) -> torch.Tensor:
    """[B, H, Tk] in the lse's dtype: ``sum_i A_ij`` over every query row i that sees key j (the diagonal
    included), by one fused call with the roles of queries and keys exchanged.

    ``A_ij = exp(s_ij - lse_i)``, so the column sum is the log-sum-exp, over the answering queries i, of
    the logits ``scale k_j . q_i - lse_i``: an attention call whose queries are the keys and whose keys are
    the queries, each widened by one channel (1 on the asking side, ``-lse_i / scale`` on the answering
    side; 7 more zero channels keep the head size a multiple of 8). A causal call's key j is seen by rows
    i >= j, which is the kernel's causal mask once both sequences are reversed. Only the kernel's
    log-sum-exp is read. Runs in the lse's dtype (float32 for a half-precision model: ``lse_i / scale``
    must not be rounded to 8 bits). No T x T matrix (explain/_flash.py's ``swapped_product`` does the same
    with an additive mask instead of a channel).
    """
    dtype = view.lse.dtype
    q, k = view.query.to(dtype), view.key.to(dtype)
    batch, heads, length, _ = q.shape
    if k.shape[1] != heads:
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
    pad = q.new_zeros(batch, heads, length, 7)
    asking = torch.cat([k, torch.ones_like(pad[..., :1]), pad], dim=-1)
    answering = torch.cat([q, (-view.lse / view.scaling)[..., None].to(dtype), pad], dim=-1)
    if view.is_causal:
        asking, answering = asking.flip(2), answering.flip(2)
    kernel = kernel_for(q.device, dtype)
    if kernel is None:
        raise ValueError(f"no fused kernel takes {dtype} on {q.device}")
    _, lse = attend(kernel, asking, answering, answering, view.is_causal, view.scaling)
    if view.is_causal:
        lse = lse.flip(2)
    return torch.exp(lse)
