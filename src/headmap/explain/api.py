"""``explain``: attribute a model's prediction on each text to its input tokens, by several methods."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pandas as pd
import torch

from ..errors import OptionError
from ..models import max_positions, pad_id
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
    pad = pad_id(tokenizer, model)
    vocab = model.get_input_embeddings().num_embeddings if model.get_input_embeddings() is not None else None
    if vocab is not None and not 0 <= pad < vocab:  # a config's eos id past a resized (or tiny) vocabulary
        pad = 0
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
    total)`` after each layer pass of rollout and attn_grad (a long input's progress).
    """
    return _run(model, tokenizer, texts, target, methods, batch_size, max_length, progress, None, on_layer)


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
    faith = Faithfulness(seed=seed)
    frame = _run(model, tokenizer, texts, target, methods, batch_size, max_length, progress, faith, on_layer)
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
    faith: Faithfulness | None,
    on_layer: Callable[[str, int, int], None] | None = None,
) -> pd.DataFrame:
    goal = parse_target(target, model, tokenizer)
    chosen = resolve_methods(methods)
    limit = max_length if max_length is not None else max_positions(model.config)
    rows = encode(texts, tokenizer, None)
    cut = sum(len(r) > limit for r in rows) if limit else 0
    if cut:
        why = "--max-length" if max_length is not None else "the model's position limit"
        warnings.warn(f"{cut} text(s) longer than {why} ({limit} tokens) were cut to it", stacklevel=3)
        rows = [r[:limit] for r in rows]
    frames, gaps = [], []
    training = model.training
    model.eval()  # dropout off while explaining; the mode the model had is put back
    try:
        for first, job in jobs(model, tokenizer, rows, goal, batch_size):
            job.on_layer = on_layer
            for method in chosen:
                method.check(job)
            values = {}
            for method in chosen:
                values[method.name] = method.attribute(job)
                frames.append(job_frame(job, first, values[method.name], method.name, tokenizer))
            if faith is not None:
                faith.add(job, values)
            if "integrated_gradients_gap" in job.notes:
                gaps.extend(job.notes["integrated_gradients_gap"].tolist())
            if progress is not None:
                progress(job.ids.shape[0])
    finally:
        model.train(training)
    frame = pd.concat(frames, ignore_index=True)[COLUMNS]
    if gaps:
        frame.attrs["integrated_gradients_gap"] = gaps
    return frame
