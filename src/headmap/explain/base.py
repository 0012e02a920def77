"""The contract of an attribution method, and the batch it works on (:class:`Job`).

A method is a dataclass with a ``name`` and one method, ``attribute(job)``, that returns one value
per input token: [B, W] float64, 0 on padding. ``job.score(...)`` runs the model (under the headmap
engine where it can) and returns the target value of every input of the batch; attention methods
read queries and keys through :class:`~headmap.explain.capture.Capture`, a probe with ``Needs(qk=True)``.
Inputs of a batch are independent, so the gradient of the batch's summed target with respect to one
input's embeddings is that input's own gradient.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..engine import check_supported, observe
from ..errors import HeadmapError, ModelError
from ..models import is_causal_lm, logits_to_keep, position_ids
from .targets import Target


@dataclass
class Job:
    """A padded batch and its target: everything a method needs to attribute.

    ``ids``/``mask`` [B, W] (left padding for decoders, right padding for encoders); ``rows`` [B, W]
    float64, 1 on the target rows; ``chosen`` [B, W] long, the token explained at each target row;
    ``engine``: None when the headmap engine can run the model, else why not.
    """

    model: nn.Module
    ids: torch.Tensor
    mask: torch.Tensor
    target: Target
    rows: torch.Tensor
    chosen: torch.Tensor
    left_pad: bool
    engine: str | None
    pad: int
    #: per-sample diagnostics a method reports (e.g. ``integrated_gradients_gap``), [B] tensors
    notes: dict[str, torch.Tensor] = field(default_factory=dict)
    #: ``on_layer(method, done, total)`` after each layer pass of an attention method, each forward of occlusion
    on_layer: Callable[[str, int, int], None] | None = None
    #: target values [B] (detached) already computed on this batch by some method, by input: ``"x"`` the
    #: batch's own embeddings, ``"baseline:zeros"`` / ``"baseline:pad"`` integrated gradients' baselines;
    #: a later method reads them instead of running the same forward again
    known: dict[str, torch.Tensor] = field(default_factory=dict)

    def layer_done(self, method: str, done: int, total: int) -> None:
        if self.on_layer is not None:
            self.on_layer(method, done, total)

    @property
    def keep(self) -> int:
        """How many last positions need the LM head's logits."""
        cols = torch.nonzero(self.rows.sum(dim=0) > 0)
        return self.ids.shape[1] - int(cols[0]) if cols.numel() else 1

    def embed(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings of ``ids`` (default: the batch's own), detached."""
        emb = self.model.get_input_embeddings()
        if emb is None:
            raise ModelError(f"{type(self.model).__name__} has no input embeddings, so gradients cannot reach tokens")
        with torch.no_grad():
            return emb(self.ids if ids is None else ids).detach()

    def outputs(self, ids=None, embeds=None, probes=()) -> Any:
        """The model's outputs on ``ids`` or ``embeds`` (default: the batch), under the engine with ``probes``."""
        kw: dict[str, Any] = {"attention_mask": self.mask}
        if self.left_pad and "position_ids" in inspect.signature(self.model.forward).parameters:
            kw["position_ids"] = position_ids(self.mask)
        if self.target.lm:
            kw.update(logits_to_keep(self.model, self.keep))
        if embeds is not None:
            kw["inputs_embeds"] = embeds
        else:
            kw["input_ids"] = self.ids if ids is None else ids
        if probes and self.engine is not None:
            raise ModelError(self.engine)
        session = observe(self.model, probes=probes) if self.engine is None else nullcontext()
        with session:
            return self.model(**kw)

    def score(self, ids=None, embeds=None, probes=()) -> torch.Tensor:
        """[B] target values on ``ids`` or ``embeds`` (default: the batch)."""
        out = self.outputs(ids=ids, embeds=embeds, probes=probes)
        return self.target.read(out, self.rows, self.chosen, self.mask)


def engine_problem(model: nn.Module) -> str | None:
    """None when the headmap engine can run ``model``; else the reason, in words."""
    try:
        check_supported(model)
    except HeadmapError as exc:
        return str(exc)
    return None


def make_job(model: nn.Module, target: Target, rows_ids: list[list[int]], pad: int) -> Job:
    """Pad token id rows into a :class:`Job`; generate what the target explains (next, span)."""
    causal = target.lm or is_causal_lm(model.config)  # decoders: left padding, last row
    width = max(len(r) for r in rows_ids)
    batch = len(rows_ids)
    device = next(model.parameters()).device
    ids = torch.full((batch, width), pad, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for b, row in enumerate(rows_ids):
        cols = slice(width - len(row), width) if causal else slice(0, len(row))
        ids[b, cols] = torch.as_tensor(row, dtype=torch.long)
        mask[b, cols] = 1
    ids, mask = ids.to(device), mask.to(device)
    rows = torch.zeros((batch, width), dtype=torch.float64, device=device)
    chosen = torch.zeros((batch, width), dtype=torch.long, device=device)
    if target.kind == "class":
        where = [width - 1] * batch if causal else [0] * batch
        rows[torch.arange(batch), torch.as_tensor(where)] = 1.0
    elif target.kind == "similarity":  # a mean over every real token: each a target row, weight 1/n
        rows = mask.double() / mask.sum(dim=1, keepdim=True)
    else:
        rows[:, -1] = 1.0
        chosen[:, -1] = 0 if target.token is None else target.token
    job = Job(model, ids, mask, target, rows, chosen, causal, engine_problem(model), pad)
    if target.generates:
        _generate(job, target.length)
    return job


def _generate(job: Job, steps: int) -> None:
    """Greedy decoding of the explained tokens, under the engine (the same forward the methods run).

    Without a cache: ``steps`` full forwards, few for the spans explained here. Each new token is
    appended to the input except the last, which is only predicted.
    """
    with torch.no_grad():
        for k in range(steps):
            logits = job.outputs().logits[:, -1]
            token = logits.argmax(dim=-1)
            job.chosen[:, -1] = token
            if k == steps - 1:
                break
            ones = job.mask.new_ones(job.ids.shape[0], 1)
            job.ids = torch.cat([job.ids, token[:, None]], dim=1)
            job.mask = torch.cat([job.mask, ones], dim=1)
            job.rows = torch.cat([job.rows, job.rows.new_ones(job.ids.shape[0], 1)], dim=1)
            job.chosen = torch.cat([job.chosen, job.chosen.new_zeros(job.ids.shape[0], 1)], dim=1)


class Method:
    """Base of attribution methods. Subclasses are dataclasses: a docstring with the paper and the formula,
    their parameters as fields, ``name``, and :meth:`attribute`."""

    name: ClassVar[str] = ""
    #: reads attention probabilities through the headmap engine
    attention: ClassVar[bool] = False
    #: uses gradients of the target
    gradient: ClassVar[bool] = False

    def check(self, job: Job) -> None:
        """Raise a HeadmapError when the method does not apply to the job's model (saying why)."""
        if self.attention and job.engine is not None:
            raise ModelError(
                f"{self.name} reads attention through the headmap engine, which cannot run this model: {job.engine}"
            )

        if self.gradient and (
            job.model.get_input_embeddings() is None
            or "inputs_embeds" not in inspect.signature(job.model.forward).parameters
        ):
            raise ModelError(
                f"{self.name} needs the gradient at the input embeddings, and {type(job.model).__name__} "
                "takes no inputs_embeds; use occlusion"
            )

    def attribute(self, job: Job) -> torch.Tensor:
        """[B, W] float64 attribution of every input token to the target (0 on padding)."""
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}
