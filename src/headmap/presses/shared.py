"""One prefill for many presses: record what every press reads, then press a copy of the full cache per press.

A press never changes the prefill's forward: the cache is pressed after the forward returns, so the
hidden states, the logits of the last prompt token and the full cache are those of the model (under
the engine when a press reads attention). :func:`shared_prefill` runs that forward once and records
what each press of a list needs (the attention each key received for h2o, the rows of the last
``window`` queries for every window that snapkv, pyramidkv or adakv reads; the keys are in the cache).
:func:`press_prefill` then hands back, for one press, what :func:`~headmap.presses.compress` would
hold after its own prefill: the same kept entries, the same pressed cache (a copy: the full cache is
left as it was) and the same notes. Decoding from it goes through :func:`compress` with ``run=``, so
presses that also evict while decoding (``streaming:decode=true``, ``h2o:decode=true``) keep doing so.

Arithmetic: the shared forward runs under the engine when any press of the list would (it reads
attention or keeps head-wise budgets). Those presses then see bit for bit the forward of their own
prefill. A press that would run without the engine (``knorm``, ``streaming``, the full cache) reads
the engine's forward instead of the model's own attention: the same keys up to the rounding of exact
attention (see docs/compress.md). See tests/test_presses_shared.py.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..engine import observe
from ..models import logits_to_keep, model_shape, position_ids
from .base import Compression, Press, PressError, _Collector, _press_cache, check_model, compress
from .cache import cache_bytes


def uses_engine(press: Press) -> bool:
    """Whether :func:`compress` runs ``press`` under the engine (it reads attention or keeps head-wise budgets)."""
    return bool(press.reads_received or press.reads_window or press.head_wise)


@dataclass
class SharedPrefill:
    """The full cache of one prefill and what the presses it was recorded for read from it.

    ``cache``: the model's cache after the prompt (not to be changed: :func:`press_prefill` copies
    it); ``logits`` [B, V]: the logits of the last prompt token; ``mask``: the attention mask of the
    prompt; ``received``: layer -> [B, H, T] float64 attention each key received over every real
    query; ``windows``: rows w -> layer -> [B, H, T] float64 attention from the last w queries;
    ``engine``: whether the forward ran under the engine.
    """

    cache: Any
    logits: torch.Tensor
    length: int
    mask: torch.Tensor | None
    received: dict[int, torch.Tensor] = field(default_factory=dict)
    windows: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)
    engine: bool = False
    full_bytes: int = 0


def shared_prefill(
    model: nn.Module, presses: Sequence[Press], input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> SharedPrefill:
    """One prefill of ``input_ids`` that records what every press in ``presses`` reads.

    The forward is the one :func:`headmap.models.greedy_decode` makes (position ids from the mask,
    the last position's logits only), under the engine when any press would run under it.
    """
    check_model(model)
    for press in presses:
        if not isinstance(press, Press):
            raise PressError(f"shared_prefill needs presses (headmap.presses.make_press(...)), got {press!r}")
    length = int(input_ids.shape[1])
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    want_received = any(p.reads_received for p in presses)
    rows = sorted({p.window_rows() for p in presses if p.reads_window})
    collectors = [_Collector(want_received, rows[0] if rows else 0)]
    collectors += [_Collector(False, w) for w in rows[1:]]
    for collector in collectors:
        collector.reset(length)
        collector.active = True
    engine = any(uses_engine(p) for p in presses)
    session = observe(model, probes=collectors) if engine else nullcontext()
    kwargs = {"position_ids": position_ids(attention_mask), "use_cache": True, **logits_to_keep(model)}
    with session, torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    for collector in collectors:
        collector.active = False
    cache = out.past_key_values
    if cache is None or not hasattr(cache, "layers"):
        raise PressError(f"{type(model).__name__} returned no layered KV cache after the prefill; presses need one")
    return SharedPrefill(
        cache=cache,
        logits=out.logits[:, -1],
        length=length,
        mask=attention_mask,
        received=collectors[0].received if want_received else {},
        windows={c.window: c.last for c in collectors if c.window},
        engine=engine,
        full_bytes=cache_bytes(cache),
    )


def copy_cache(cache: Any) -> Any:
    """A cache whose layers are new objects holding the same tensors: decoding appends to the copy only.

    transformers' layers grow by concatenation (a new tensor) and a press replaces whole layers, so
    the tensors themselves need no copy.
    """
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    return out


def press_prefill(prefill: SharedPrefill, press: Press, model: nn.Module, record_scores: bool = False) -> Compression:
    """What :func:`compress` holds after its own prefill with ``press``, from the shared ``prefill``.

    The press is bound to ``model`` (as :func:`compress` does), its kept entries are chosen from the
    recorded scores and the keys of the full cache, and a copy of the full cache is pressed.
    """
    if press.reads_received and not prefill.received:
        raise PressError(f"{press.describe()} reads the attention each key received, which this prefill did not record")
    rows = press.window_rows() if press.reads_window else 0
    if rows and rows not in prefill.windows:
        raise PressError(f"{press.describe()} reads the last {rows} queries, which this prefill did not record")
    press.bind(model)
    run = Compression(press=press, record_scores=record_scores)
    collector = _Collector(press.reads_received, rows)
    collector.received = prefill.received if press.reads_received else {}
    collector.last = prefill.windows.get(rows, {}) if rows else {}
    cache = copy_cache(prefill.cache)
    run.cache = cache
    run.full_bytes = prefill.full_bytes
    state = {"length": prefill.length, "mask": prefill.mask}
    _press_cache(run, cache, collector, state, model_shape(model), model)
    return run


def greedy_continue(
    model: nn.Module,
    prefill: SharedPrefill,
    run: Compression,
    steps: int,
    before_forward: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """[B, steps] greedy tokens after ``prefill``, decoding from the pressed cache of ``run``.

    The same tokens and forward calls as :func:`headmap.models.greedy_decode` after a prefill under
    ``run.press`` (its first token comes from the prefill's logits); ``before_forward(k)`` is called
    before decoding forward k (1 .. steps - 1).
    """
    mask = prefill.mask
    token = prefill.logits.argmax(dim=-1)
    generated = [token]
    cache = run.cache
    with compress(model, run.press, run=run), torch.no_grad():
        for t in range(1, steps):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            if before_forward is not None:
                before_forward(t)
            out = model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=mask.sum(dim=1, keepdim=True) - 1,
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            token = out.logits[:, -1].argmax(dim=-1)
            generated.append(token)
    return torch.stack(generated, dim=1)
