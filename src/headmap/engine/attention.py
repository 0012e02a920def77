"""The headmap attention function: exact attention, block by block, with probes and edits.

One function with transformers' attention signature serves every model that calls
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``. For each block of query rows it computes
the logits against every key those rows can see (skipping keys the mask removes for the whole
block), applies edits, takes the softmax in float32 (float64 for a float64 model), hands the
probabilities to the probes, and multiplies the same probabilities by V. No [T, T] matrix exists: a block holds at most
``budget_bytes`` of float32 probabilities (plus a few temporaries of the same size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import NumericalError
from . import fused as fused_route
from .block import Block, QKView
from .mask import LazyMask, as_block_mask
from .registry import context_for
from .towers import tower_of

DEFAULT_BUDGET_BYTES = 64 * 2**20


#: Share of a GPU's free memory that one block (probabilities and temporaries) may take on a GPU.
GPU_FREE_FRACTION = 0.25

#: Largest block budget on a GPU. Measured on an H200 (bench/gpu_profile.py, 4 llama8b-shaped layers,
#: bfloat16, sink probe on the block route; README, "The engine on a GPU"): at 32K tokens budgets of
#: 64 MiB (the CPU default), 1, 2, 4 and 8 GiB took 50x, 6.8x, 5.9x, 5.4x and 5.2x flash sdpa's time;
#: at 8K 64 MiB, 256 MiB, 1 GiB and 4 GiB took 20x, 4.7x, 3.4x and 3.5x. Past 4 GiB a bigger block bought
#: 4 % at 32K for 4.5 GiB more peak memory.
GPU_BLOCK_CAP = 4 * 2**30


@dataclass
class EngineConfig:
    """Process-wide engine settings. ``budget_bytes`` bounds one block of probabilities.

    ``gpu_budget``: on a CUDA device, a scan that kept the default budget sizes blocks from the free
    device memory instead (:func:`device_budget`); 64 MiB suits CPU caches, not an 80 GiB GPU at 32K tokens.
    ``fused``: calls whose probes all read only log-sum-exps run one fused kernel instead of blocks
    (:mod:`headmap.engine.fused`); False forces the block route everywhere.
    """

    budget_bytes: int = DEFAULT_BUDGET_BYTES
    # Bytes of temporaries per probability (logits, exponentials, probabilities, mask).
    temporaries: int = 3
    gpu_budget: bool = True
    #: take the fused route (:mod:`headmap.engine.fused`) for calls whose probes all support it
    fused: bool = True


CONFIG = EngineConfig()


def device_budget(device: torch.device | str, heads: int, free_bytes: int | None = None, batch: int = 1) -> int:
    """The block budget (bytes) a scan uses on ``device``.

    CPU, or a budget the user set: ``CONFIG.budget_bytes``. CUDA with the default budget (or any
    device when ``free_bytes`` is given, as tests do): :data:`GPU_FREE_FRACTION` of the free memory
    (``torch.cuda.mem_get_info``), at most :data:`GPU_BLOCK_CAP` and the bytes of a block of 1024 rows
    of ``heads`` heads and ``batch`` inputs at 128K keys, rounded down to a power of two (ranks on like
    GPUs agree) and at least the default.
    """
    device = torch.device(device)
    if free_bytes is None:
        if device.type != "cuda" or not CONFIG.gpu_budget or CONFIG.budget_bytes != DEFAULT_BUDGET_BYTES:
            return CONFIG.budget_bytes
        free_bytes, _ = torch.cuda.mem_get_info(device)
    share = int(free_bytes * GPU_FREE_FRACTION)
    cap = 1024 * batch * max(heads, 1) * 131072 * 4 * CONFIG.temporaries
    budget = min(share, cap, GPU_BLOCK_CAP)
    if budget < DEFAULT_BUDGET_BYTES:
        return DEFAULT_BUDGET_BYTES
    return 1 << (budget.bit_length() - 1)


_GPU_BUDGETS: dict[tuple, int] = {}


def call_budget(device: torch.device, heads: int, batch: int) -> int:
    """The block budget of one attention call: ``CONFIG.budget_bytes``, or on a CUDA device whose budget
    nobody set, :func:`device_budget` from the free memory at the first call on that device (kept for
    the process, so that every call, layer and forward uses the same blocks)."""
    if device.type != "cuda" or not CONFIG.gpu_budget or CONFIG.budget_bytes != DEFAULT_BUDGET_BYTES:
        return CONFIG.budget_bytes
    key = (str(device), heads, batch)
    if key not in _GPU_BUDGETS:
        _GPU_BUDGETS[key] = device_budget(device, heads, batch=batch)
    return _GPU_BUDGETS[key]


def rows_per_block(batch: int, heads: int, keys: int, budget_bytes: int | None = None) -> int:
    """How many query rows fit one block under the byte budget (at least one)."""
    budget = CONFIG.budget_bytes if budget_bytes is None else budget_bytes
    per_row = batch * heads * max(keys, 1) * 4 * CONFIG.temporaries
    return max(1, budget // per_row)


def _row_blocks(batch: int, heads: int, q_len: int, k_len: int, causal: bool, q_offset: int, budget: int | None = None):
    """Query row ranges [q0, q1) whose probabilities fit the budget.

    Causal rows see only the keys up to themselves, so early blocks may hold more rows: rows r
    starting at q0 see at most q_offset + q0 + r keys, and r is the largest with
    r * (q_offset + q0 + r) within the budget. (Thin blocks cost BLAS throughput.)
    """
    budget = CONFIG.budget_bytes if budget is None else budget
    cap = max(1, budget // (batch * heads * 4 * CONFIG.temporaries))  # rows x keys
    q0 = 0
    while q0 < q_len:
        if causal:
            seen = min(k_len, q_offset + q0)
            rows = int((-seen + math.sqrt(seen * seen + 4 * cap)) / 2)
            while rows > 1 and rows * min(k_len, seen + rows) > cap:
                rows -= 1
        else:
            rows = cap // max(k_len, 1)
        q1 = min(q_len, q0 + max(1, rows))
        yield q0, q1
        q0 = q1


def _masked_segments(mask: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """Column ranges of a block mask that hold some hidden entry.

    A causal block is fully visible except near the diagonal; with left padding also in the
    first columns. Masking only the columns that need it saves a pass over the whole block.
    """
    full = mask.all(dim=2).all(dim=1).all(dim=0)  # [bk]: visible from every row
    idx = torch.nonzero(full)
    keys = mask.shape[-1]
    if idx.numel() == 0:
        return ((0, keys),)
    first, last = int(idx[0]), int(idx[-1]) + 1
    if not bool(full[first:last].all()):
        return ((0, keys),)
    return tuple(seg for seg in ((0, first), (last, keys)) if seg[1] > seg[0])


@dataclass
class BlockPlan:
    """What the mask says about one block of rows; the same for every layer sharing the mask."""

    span: tuple[int, int] | None  # key columns [k0, k1) some row can see
    segments: tuple[tuple[int, int], ...]  # column ranges (relative to k0) holding hidden entries
    empty_rows: bool  # some row sees no key at all
    q_pos: torch.Tensor
    query_valid: torch.Tensor
    first_mask: torch.Tensor | None  # the block's mask, when it was built to make the plan


def _plan_cache(masks: object) -> dict | None:
    """Plans live on the lazy mask object, which every layer of one forward shares."""
    if not isinstance(masks, LazyMask):
        return None
    if masks.plans is None:
        masks.plans = {}
    return masks.plans


def _plan_block(
    masks, q0: int, q1: int, k_len: int, cross: bool = False, device: torch.device | None = None
) -> BlockPlan:
    """``cross``: the keys come from another sequence, whose padding says nothing about the query rows;
    a row then counts as real when it sees some key. ``device``: where the block's layer runs."""
    allowed = masks.block(q0, q1, 0, k_len)
    if device is not None:
        allowed = allowed.to(device)  # the mask lives where the inputs are; the block where its layer is
    q_pos = torch.arange(q0, q1, device=allowed.device) + masks.q_offset
    row_any = allowed.any(dim=-1)[:, 0]  # [B, bq]
    span = _key_range(allowed)
    if span is None:
        return BlockPlan(None, (), True, q_pos, row_any, None)
    blk = allowed[..., span[0] : span[1]]
    return BlockPlan(
        span=span,
        segments=_masked_segments(blk),
        empty_rows=not bool(row_any.all()),
        q_pos=q_pos,
        query_valid=row_any if cross else row_any & _query_valid(masks, q_pos),
        first_mask=blk,
    )


def _query_valid(masks, q_pos: torch.Tensor) -> torch.Tensor:
    """``masks.query_valid(q_pos)`` on ``q_pos``'s device (the mask may live on another one)."""
    where = getattr(masks, "device", q_pos.device)
    return masks.query_valid(q_pos.to(where)).to(q_pos.device)


def _mask_source(masks, plan: BlockPlan):
    """Build (a column range of) a block's mask only when something reads it."""
    first = plan.first_mask
    plan.first_mask = None  # used once, then rebuilt on demand: no mask outlives its block
    q0 = int(plan.q_pos[0]) - masks.q_offset
    q1 = q0 + plan.q_pos.numel()
    k0 = plan.span[0]

    device = plan.q_pos.device

    def source(a: int, b: int) -> torch.Tensor:
        if first is not None:
            return first[..., a:b]
        return masks.block(q0, q1, k0 + a, k0 + b).to(device)

    return plan, source


def _key_range(allowed: torch.Tensor) -> tuple[int, int] | None:
    """First and one-past-last key column any row of the block may see; None if none."""
    cols = allowed.any(dim=2).any(dim=1).any(dim=0)  # [Tk]
    idx = torch.nonzero(cols)
    if idx.numel() == 0:
        return None
    return int(idx[0]), int(idx[-1]) + 1


@torch.compiler.disable
def headmap_attention_forward(
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
    """Exact attention; signature of transformers' ``AttentionInterface`` functions.

    Under ``torch.compile`` this function runs eagerly (``torch.compiler.disable``; the rest of the model
    compiles around it): inductor's compiled blocks handed the probes wrong values (a sink value off by
    0.13 on the tiny test Llama, logits still equal) and bought no time here (docs/engine.md).

    query [B, H, Tq, D]; key and value [B, Hkv, Tk, D]; returns ([B, Tq, H, Dv], None).
    ``softcap`` (Gemma 2) caps the logits with tanh; ``s_aux`` (gpt-oss) is one learned sink
    logit per head that joins the softmax denominator and takes no value. ``position_bias`` (T5's
    relative position bias, [1 or B, H, Tq, Tk]) is added to the scaled logits, as T5's eager does.
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} key/value heads evenly")
    group = heads // kv_heads
    scaling = head_dim**-0.5 if scaling is None else float(scaling)
    causal = is_causal if is_causal is not None else bool(getattr(module, "is_causal", True))
    masks = as_block_mask(attention_mask, batch, q_len, k_len, causal, query.device)
    device = query.device  # this layer's device: under a device map, layers sit on different devices
    ctx = context_for(module, heads, kv_heads)
    layer = ctx.layer if ctx is not None else getattr(module, "layer_idx", -1)
    probes = ctx.probes if ctx is not None else ()
    edits = ctx.edits_for(layer) if ctx is not None else ()
    check_finite = ctx.check_finite if ctx is not None else False
    tower, is_cross = tower_of(module, ctx.model if ctx is not None else None)

    item_start = (
        masks.item_start().to(device)
        if hasattr(masks, "item_start")
        else torch.zeros(batch, dtype=torch.long, device=device)
    )
    bias = kwargs.get("position_bias")
    if isinstance(bias, torch.Tensor):
        bias = bias[..., -q_len:, -k_len:]  # a bias built for more rows or keys than this call's (T5 decoding)
    else:
        bias = None
    sink_logits = None
    if s_aux is not None:
        sink_logits = s_aux.reshape(1, heads, 1, 1).to(softmax_dtype(query.dtype))

    train_dropout = dropout if module.training and dropout > 0 else 0.0
    track_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (query, key, value) if isinstance(t, torch.Tensor)
    )

    fused_kernel = fused_route.usable(
        probes,
        edits,
        fused_route.plain_pattern(masks, q_len, k_len),
        query,
        key,
        value,
        softcap,
        sink_logits,
        bias,
        train_dropout,
        track_grad,
        CONFIG.fused,
    )
    if fused_kernel is not None:
        done = _fused_call(
            fused_kernel, module, layer, query, key, value, masks, causal, scaling, item_start, tower, is_cross,
            probes, check_finite,
        )  # fmt: skip
        if done is not None:
            return done, None

    # One O(T d) copy so that every block's matmuls read dense rows: models with a fused QKV
    # projection (GPT-2) hand strided views, which halve BLAS throughput on thin blocks.
    key, value = key.contiguous(), value.contiguous()
    # A power-of-two scale commutes exactly with the matmul's rounding: fold it into Q (rows x d)
    # instead of a pass over every logit (rows x T). Other scales are applied to the logits,
    # as eager does, to keep its rounding.
    logit_scale = scaling
    q_scale = 1.0
    if math.frexp(scaling)[0] == 0.5:
        q_scale, scaling = scaling, 1.0

    qk_probes = [p for p in probes if getattr(p, "reads_qk", False)]
    if qk_probes:
        view = QKView.for_call(
            layer,
            module,
            query,
            key,
            value,
            masks,
            logit_scale,
            item_start=item_start,
            softcap=softcap,
            sink_logits=sink_logits,
            is_causal=causal,
            tower=tower,
            is_cross=is_cross,
        )
        for probe in qk_probes:
            probe.update_qk(view)

    outputs = []
    # the finite check reads the device once per call, after the loop: no host sync between blocks
    deferred: list[tuple[torch.Tensor, Block]] = []
    plans = _plan_cache(masks)
    budget = call_budget(device, heads, batch)
    for q0, q1 in _row_blocks(batch, heads, q_len, k_len, causal, masks.q_offset, budget):
        # one plan per device: the layers of one forward share the mask, maybe not the device
        plan = plans.get((q0, q1, k_len, device, is_cross)) if plans is not None else None
        if plan is None:
            plan = _plan_block(masks, q0, q1, k_len, is_cross, device)
            if plans is not None:
                plans[(q0, q1, k_len, device, is_cross)] = plan
        if plan.span is None:  # every row fully masked (e.g. left padding): zero output
            outputs.append(query.new_zeros(batch, heads, q1 - q0, value.shape[-1]))
            continue
        k0, k1 = plan.span
        block = Block(
            layer=layer,
            module=module,
            num_heads=heads,
            num_kv_heads=kv_heads,
            q_start=q0,
            q_end=q1,
            k_start=k0,
            k_end=k1,
            q_pos=plan.q_pos,
            k_pos=torch.arange(k0, k1, device=query.device) + masks.kv_offset,
            query_valid=plan.query_valid,
            item_start=item_start,
            is_causal=causal,
            mask_source=_mask_source(masks, plan),
            tower=tower,
            is_cross=is_cross,
        )
        qb = query[:, :, q0:q1]
        if q_scale != 1.0:
            qb = qb * q_scale
        kb = key[:, :, k0:k1]
        vb = value[:, :, k0:k1]

        bb = bias[..., q0:q1, k0:k1] if bias is not None else None

        def run(qb, kb, vb, sink_logits, _block=block, _bias=bb, _once=[True]):  # noqa: B006
            out = _attend_block(
                qb,
                kb,
                vb,
                _block,
                group,
                scaling,
                softcap,
                sink_logits,
                edits,
                probes if _once[0] else (),
                train_dropout,
                _bias,
            )
            _once[0] = False  # a checkpoint recompute must not count the block twice
            if check_finite and track_grad:
                _check_finite(out, _block, edits, ctx.edits)
            elif check_finite:
                deferred.append((_finite_rows(out, _block).all(), _block))
            return out

        if track_grad:
            outputs.append(checkpoint(run, qb, kb, vb, sink_logits, use_reentrant=False))
        else:
            outputs.append(run(qb, kb, vb, sink_logits))

    if deferred and not bool(torch.stack([ok for ok, _ in deferred]).all()):  # one sync per attention call
        _first_bad(outputs, deferred, edits, ctx.edits if ctx is not None else ())
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    out = out.transpose(1, 2).contiguous()
    if qk_probes:
        view.output = out
    return out, None


def _fused_call(
    kernel: str,
    module: nn.Module,
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    masks: object,
    causal: bool,
    scaling: float,
    item_start: torch.Tensor,
    tower: str,
    is_cross: bool,
    probes: tuple,
    check_finite: bool,
) -> torch.Tensor | None:
    """One call by a fused kernel (:mod:`.fused`): [B, Tq, H, Dv] output, the probes updated from the
    call's log-sum-exps. None when the output is not finite and a finite check is on: the block route
    then redoes the call and names the first bad head and row."""
    if check_finite and not bool(torch.stack([torch.isfinite(t).all() for t in (query, key, value)]).all()):
        return None  # a fused kernel may hide a NaN logit (its running max skips it): blocks see every one
    out, lse = fused_route.attend(kernel, query, key, value, causal, scaling)
    if check_finite and not bool(torch.isfinite(out).all() & torch.isfinite(lse).all()):  # one host read
        return None
    # a plain pattern has no padding: every key is real
    every_key = torch.ones(query.shape[0], key.shape[2], dtype=torch.bool, device=query.device)
    view = QKView.for_call(
        layer,
        module,
        query,
        key,
        value,
        masks,
        scaling,
        item_start=item_start,
        key_valid=every_key,
        lse=lse,
        kernel=kernel,
        is_causal=causal,
        tower=tower,
        is_cross=is_cross,
    )
    out = out.transpose(1, 2).contiguous()
    view.output = out
    for probe in probes:
        probe.update_fused(view)
    return out


def softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the logits, softmax and probabilities: float32, or float64 for a float64 model.

    Half-precision models get float32 (their logits are widened once per block); a float64 model
    keeps float64, so that exactness tests can compare against eager attention at float64 rounding.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def _finite_rows(out: torch.Tensor, block: Block) -> torch.Tensor:
    """[B, H, rows] bool: the row's output is finite, or the row is padding."""
    return torch.isfinite(out).all(dim=-1) | ~block.query_valid[:, None, :]


def _first_bad(outputs: list, deferred: list, edits: tuple, all_edits: tuple) -> None:
    """Raise for the first block (in row order) whose output is not finite."""
    by_start = {int(o_start): o for o_start, o in _output_starts(outputs)}
    for ok, blk in deferred:
        if not bool(ok):
            _check_finite(by_start[blk.q_start], blk, edits, all_edits)


def _output_starts(outputs: list):
    start = 0
    for o in outputs:
        yield start, o
        start += o.shape[2]


def _check_finite(out: torch.Tensor, block: Block, edits: tuple = (), all_edits: tuple = ()) -> None:
    """Raise NumericalError naming the first layer, head and query whose attention output is not finite.

    ``edits`` are the edits on this block's layer, ``all_edits`` those of every active session. With
    edits on, the message names them (those on the head, else every active one): an edit's setting is
    then the likeliest cause.
    """
    finite = _finite_rows(out, block)  # [B, H, rows]
    if bool(finite.all()):
        return
    b, h, r = (int(x) for x in torch.nonzero(~finite)[0])
    pos = int(block.q_pos[r] - block.item_start[b])
    where = f"attention of layer {block.layer} head {h} is NaN or infinite (batch row {b}, query position {pos})"

    def on_head(edit: object) -> bool:
        heads = edit.layer_heads(block) if hasattr(edit, "layer_heads") else None
        return heads is None or h in heads

    def name(edit: object) -> str:
        return edit.describe() if hasattr(edit, "describe") else type(edit).__name__

    named = [e for e in edits if on_head(e)]
    whose = "on this head" if named else "active"
    named = named or list(all_edits)
    if named:
        raise NumericalError(
            f"{where} with the edit{'s' if len(named) > 1 else ''} {whose}: {'; '.join(map(name, named))}. "
            "The edit's setting overflows the arithmetic (e.g. a temperature tau near 0, a huge factor): "
            "choose a milder value"
        )
    raise NumericalError(
        f"{where}; the model overflows in this dtype or its weights hold NaN: try --dtype float32, or check the weights"
    )


def _attend_block(
    qb: torch.Tensor,
    kb: torch.Tensor,
    vb: torch.Tensor,
    block: Block,
    group: int,
    scaling: float,
    softcap: float | None,
    sink_logits: torch.Tensor | None,
    edits: tuple,
    probes: tuple,
    train_dropout: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    batch, heads, rows, head_dim = qb.shape
    kv_heads, keys = kb.shape[1], kb.shape[2]
    # GQA without copying K: fold the query heads of one kv head into the row axis.
    qg = qb.reshape(batch, kv_heads, group * rows, head_dim)
    plan: BlockPlan = block.plan
    # In place where autograd is off: each elementwise pass over a block costs as much as a
    # matmul here, and fresh allocations cost more.
    inplace = not torch.is_grad_enabled()
    logits = torch.matmul(qg, kb.transpose(-1, -2)).view(batch, heads, rows, keys)
    if logits.dtype != softmax_dtype(logits.dtype):
        logits = logits.float()
    if scaling != 1.0:
        logits = logits.mul_(scaling) if inplace else logits * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if bias is not None:  # an additive position bias the model computed (T5), in the logits' dtype
        logits = logits + bias.to(logits.dtype)
    for edit in edits:
        logits = edit.edit_logits(block, logits)
    if plan.segments:
        if not inplace:
            logits = logits.clone()
        # The most negative float, not -inf: exp() gives the same 0 and probes can multiply the
        # logits by the probabilities without 0 * inf. A row that sees nothing needs -inf (NaN -> 0).
        hidden = -math.inf if plan.empty_rows else torch.finfo(logits.dtype).min
        for a, b in plan.segments:
            logits[..., a:b].masked_fill_(~block.mask_columns(a, b), hidden)
    if sink_logits is None:
        probs = torch.softmax(logits, dim=-1)
    else:
        sink = sink_logits.expand(batch, heads, rows, 1)
        probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
    if plan.empty_rows:  # rows with no visible key: zeros, not NaN
        probs = torch.nan_to_num(probs, nan=0.0)
    for edit in edits:
        probs = edit.edit_probs(block, probs)
    block.probs = probs
    block.logits = logits
    for probe in probes:
        probe.update(block)
    block.probs = block.logits = None
    if train_dropout:
        probs = F.dropout(probs, p=train_dropout, training=True)
    pv = probs.to(vb.dtype).view(batch, kv_heads, group * rows, keys)
    out = torch.matmul(pv, vb).view(batch, heads, rows, vb.shape[-1])
    for edit in edits:
        out = edit.edit_output(block, out)
    return out
