"""``explain``: attribute a model's prediction on each text to its input tokens, by several methods."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..errors import OptionError
from ..models import max_positions, pad_id
from ..parallel import split_work
from .attn_grad import AttnGrad
from .base import Job, Method, make_job
from .faithfulness import Faithfulness
from .integrated_gradients import IntegratedGradients
from .last_layer_attention import LastLayerAttention
from .occlusion import Occlusion
from .rollout import Rollout
from .saliency import Saliency
from .targets import Target, parse_target

#: Every method, by its command-line name.
METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (Rollout, AttnGrad, Saliency, IntegratedGradients, Occlusion, LastLayerAttention)
}
DEFAULT_METHODS = ("rollout", "attn_grad", "saliency", "integrated_gradients")
COLUMNS = ["sample", "position", "token_id", "token", "method", "target", "value"]


def resolve_methods(methods: Iterable[str | Method]) -> list[Method]:
    """Method objects from names (or objects, kept); an unknown name is an OptionError naming the known ones."""
    out: list[Method] = []
    for m in methods:
        if isinstance(m, Method):
            out.append(m)
        elif m in METHODS:
            out.append(METHODS[m]())
        else:
            raise OptionError(f"unknown method '{m}'; use some of: {', '.join(METHODS)}")
    if not out:
        raise OptionError(f"no method given; use some of: {', '.join(METHODS)}")
    return out


def encode(texts: Sequence[str | Sequence[int]], tokenizer: Any, max_length: int | None = None) -> list[list[int]]:
    """Token ids of every text (a text may already be a list of ids); an empty one is an OptionError."""
    if isinstance(texts, str):
        raise OptionError("texts must be a list of texts, not one string; wrap it: [text]")
    rows = []
    for i, text in enumerate(texts):
        if isinstance(text, str):
            if not text.strip():
                raise OptionError(f"text {i} is empty; every text needs at least one token to attribute to")
            if tokenizer is None:
                raise OptionError("texts are strings but no tokenizer was given; pass one, or token id lists")
            ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        else:
            ids = [int(t) for t in text]
            if not ids:
                raise OptionError(f"text {i} is empty; every text needs at least one token to attribute to")
        if max_length is not None:
            ids = ids[:max_length]
        rows.append(ids)
    if not rows:
        raise OptionError("no text to explain")
    return rows


def _token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    if tokenizer is None:
        return [str(t) for t in ids]
    return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]


def jobs(model, tokenizer, rows: list[list[int]], target: Target, batch_size: int) -> Iterable[tuple[int, Job]]:
    pad = _pad(model, tokenizer)
    for start in range(0, len(rows), batch_size):
        yield start, make_job(model, target, rows[start : start + batch_size], pad)


def job_frame(job: Job, first: int, values: torch.Tensor, method: str, tokenizer: Any) -> pd.DataFrame:
    """Rows of the attributions table for one job and method (real tokens only, positions from 0)."""
    parts = []
    for b in range(job.ids.shape[0]):
        real = job.mask[b].bool()
        ids = job.ids[b][real].tolist()
        parts.append(
            pd.DataFrame(
                {
                    "sample": first + b,
                    "position": range(len(ids)),
                    "token_id": ids,
                    "token": _token_strings(tokenizer, ids),
                    "method": method,
                    "target": job.target.spec,
                    "value": values[b][real].double().cpu().numpy(),
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def explain(
    model,
    tokenizer,
    texts: Sequence[str | Sequence[int]],
    target: str = "next",
    methods: Iterable[str | Method] = DEFAULT_METHODS,
    batch_size: int = 1,
    max_length: int | None = None,
    progress: Callable[[int], None] | None = None,
    on_layer: Callable[[str, int, int], None] | None = None,
) -> pd.DataFrame:
    """Attribute the target on each text to its tokens: a table (sample, position, token_id, token, method,
    target, value), one row per real token, method and text.

    ``target``: next, token:WORD, contrast:A,B, span:K, class:N or similarity:TEXT (:mod:`headmap.explain.targets`);
    ``methods``: names of :data:`METHODS` or method objects (e.g. ``IntegratedGradients(steps=64)``).
    Integrated gradients' completeness gap per text is in ``frame.attrs["integrated_gradients_gap"]``.
    ``progress(n)`` is called after each batch with the number of texts it held, ``on_layer(method, done,
    total)`` after each layer pass of rollout and attn_grad and each forward of occlusion (a long input's
    progress).
    """
    return _run(model, tokenizer, texts, target, methods, batch_size, max_length, progress, None, on_layer)[0]


def explain_and_measure(
    model,
    tokenizer,
    texts: Sequence[str | Sequence[int]],
    target: str = "next",
    methods: Iterable[str | Method] = DEFAULT_METHODS,
    batch_size: int = 1,
    max_length: int | None = None,
    progress: Callable[[int], None] | None = None,
    seed: int = 0,
    on_layer: Callable[[str, int, int], None] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`explain`, and the faithfulness and agreement table of the same attributions
    (:class:`~headmap.explain.faithfulness.Faithfulness`; the random-order control drawn with ``seed``)."""
    frame, faith = _run(model, tokenizer, texts, target, methods, batch_size, max_length, progress, seed, on_layer)
    return frame, faith.frame()


def _run(
    model,
    tokenizer,
    texts: Sequence[str | Sequence[int]],
    target: str,
    methods: Iterable[str | Method],
    batch_size: int,
    max_length: int | None,
    progress: Callable[[int], None] | None,
    seed: int | None,
    on_layer: Callable[[str, int, int], None] | None = None,
) -> tuple[pd.DataFrame, Any]:
    work = plan(model, tokenizer, texts, target, methods, batch_size, max_length, stacklevel=4)
    results = run_batches(model, tokenizer, work, seed, progress=progress, on_layer=on_layer)
    return merge(work, results, seed)


# -- the work in batches: what resumed and data-parallel runs share ------------------------------------


@dataclass
class Plan:
    """An explanation cut into its batches: the target, the methods, every text's token ids (cut to the
    length limit) and the first text of every batch. A batch is the unit of work a resumed or
    data-parallel run skips or hands to a rank: it is formed exactly as one process forms it."""

    goal: Target
    chosen: list[Method]
    rows: list[list[int]]
    batch_size: int

    @property
    def starts(self) -> list[int]:
        return list(range(0, len(self.rows), self.batch_size))

    def batch(self, index: int) -> list[list[int]]:
        first = index * self.batch_size
        return self.rows[first : first + self.batch_size]

    def shape(self, index: int) -> tuple[int, int]:
        """[B, W] of the batch's job: its texts padded to the longest, plus the tokens a span target generates."""
        rows = self.batch(index)
        extra = self.goal.length - 1 if self.goal.generates else 0
        return len(rows), max(len(r) for r in rows) + extra


@dataclass
class BatchResult:
    """One batch's attribution rows, its faithfulness numbers per input (see :class:`Faithfulness`) and
    integrated gradients' completeness gaps: everything :func:`merge` needs, and what a checkpoint keeps."""

    index: int
    frame: pd.DataFrame
    curves: dict[str, dict[str, list[np.ndarray]]] = field(default_factory=dict)
    pairs: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)
    methods: list[str] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)


def plan(
    model,
    tokenizer,
    texts: Sequence[str | Sequence[int]],
    target: str = "next",
    methods: Iterable[str | Method] = DEFAULT_METHODS,
    batch_size: int = 1,
    max_length: int | None = None,
    stacklevel: int = 2,
) -> Plan:
    """The target and methods checked, the texts encoded and cut (a warning says how many were cut)."""
    goal = parse_target(target, model, tokenizer)
    chosen = resolve_methods(methods)
    limit = max_length if max_length is not None else max_positions(model.config)
    rows = encode(texts, tokenizer, None)
    cut = sum(len(r) > limit for r in rows) if limit else 0
    if cut:
        why = "--max-length" if max_length is not None else "the model's position limit"
        warnings.warn(f"{cut} text(s) longer than {why} ({limit} tokens) were cut to it", stacklevel=stacklevel)
        rows = [r[:limit] for r in rows]
    return Plan(goal, chosen, rows, batch_size)


def run_batches(
    model,
    tokenizer,
    work: Plan,
    seed: int | None,
    done: dict[int, BatchResult] | None = None,
    on_batch: Callable[[BatchResult], None] | None = None,
    progress: Callable[[int], None] | None = None,
    on_layer: Callable[[str, int, int], None] | None = None,
) -> list[BatchResult]:
    """Every batch's :class:`BatchResult`, in batch order: those in ``done`` as they are, the others computed
    (``on_batch`` receives each as soon as it is done, e.g. to checkpoint it). ``seed``: the faithfulness
    control's seed (None: no faithfulness).

    Under :func:`headmap.parallel.sharing` each rank computes only its own batches and every rank gets all
    of them (:func:`headmap.parallel.split_work`). The random-order control of batch ``i`` is drawn from one
    generator seeded once, after the draws of batches ``0..i-1`` (replayed by their shapes where this
    process skips them), so every batch draws what an uninterrupted single process draws.
    """
    done = dict(done or {})
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    at = [0]  # the batch whose draw the generator makes next

    def advance(to: int) -> None:
        while at[0] < to:
            torch.rand(work.shape(at[0]), generator=gen)
            at[0] += 1

    def compute(index: int) -> BatchResult:
        if index in done:
            if progress is not None:
                progress(len(work.batch(index)))
            return done[index]
        job = make_job(model, work.goal, work.batch(index), _pad(model, tokenizer))
        if tuple(job.ids.shape) != work.shape(index):  # the replayed draws of skipped batches depend on it
            raise RuntimeError(f"batch {index} has shape {tuple(job.ids.shape)}, planned {work.shape(index)}")
        job.on_layer = on_layer
        for method in work.chosen:
            method.check(job)
        values = {}
        frames = []
        for method in work.chosen:
            values[method.name] = method.attribute(job)
            frames.append(job_frame(job, index * work.batch_size, values[method.name], method.name, tokenizer))
        result = BatchResult(index, pd.concat(frames, ignore_index=True)[COLUMNS])
        if gen is not None:
            advance(index)
            faith = Faithfulness(seed=seed)
            faith.gen = gen
            faith.add(job, values)
            at[0] = index + 1
            result.curves, result.pairs, result.methods = faith.curves, faith.pairs, faith.methods
        if "integrated_gradients_gap" in job.notes:
            result.gaps = [float(x) for x in job.notes["integrated_gradients_gap"].tolist()]
        if on_batch is not None:
            on_batch(result)
        if progress is not None:
            progress(job.ids.shape[0])
        return result

    training = model.training
    model.eval()  # dropout off while explaining; the mode the model had is put back
    try:
        return split_work(list(range(len(work.starts))), compute, unit="batch")
    finally:
        model.train(training)


def merge(work: Plan, results: Sequence[BatchResult], seed: int | None) -> tuple[pd.DataFrame, Faithfulness | None]:
    """The attributions table of all batches (in batch order) and, with ``seed``, the :class:`Faithfulness`
    holding every input's numbers in input order (its :meth:`~Faithfulness.frame` is the summary table)."""
    frame = pd.concat([r.frame for r in results], ignore_index=True)[COLUMNS]
    gaps = [g for r in results for g in r.gaps]
    if gaps:
        frame.attrs["integrated_gradients_gap"] = gaps
    if seed is None:
        return frame, None
    faith = Faithfulness(seed=seed)
    for r in results:
        for name in r.methods:
            if name not in faith.methods:
                faith.methods.append(name)
        for name, store in r.curves.items():
            into = faith.curves.setdefault(name, {"deletion": [], "insertion": []})
            for kind in ("deletion", "insertion"):
                into[kind].extend(store[kind])
        for key, vals in r.pairs.items():
            faith.pairs.setdefault(key, []).extend(vals)
    return frame, faith


def _pad(model, tokenizer) -> int:
    pad = pad_id(tokenizer, model)
    vocab = model.get_input_embeddings().num_embeddings if model.get_input_embeddings() is not None else None
    if vocab is not None and not 0 <= pad < vocab:  # a config's eos id past a resized (or tiny) vocabulary
        pad = 0
    return pad
