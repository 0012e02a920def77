"""The press contract, and the cache surgery every press shares.

A press is a dataclass whose docstring names its paper and parameters. It says, for each layer of
a prefill, which cached entries to keep: :meth:`Press.keep` returns a [B, Hkv, T] bool tensor.
Most presses are :class:`ScorerPress`\\ es: one method, :meth:`ScorerPress.score`, gives every
cached entry a score per kv head ([B, Hkv, T]) and the base keeps the ``budget`` highest of each
head. ``ratio`` is the fraction of the cache removed, as in kvpress: a head keeps
``int(T * (1 - ratio))`` entries.

What the base class owns (:func:`compress`):

- scores that read attention come from the engine during the prefill (a probe that sums, per key,
  the attention of every query or of the last queries: from the fused route's log-sum-exps on a plain
  prefill, from ``Block.column_sums`` and block rows otherwise); no eager attention, no [T, T] matrix;
- decoding runs the model's own attention over the pressed cache when every layer keeps as many
  entries; the engine stays on for ragged caches, per-layer budgets and ``h2o:decode=true``;
- after the prefill forward, every layer of the model's cache is replaced by the kept entries:
  a :class:`~headmap.presses.cache.PressedLayer` when every head keeps as many entries (a gather
  on the layer's own tensors), a :class:`~headmap.presses.cache.RaggedLayer` otherwise (packed,
  read through an engine edit). The tensors of the full cache are freed;
- padding tokens (left padding of a batch) score lowest, so they are dropped before any real
  token; kept entries stay in order of position.

Positions of later tokens are those of the uncompressed sequence (the layers report the number
of tokens seen, not stored). See docs/compress.md.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from ..engine import observe
from ..engine.block import Block
from ..engine.fused import column_mass, rows_mass
from ..errors import PressError
from ..models import is_causal_lm, model_shape
from ..specs import parse_options, split_top
from .cache import PressedLayer, RaggedLayer, RaggedMask, cache_bytes


@dataclass
class LayerView:
    """What a press sees of one layer at the end of the prefill.

    ``keys``/``values`` [B, Hkv, T, D] (after RoPE); ``key_valid`` [B, T] bool (real tokens);
    ``item_start`` [B] (position of each row's first real token); ``received`` [B, H, T] float64:
    attention each key received, summed over the real prefill queries (None unless the press
    asked for it); ``window`` [B, H, T] float64: the same summed over the last ``window_rows``
    queries only.
    """

    layer: int
    layers: int
    heads: int
    kv_heads: int
    keys: torch.Tensor
    values: torch.Tensor
    key_valid: torch.Tensor
    item_start: torch.Tensor
    received: torch.Tensor | None = None
    window: torch.Tensor | None = None
    window_rows: int = 0
    model: Any = None

    @property
    def length(self) -> int:
        return self.key_valid.shape[1]

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    def per_kv_head(self, scores: torch.Tensor) -> torch.Tensor:
        """[B, H, T] -> [B, Hkv, T]: the mean over the query heads that share a kv head (GQA)."""
        batch, _, length = scores.shape
        return scores.view(batch, self.kv_heads, self.group, length).mean(dim=2)

    def positions(self) -> torch.Tensor:
        """[B, T] long: position of each key inside its row (0 = first real token; padding < 0)."""
        cols = torch.arange(self.length, device=self.keys.device)
        return cols[None, :] - self.item_start[:, None]


def check_ratio(name: str, ratio: Any) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        raise PressError(f"{name}: ratio must be a number in [0, 1), got {ratio!r}")
    if not 0.0 <= float(ratio) < 1.0:
        raise PressError(
            f"{name}: ratio is the fraction of the cache removed and must be in [0, 1), got {ratio}; "
            "e.g. ratio=0.5 keeps half of it"
        )
    return float(ratio)


def check_count(name: str, key: str, value: Any, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise PressError(f"{name}: {key} must be a whole number >= {low}, got {value!r}")
    return value


@dataclass
class Press:
    """Base press. Subclasses are dataclasses that set ``name`` and implement :meth:`keep`."""

    #: name on the command line (``--press NAME:key=value``)
    name: ClassVar[str] = ""
    #: the scores read attention summed over every prefill query (``LayerView.received``)
    reads_received: ClassVar[bool] = False
    #: the scores read attention of the last ``window`` queries (``LayerView.window``)
    reads_window: ClassVar[bool] = False

    ratio: float = 0.0

    def __post_init__(self) -> None:
        self.ratio = check_ratio(self.name, self.ratio)

    # -- what a press says -------------------------------------------------------------------
    def keep(self, view: LayerView) -> torch.Tensor:
        """[B, Hkv, T] bool: the entries of this layer to keep."""
        raise NotImplementedError

    def window_rows(self) -> int:
        """How many of the last queries ``LayerView.window`` sums (``reads_window``)."""
        return 0

    def bind(self, model: nn.Module) -> None:
        """Called once when :func:`compress` starts: check the press against the model."""

    @property
    def head_wise(self) -> bool:
        """True when heads may keep different numbers of entries (a :class:`RaggedLayer`)."""
        return False

    @property
    def evicts_in_decoding(self) -> bool:
        """True when the press also keeps a fixed budget while decoding (one entry out per token in)."""
        return False

    def decode_scores(self, layer: PressedLayer) -> torch.Tensor:
        """[B, Hkv, stored] scores of a tracked layer's entries after a decoding step (higher = keep)."""
        raise NotImplementedError

    def notes(self, length: int) -> list[str]:
        """Remarks for the user about a prefill of ``length`` tokens (e.g. 'the window covers it')."""
        return []

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not isinstance(getattr(self, f.name), Press)}

    def describe(self) -> str:
        return f"{self.name}(" + ", ".join(f"{k}={v}" for k, v in self.params().items()) + ")"


@dataclass
class ScorerPress(Press):
    """A press that scores every entry ([B, Hkv, T], higher = keep) and keeps the ``budget`` best per head."""

    def score(self, view: LayerView) -> torch.Tensor:
        raise NotImplementedError

    def budget(self, view: LayerView) -> int:
        """Entries each kv head of this layer keeps: ``int(T * (1 - ratio))`` (kvpress's definition)."""
        return int(view.length * (1 - self.ratio))

    def keep(self, view: LayerView) -> torch.Tensor:
        n = min(max(self.budget(view), 0), view.length)
        if n >= view.length:
            return torch.ones(view.keys.shape[:3], dtype=torch.bool, device=view.keys.device)
        scores = drop_padding_first(self.score(view), view.key_valid)
        return top_mask(scores, n)


def drop_padding_first(scores: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """Scores with padding columns set to -inf (dropped before any real token)."""
    scores = scores.to(torch.float64)
    return scores.masked_fill(~key_valid[:, None, :], -math.inf)


def top_mask(scores: torch.Tensor, n: int) -> torch.Tensor:
    """[..., T] bool: True on the ``n`` highest scores of each row (ties: the lower index, as topk)."""
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if n > 0:
        keep.scatter_(-1, scores.topk(n, dim=-1, sorted=False).indices, True)
    return keep


# -- what the engine gives the presses --------------------------------------------------------
class _Collector:
    """A probe: per layer, the attention each key receives, summed over real queries (all, or the last rows).

    Fused (:mod:`headmap.engine.fused`): a plain prefill call (no padding, no edit) runs as one fused
    kernel, and the sums come from its log-sum-exps: every row's column sums by one more fused call with
    queries and keys exchanged (:func:`~headmap.engine.fused.column_mass`), the last rows' probabilities
    as ``exp(s_ij - lse_i)`` from a [window, T] product. Any other call (padding, decoding) takes blocks.
    """

    reads_qk = False
    fused = True

    def __init__(self, received: bool, window: int) -> None:
        self.want_received = received
        self.window = window
        self.active = False
        self.received: dict[int, torch.Tensor] = {}
        self.last: dict[int, torch.Tensor] = {}
        self.length = 0

    def reset(self, length: int) -> None:
        self.received, self.last, self.length = {}, {}, length

    @staticmethod
    def _add(store: dict, layer: int, start: int, mass: torch.Tensor, length: int) -> None:
        """Add ``mass`` [B, H, n] to the layer's sums over the key columns ``start`` to ``start + n``."""
        end = start + mass.shape[-1]
        acc = store.get(layer)
        if acc is None:
            acc = store[layer] = mass.new_zeros(mass.shape[0], mass.shape[1], max(length, end))
        elif acc.shape[-1] < end:  # decoding: the call's key count is known only from its blocks
            acc = store[layer] = torch.nn.functional.pad(acc, (0, end - acc.shape[-1]))
        acc[..., start:end] += mass

    def update(self, block: Block) -> None:
        if not self.active:
            return
        if self.want_received:
            mass, _ = block.column_sums(exclude_self=False)  # [B, H, bk] float64, real query rows only
            self._add(self.received, block.layer, block.k_start, mass, self.length)
        if self.window and self.length:
            first = self.length - self.window  # rows [first, T) are the last `window` queries
            r0 = max(first - block.q_start, 0)
            if r0 < block.q_end - block.q_start:
                probs = block.probs[:, :, r0:, :]
                weights = block.query_valid[:, r0:].to(torch.float64)[:, None, :, None]
                mass = (probs.to(torch.float64) * weights).sum(dim=2)  # exact float64 sums of float32 entries
                self._add(self.last, block.layer, block.k_start, mass, self.length)

    def update_fused(self, view) -> None:
        """The same sums from a plain call's fused kernel: every query is real and the keys start at 0."""
        if not self.active:
            return
        if self.want_received:
            mass = column_mass(view).to(torch.float64)  # [B, H, Tk], the diagonal included
            self._add(self.received, view.layer, 0, mass, self.length)
        if self.window and self.length:
            mass = rows_mass(view, max(self.length - self.window, 0))  # [B, H, Tk] float64
            self._add(self.last, view.layer, 0, mass, self.length)

    def commit(self) -> None:
        pass


# -- the context manager ------------------------------------------------------------------------
@dataclass
class Compression:
    """What :func:`compress` hands back: the press, what each layer kept, notes, and the cache."""

    press: Press
    kept: dict[int, torch.Tensor] = field(default_factory=dict)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    cache: Any = None
    full_bytes: int = 0
    record_scores: bool = False
    #: with ``record_scores`` and a press that evicts while decoding: per decoding step, layer ->
    #: positions [B, Hkv, n] of the entries the step's query saw (its own included)
    history: list[dict[int, torch.Tensor]] = field(default_factory=list)

    def cache_bytes(self) -> int:
        """Bytes of the keys and values the model's cache holds now, measured from its tensors."""
        return cache_bytes(self.cache) if self.cache is not None else 0


def check_model(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is None:
        raise PressError(f"{type(model).__name__} is not a transformers model; presses need one")
    if not is_causal_lm(config) or not hasattr(model, "generate"):
        raise PressError(
            f"model type '{getattr(config, 'model_type', '?')}' is an encoder without a KV cache; presses compress "
            "the cache of a decoder (causal LM) during generation"
        )


def _forward_inputs(args: tuple, kwargs: dict) -> tuple[int, torch.Tensor | None, Any]:
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    source = ids if ids is not None else embeds
    length = source.shape[1] if source is not None else 0
    return length, kwargs.get("attention_mask"), kwargs.get("past_key_values")


def _is_empty(cache: Any) -> bool:
    return cache is None or (hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0)


@contextmanager
def compress(
    model: nn.Module, press: Press, record_scores: bool = False, run: Compression | None = None
) -> Iterator[Compression]:
    """Press the KV cache of every prefill run inside the ``with`` block.

        with headmap.presses.compress(model, SnapKVPress(ratio=0.5)) as run:
            out = model.generate(**inputs, max_new_tokens=20)
        run.cache_bytes(), run.kept[0]

    A forward that starts from an empty cache is a prefill: at its end every layer of its cache
    keeps what ``press`` says. Later forwards (decoding) append to the pressed cache. The engine
    runs the prefill when the press reads attention or keeps different numbers of entries per head;
    decoding runs the model's own attention (sdpa, eager, ...) over the pressed cache, unless the
    press keeps different numbers of entries per head (a ragged cache, read through an engine edit)
    or per layer (one mask cannot serve them all), or adds each decoding query's attention to running
    sums (``h2o:decode=true``).

    ``run``: a prefill already pressed with ``press`` (:func:`headmap.presses.shared.press_prefill`):
    the forwards inside the block decode from its cache as they would after a prefill here.
    """
    if not isinstance(press, Press):
        raise PressError(
            f"compress needs a press (e.g. headmap.presses.make_press('snapkv', ratio=0.5)), got {press!r}"
        )
    check_model(model)
    press.bind(model)
    shape = model_shape(model)
    if run is None:
        run = Compression(press=press, record_scores=record_scores)
    elif run.press is not press:
        raise PressError("compress(run=...) needs the press that pressed that run's cache")
    collector = _Collector(press.reads_received, press.window_rows() if press.reads_window else 0)
    state: dict[str, Any] = {}
    needs_engine = press.reads_received or press.reads_window or press.head_wise
    # Decoding needs the engine only to read a ragged cache or to add each step's attention to running
    # sums; after any other press the decoding steps run the model's own attention (sdpa, eager, ...).
    decodes_in_engine = press.head_wise or (press.evicts_in_decoding and press.reads_received)
    session = observe(model, probes=[collector], edits=[RaggedMask(lambda: run.cache)], commit="manual")
    entered = False

    def engine(on: bool) -> None:
        nonlocal entered
        if on and not entered:
            session.__enter__()
        elif not on and entered:
            session.__exit__(None, None, None)
        entered = on

    def pre_hook(module, args, kwargs):
        length, mask, cache = _forward_inputs(args, kwargs)
        state["prefill"] = _is_empty(cache) and length > 0
        if state["prefill"]:
            engine(needs_engine)  # a press that decodes in the engine needs it for the prefill too
        state["mask"] = mask
        state["length"] = length
        collector.active = state["prefill"] or (press.evicts_in_decoding and press.reads_received)
        collector.reset(length if state["prefill"] else 0)
        if state["prefill"]:
            run.cache = None  # a new sequence: the edit must not read the previous one's ragged layers

    def hook(module, args, kwargs, output):
        if not state.get("prefill"):
            if press.evicts_in_decoding and run.cache is not None:
                _evict(run, collector)
            collector.active = False
            return output
        collector.active = False
        cache = getattr(output, "past_key_values", None)
        if cache is None or not hasattr(cache, "layers"):
            return output
        run.cache = cache
        run.full_bytes = cache_bytes(cache)
        _press_cache(run, cache, collector, state, shape, model)
        collector.reset(0)
        if not decodes_in_engine and _uniform(cache):
            engine(False)
        return output

    handles = []
    try:
        handles.append(model.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(model.register_forward_hook(hook, with_kwargs=True))
        pressed = run.cache is not None  # compress(run=...): decode from a prefill pressed elsewhere
        if decodes_in_engine or (pressed and needs_engine and not _uniform(run.cache)):
            engine(True)
        yield run
    finally:
        engine(False)
        for handle in handles:
            handle.remove()


def _uniform(cache: Any) -> bool:
    """True when the model's own attention can read the pressed cache: no ragged layer, and every
    full-attention layer stores as many entries (transformers builds one mask for all of them from the
    first one's sizes; pyramidkv's budgets differ by layer, so its decoding stays in the engine)."""
    stored = set()
    for layer in cache.layers:
        if isinstance(layer, RaggedLayer):
            return False
        if getattr(layer, "is_sliding", False) or getattr(layer, "keys", None) is None:
            continue
        stored.add(layer.keys.shape[2])
    return len(stored) <= 1


def _press_cache(run: Compression, cache: Any, collector: _Collector, state: dict, shape, model) -> None:
    length = state["length"]
    mask = state["mask"]
    for layer, entry in enumerate(cache.layers):
        if isinstance(entry, PressedLayer) or getattr(entry, "keys", None) is None:
            continue
        keys, values = entry.keys, entry.values
        batch = keys.shape[0]
        if mask is not None and mask.ndim == 2:
            key_valid = mask[:, -length:].to(device=keys.device, dtype=torch.bool)
        else:
            key_valid = torch.ones(batch, length, dtype=torch.bool, device=keys.device)
        item_start = key_valid.to(torch.int8).argmax(dim=1)
        view = LayerView(
            layer=layer,
            layers=shape.layers,
            heads=shape.heads,
            kv_heads=keys.shape[1],
            keys=keys,
            values=values,
            key_valid=key_valid,
            item_start=item_start,
            received=collector.received.get(layer),
            window=collector.last.get(layer),
            window_rows=collector.window,
            model=model,
        )
        bounded = keys.shape[2] != length  # a sliding layer that already dropped its oldest entries
        reads_attention = run.press.reads_received or run.press.reads_window
        if run.record_scores and isinstance(run.press, ScorerPress) and (reads_attention or not bounded):
            run.scores[layer] = run.press.score(view).to(torch.float64)
        if bounded:
            note = f"layer {layer} is a sliding-window layer whose cache is already bounded; it is left as it is"
            if note not in run.notes:
                run.notes.append(note)
            continue
        keep = run.press.keep(view)
        run.kept[layer] = keep
        pressed = _surgery(entry, keep, key_valid, length)
        if run.press.evicts_in_decoding and not isinstance(pressed, RaggedLayer):
            if not isinstance(pressed, PressedLayer):  # all kept now; the budget still holds while decoding
                pressed = PressedLayer(keys, values, seen=length)
            idx = torch.nonzero(keep)[:, 2].view(batch, keys.shape[1], -1)
            scores = run.press.score(view).gather(2, idx) if run.press.reads_received else None
            pressed.track(run.press.budget(view), idx, item_start, scores)
        cache.layers[layer] = pressed
    for note in run.press.notes(length):  # after the layers: a press may find a note while choosing (head_aware)
        if note not in run.notes:
            run.notes.append(note)
            warnings.warn(note, stacklevel=4)


def _evict(run: Compression, collector: _Collector) -> None:
    """After a decoding step: add the step's attention to running scores, then drop down to the budget."""
    step: dict[int, torch.Tensor] = {}
    for index, layer in enumerate(run.cache.layers):
        if not isinstance(layer, PressedLayer) or layer.budget is None:
            continue
        if run.record_scores:
            step[index] = layer.positions.clone()
        received = collector.received.get(index)
        if layer.scores is not None and received is not None:
            batch, heads, _ = received.shape
            stored = layer.keys.shape[2]
            received = torch.nn.functional.pad(received, (0, max(0, stored - received.shape[-1])))[..., :stored]
            kv_heads = layer.keys.shape[1]
            layer.scores += received.view(batch, kv_heads, heads // kv_heads, stored).mean(2).float()
        stored = layer.keys.shape[2]
        if stored <= layer.budget:
            continue
        valid = layer.positions >= layer.item_start[:, None, None]
        scores = run.press.decode_scores(layer).to(torch.float64).masked_fill(~valid, -math.inf)
        layer.select(top_mask(scores, layer.budget))
    if step:
        run.history.append(step)


def _surgery(entry: Any, keep: torch.Tensor, key_valid: torch.Tensor, length: int) -> Any:
    """The layer that holds the kept entries of ``entry`` (``entry`` itself when all are kept)."""
    keys, values = entry.keys, entry.values
    batch, kv_heads = keep.shape[:2]
    counts = keep.sum(dim=-1)  # [B, Hkv]
    if bool((counts == length).all()):
        return entry
    if bool((counts == counts.flatten()[0]).all()):
        n = int(counts.flatten()[0])
        idx = torch.nonzero(keep)[:, 2].view(batch, kv_heads, n)  # row-major: positions ascending
        k = keys.gather(2, idx[..., None].expand(-1, -1, -1, keys.shape[-1])).contiguous()
        v = values.gather(2, idx[..., None].expand(-1, -1, -1, values.shape[-1])).contiguous()
        return PressedLayer(k, v, seen=length)
    pads = (keep & ~key_valid[:, None, :]).sum(dim=-1)
    packed_k = keys[keep].contiguous()  # [N, D], row by row, head by head, positions ascending
    packed_v = values[keep].contiguous()
    tail_k = keys.new_zeros(batch, kv_heads, 0, keys.shape[-1])
    tail_v = values.new_zeros(batch, kv_heads, 0, values.shape[-1])
    return RaggedLayer(packed_k, packed_v, counts, pads, length, tail_k, tail_v)


def settable(cls: type[Press]) -> list[str]:
    """Parameters of a press class a user may set (its dataclass fields, minus private ones)."""
    return [f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]


def scorer_from_spec(spec: str, ratio: float) -> ScorerPress:
    """A scoring press from ``NAME[:key=value...]`` (for presses that take another press's scores, e.g. adakv).

    Looks the name up among the subclasses of :class:`ScorerPress`, so that a press module needs no
    import of the package's table of presses.
    """
    parts = [p.strip() for p in split_top(spec.strip(), ":", PressError)]
    classes: dict[str, type[ScorerPress]] = {}
    pending = list(ScorerPress.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if getattr(cls, "name", ""):
            classes.setdefault(cls.name, cls)
    cls = classes.get(parts[0])
    if cls is None:
        raise PressError(
            f"unknown scoring press {parts[0]!r} in {spec!r}; scoring presses: {', '.join(sorted(classes))}"
        )
    params = parse_options("press", cls.name, parts[1:], settable(cls), PressError, f"{cls.name}:window=32")
    params.setdefault("ratio", ratio)
    return cls(**params)
