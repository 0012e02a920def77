"""Base class of edits: training-free changes made inside the attention function.

An edit names the heads it touches and overrides any of three hooks, each called once per block
of complete attention rows (see :class:`headmap.engine.block.Block`):

- ``edit_logits(block, logits)``: [B, H, bq, bk] float32 logits after scaling and softcapping,
  before the mask and the softmax;
- ``edit_probs(block, probs)``: [B, H, bq, bk] float32 probabilities after the softmax; the
  probes see, and V is multiplied by, what this returns;
- ``edit_output(block, out)``: [B, H, bq, Dv] per-head outputs before the heads are merged.

Each hook returns a tensor of the same shape; the defaults return their input unchanged. Hooks
must be pure functions of their inputs: under autograd the engine recomputes every block inside a
checkpoint, so a hook that updated state would see each block twice. Heads the edit does not name
keep their values bit for bit (``torch.where`` on :meth:`Edit.head_mask`), and an edit at its
neutral setting returns its input tensor itself.

``heads`` is an iterable of (layer, head) pairs, None for every head, or a rule over an atlas
(``"top 5% retrieval"``, ``"sink > 0.5 in layers 2 to 10"``; see :mod:`headmap.edits.heads`),
resolved against ``atlas`` when the edit is made or, failing that, when a session binds it.

**Towers.** An edit acts on one tower of the model (docs/multimodal.md): its layer numbers, its heads
and its heads rule refer to the model's *language tower* (``text``; ``decoder`` in an encoder-decoder;
``vision`` in a vision encoder alone) unless it names another with ``tower=`` (``vision``, ``encoder``,
``decoder``, ``cross`` or ``text``; in a spec ``ablate:heads=[[1,0]]:tower=vision``). A vision tower
numbers its layers from 0 like the language model, so without this rule "layer 3" would be two layers.
The rule lives in one place, the engine's choice of edits for an attention call
(:meth:`headmap.engine.registry.CallContext.edits_for`): the hooks of an edit never see a block of another
tower, and every subclass takes ``tower=`` without declaring it (:meth:`Edit.__init_subclass__`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from .. import models
from ..engine import TOWERS, Block, active_sessions, language_tower, model_towers
from ..errors import EditError, ModelError


def model_shape(model: nn.Module) -> tuple[int, int]:
    """(layers, query heads per layer) from the model's config (:func:`headmap.models.model_shape`), else EditError."""
    if getattr(model, "config", None) is None:
        raise EditError(f"{type(model).__name__} has no config; edits need a transformers model")
    try:
        shape = models.model_shape(model)
    except ModelError as exc:
        raise EditError(str(exc)) from None
    return shape.layers, shape.heads


def _count(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def tower_shape(model: nn.Module, tower: str) -> tuple[int, int] | None:
    """(layers, query heads per layer) of one tower of ``model`` from its config; None when the config does
    not say (the edit's heads are then not checked against the tower).

    ``text`` (and Mllama's ``cross`` layers, which sit among the text layers): :func:`model_shape`.
    ``vision``: the ``vision_config`` (a vision encoder alone: :func:`model_shape`). ``encoder``,
    ``decoder``: the encoder's and the decoder's counts of an encoder-decoder; ``cross``: the decoder's.
    """
    config = getattr(model, "config", None)
    if config is None:
        return None
    main = language_tower(model)
    if tower == "vision":
        if main == "vision":
            return model_shape(model)
        vision = getattr(config, "vision_config", None)
        layers = _count(vision, "num_hidden_layers", "depth", "num_layers")
        heads = _count(vision, "num_attention_heads", "num_heads")
    elif main == "decoder" and tower in ("decoder", "cross"):
        layers = _count(config, "decoder_layers", "num_decoder_layers", "num_layers")
        heads = _count(config, "decoder_attention_heads", "num_heads")
    elif main == "decoder" and tower == "encoder":
        layers = _count(config, "encoder_layers", "num_layers")
        heads = _count(config, "encoder_attention_heads", "num_heads")
    elif tower in ("text", "cross"):
        return model_shape(model)
    else:
        return None
    return (layers, heads) if layers and heads else None


def check_number(edit: str, key: str, value: Any, low: float = 0.0, strict: bool = False) -> float:
    """``value`` as a finite float >= ``low`` (> ``low`` when ``strict``), else EditError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EditError(f"{edit}: {key} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise EditError(f"{edit}: {key} must be a finite number, got {value}")
    if value < low or (strict and value == low):
        bound = f"greater than {low:g}" if strict else f"at least {low:g}"
        raise EditError(f"{edit}: {key} must be {bound}, got {value:g}")
    return value


def parse_heads(heads: Any, edit: str = "edit") -> list[tuple[int, int]]:
    """(layer, head) pairs from a list of pairs (or one pair ``[layer, head]``)."""
    if isinstance(heads, (list, tuple)) and len(heads) == 2 and all(_is_int(x) for x in heads):
        heads = [heads]
    pairs = []
    try:
        items = list(heads)
    except TypeError:
        items = None
    if items is None:
        raise EditError(f"{edit}: heads must be a list of [layer, head] pairs or a rule string, got {heads!r}")
    for item in items:
        if not isinstance(item, (list, tuple)) or len(item) != 2 or not all(_is_int(x) for x in item):
            raise EditError(f"{edit}: heads must be [layer, head] pairs of integers, got {item!r} in {heads!r}")
        pairs.append((int(item[0]), int(item[1])))
    return sorted(set(pairs))


def _is_int(x: Any) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, int):
        return True
    if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.is_floating_point():
        return True
    return hasattr(x, "__index__") and not isinstance(x, float)


class Edit:
    """Base edit. ``heads``: (layer, head) pairs, None for every head, or a rule over ``atlas``; ``tower``:
    the tower they are in (None: the model's language tower; see the module docstring)."""

    #: Name in specs (``headmap steer --edit NAME:key=value``) and in :data:`headmap.edits.EDITS`.
    name: ClassVar[str] = ""
    #: The towers the edit can act on (None: any). An edit of the language model's attention to image
    #: tokens (``pai``, ``var``) acts on ``text`` only.
    towers: ClassVar[tuple[str, ...] | None] = None
    #: The tower named by ``tower=`` (None: the model's language tower, decided when a session runs it).
    tower: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every edit class takes ``tower=`` (a keyword its own ``__init__`` need not declare)."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_takes_tower", False):
            return

        @functools.wraps(init)
        def __init__(self, *args: Any, tower: str | None = None, **kw: Any) -> None:
            if tower is not None:
                self.tower = self._tower_name(tower)  # before init: a heads rule resolved there reads this tower
            init(self, *args, **kw)
            if tower is not None:
                self.set_tower(tower)

        __init__._takes_tower = True  # type: ignore[attr-defined]
        cls.__init__ = __init__  # type: ignore[method-assign]

    def __init__(
        self, heads: Iterable[tuple[int, int]] | str | None = None, atlas: Any = None, tower: str | None = None
    ) -> None:
        self.atlas = atlas
        self.heads_rule: str | None = None
        self.heads: list[tuple[int, int]] | None = None
        self._shape: tuple[int, int] | None = None
        if tower is not None:
            self.tower = self._tower_name(tower)
        if isinstance(heads, str):
            from .heads import parse_rule

            self.heads_rule = heads.strip()
            parse_rule(self.heads_rule)  # a syntax error is reported now, not at bind time
            if atlas is not None:
                self._resolve_rule(None)
        elif heads is not None:
            self.heads = parse_heads(heads, self.label)
        self._layers = None if self.heads is None else {l for l, _ in self.heads}
        if tower is not None:
            self.set_tower(tower)

    def _tower_name(self, tower: Any) -> str:
        if not isinstance(tower, str) or tower not in TOWERS:
            raise EditError(f"{self.label}: tower must be one of {', '.join(TOWERS)}, got {tower!r}")
        return tower

    def set_tower(self, tower: str) -> None:
        """Make the edit act on ``tower`` (EditError for a tower the edit cannot act on)."""
        tower = self._tower_name(tower)
        allowed = self.allowed_towers()
        if allowed is not None and tower not in allowed:
            raise EditError(
                f"{self.label} acts on the {' or '.join(allowed)} tower only (it edits attention to positions of the "
                f"language model), so tower={tower} is not possible; leave tower out"
            )
        self.tower = tower
        if self.heads_rule is not None and self.atlas is not None and getattr(self, "_rule_tower", 0) != tower:
            self._resolve_rule(None)  # the rule reads the rows of this tower

    def allowed_towers(self) -> tuple[str, ...] | None:
        """The towers this edit can act on (None: any); :attr:`towers` unless a subclass says otherwise."""
        return self.towers

    # -- naming ----------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        return self.name or type(self).__name__

    def params(self) -> dict[str, Any]:
        """What defines the edit (besides its heads), for printing."""
        return {}

    def describe(self) -> str:
        if self.heads is None and self.heads_rule is None:
            heads = "every head"
        elif self.heads is None:
            heads = f"heads {self.heads_rule!r} (not resolved yet)"
        else:
            shown = ", ".join(f"L{l}H{h}" for l, h in self.heads[:12])
            more = f" and {len(self.heads) - 12} more" if len(self.heads) > 12 else ""
            rule = f" ({self.heads_rule})" if self.heads_rule else ""
            heads = f"{len(self.heads)} head{'s' if len(self.heads) != 1 else ''}{rule}: {shown}{more}"
        extra = ", ".join(f"{k}={v}" for k, v in self.params().items())
        if self.tower is not None:
            heads = f"{heads} of the {self.tower} tower"
        return f"{self.label}({extra}) on {heads}" if extra else f"{self.label} on {heads}"

    # -- heads -----------------------------------------------------------------------------------
    def _resolve_rule(self, shape: tuple[int, int] | None) -> None:
        from .heads import load_atlas, select_heads

        self.atlas = load_atlas(self.atlas)
        self.heads = select_heads(self.heads_rule, self.atlas, shape=shape, edit=self.label, tower=self.tower)
        self._layers = {l for l, _ in self.heads}
        self._rule_tower = self.tower

    def bind(self, model: nn.Module) -> None:
        """Called when a session starts: resolve a heads rule, check the heads against the model (against
        the edit's tower when it names one)."""
        layers, heads = model_shape(model)
        where = "the model"
        main = language_tower(model)
        if self.tower is not None and self.tower != main:
            present = model_towers(model)
            if self.tower not in present:
                raise EditError(
                    f"{self.label}: tower={self.tower}, but the model has no {self.tower} tower (its attention is in: "
                    f"{', '.join(t for t in TOWERS if t in present) or 'none'}); leave tower out for its {main} tower"
                )
            where = f"the model's {self.tower} tower"
        shape = tower_shape(model, self.tower or main)
        if shape is None and (self.tower or main) != main:
            # a tower whose counts the config does not give: a rule reads the atlas rows of that tower
            self._shape = None
            if self.heads_rule is not None:
                self._bind_rule(None)
            return
        if shape is not None:
            layers, heads = shape
        self._shape = (layers, heads)
        if self.heads_rule is not None:
            self._bind_rule((layers, heads))
        for layer, head in self.heads or ():
            if not (0 <= layer < layers and 0 <= head < heads):
                raise EditError(
                    f"{self.label} names layer {layer} head {head}, which does not exist: {where} has "
                    f"{layers} layers x {heads} heads (layers 0-{layers - 1}, heads 0-{heads - 1})"
                )

    def _bind_rule(self, shape: tuple[int, int] | None) -> None:
        if self.atlas is None:
            raise EditError(
                f"{self.label}: heads rule {self.heads_rule!r} needs an atlas: pass atlas= (an Atlas or a run "
                "folder of headmap scan) to the edit or to headmap.steer, or --atlas RUN_DIR on the command line"
            )
        self._resolve_rule(shape)

    def applies_to_layer(self, layer: int) -> bool:
        if self.heads is None and self.heads_rule is not None:
            return False  # an unresolved rule touches nothing (a session always binds first)
        return self._layers is None or layer in self._layers

    def head_mask(self, block: Block, like: torch.Tensor) -> torch.Tensor:
        """[1, H, 1, 1] bool: which heads of this block's layer the edit touches."""
        sel = torch.zeros(block.num_heads, dtype=torch.bool, device=like.device)
        if self.heads is None:
            sel[:] = True
        else:
            for layer, head in self.heads:
                if layer == block.layer and head < block.num_heads:
                    sel[head] = True
        return sel.view(1, -1, 1, 1)

    def layer_heads(self, block: Block) -> list[int] | None:
        """Heads of this block's layer the edit touches, in order; None for every head."""
        if self.heads is None:
            return None
        return [h for l, h in self.heads if l == block.layer and h < block.num_heads]

    def on_heads(self, block: Block, x: torch.Tensor, fn) -> torch.Tensor:
        """Apply ``fn(x[:, heads], heads)`` to the touched heads of ``x`` [B, H, ...]; others keep their values.

        ``heads`` is a list of head indices, or ``slice(None)`` when the edit touches every head. Without
        autograd ``x`` is updated in place (as the engine does with its own temporaries); with autograd
        a copy is made, so that a checkpoint recompute sees the same input.
        """
        heads = self.layer_heads(block)
        if heads is None:
            return fn(x, slice(None))
        if not heads:
            return x
        if len(heads) == x.shape[1]:
            return fn(x, slice(None))
        new = fn(x[:, heads], heads)
        out = x if not torch.is_grad_enabled() else x.clone()
        out[:, heads] = new.to(out.dtype)
        return out

    # -- preparation -----------------------------------------------------------------------------
    def prepare(self, tokenizer: Any, prompt: str | None = None) -> None:
        """Resolve what needs the tokenizer (and the prompt the edit will run on) before the model runs.

        Called by :func:`headmap.steer` (with ``tokenizer=``), ``compare`` and the evaluation, before
        :meth:`bind`. Nothing by default; edits with text spans or text-file references override it.
        ``prompt`` is None where there is no single prompt (evaluation over many items).
        """

    # -- hooks -----------------------------------------------------------------------------------
    def edit_logits(self, block: Block, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def edit_probs(self, block: Block, probs: torch.Tensor) -> torch.Tensor:
        return probs

    def edit_output(self, block: Block, out: torch.Tensor) -> torch.Tensor:
        return out


def reweight_rows(probs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Multiply each entry by ``weight`` and renormalise every row to the mass it had.

    A'[i, j] = A[i, j] w[i, j] * (sum_k A[i, k]) / (sum_k A[i, k] w[i, k]). A row's mass is 1 except
    with learned sink logits (gpt-oss), where the sink keeps its share. Rows whose reweighted mass is
    0 (nothing visible, or every visible key weighted 0) are left as they were.
    """
    scaled = probs * weight
    mass = probs.sum(dim=-1, keepdim=True)
    new = scaled.sum(dim=-1, keepdim=True)
    ok = new > 0
    ratio = torch.where(ok, mass / torch.where(ok, new, torch.ones_like(new)), torch.ones_like(new))
    return torch.where(ok, scaled * ratio, probs)


def positions_in(block: Block, start: int, end: int) -> torch.Tensor:
    """[B, bk] bool: key columns whose position inside their input is in [start, end)."""
    rel = block.rel_k()
    return (rel >= start) & (rel < end)


def received_in_block(block: Block, probs: torch.Tensor) -> torch.Tensor:
    """[B, H, bk] float32: mean attention key j receives from the real query rows of the block that see it.

    The diagonal (i = j) counts, as in ACT; keys no real row of the block sees get 0.
    """
    mass, count = block.column_sums(probs, exclude_self=False)
    mass = mass.to(probs.dtype)  # the float32 sums, exactly
    count = count[:, None, :].to(probs.dtype)
    return torch.where(count > 0, mass / count.clamp(min=1), torch.zeros_like(mass))


def session_ended(edit: Edit) -> bool:
    """Whether no active headmap session holds ``edit`` any more (the one that bound it has closed):
    a model hook the edit registered should then remove itself."""
    return not any(edit in s.edits for s in active_sessions())


def prefill_ids(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The ``input_ids`` of a model forward pre-hook's call when that call starts a sequence (no KV
    cache, or an empty one); None for a decoding step that extends a cached sequence, or no ids."""
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    cache = kwargs.get("past_key_values")
    fresh = cache is None or not hasattr(cache, "get_seq_length") or cache.get_seq_length() == 0
    return ids if isinstance(ids, torch.Tensor) and fresh else None
