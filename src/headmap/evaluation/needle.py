"""Needle retrieval accuracy: the fraction of ``needle`` inputs (``headmap.corpus``) whose greedy
answer reproduces the needle's number exactly, without and with edits.

The inputs are not independent: every needle (a place and its secret number) is asked at several
depths in one haystack, so its cluster is the needle and the statistics resample needles
(docs/methods/needle_accuracy.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch

from ..corpus import load_corpus, pad_batch, parse_spec
from ..errors import TaskError
from ..models import greedy_decode, input_device
from ..models import pad_id as tokenizer_pad_id
from ..parallel import split_work
from .editing import describe_edits
from .scoring import DEFAULT_BOOTSTRAP, EvalResult, compare, engine_with


def greedy_answers(
    model: torch.nn.Module,
    samples: Sequence,
    pad_id: int,
    edits: Sequence = (),
    batch_size: int = 4,
) -> list[list[int]]:
    """Greedy continuation of each sample (``ids``) for as many tokens as its ``info['answer_ids']``."""
    device = input_device(model)
    chunks = [samples[start : start + batch_size] for start in range(0, len(samples), batch_size)]

    def answer(chunk: Sequence) -> list[list[int]]:
        steps = max(len(s.info["answer_ids"]) for s in chunk)
        ids, mask = pad_batch([s.ids for s in chunk], pad_id)
        gen = greedy_decode(model, ids.to(device), mask.to(device), steps).tolist()
        return [row[: len(s.info["answer_ids"])] for row, s in zip(gen, chunk, strict=True)]

    with torch.no_grad(), engine_with(model, edits):  # under torchrun each rank decodes its share of the batches
        return [row for rows in split_work(chunks, answer) for row in rows]


def needle_spec(spec: str) -> str:
    """``spec`` with ``echo=true``/``echo=false`` written as the corpus option's 1/0."""
    parts = spec.split(":")
    for k, part in enumerate(parts):
        key, eq, value = part.partition("=")
        if key.strip() == "echo" and value.strip().lower() in ("true", "yes", "false", "no"):
            parts[k] = f"echo={1 if value.strip().lower() in ('true', 'yes') else 0}"
    return ":".join(parts)


def load_needles(tokenizer: Any, spec: str = "needle", max_length: int = 512, limit: int | None = None, seed: int = 0):
    """The needle inputs of ``spec`` (``needle:lengths=...:depths=...:echo=true``)."""
    spec = needle_spec(spec)
    parsed = parse_spec(spec)
    if parsed is None or parsed[0] != "needle":
        raise TaskError(f"'{spec}' is not a needle corpus spec; write needle or needle:lengths=256,512:depths=0,0.5,1")
    return load_corpus(spec, tokenizer, max_length, limit=limit, seed=seed)


def needle_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    edits: Sequence = (),
    corpus: str = "needle",
    max_length: int = 512,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 4,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    base: list[list[int]] | None = None,
    needles: Any = None,
    units: str = "auto",
) -> EvalResult:
    """Retrieval accuracy on the needle corpus without and with ``edits``.

    An input counts as right when the model's greedy answer equals the needle's number token for
    token. ``base`` (greedy answers from :func:`greedy_answers`) and ``needles`` (a corpus from
    :func:`load_needles`) reuse earlier work. ``units``: ``auto`` (the needles as clusters when the
    inputs record them, ``info['cluster']``), ``clusters`` (required) or ``items``.
    """
    if units not in ("auto", "clusters", "items"):
        raise TaskError(f"--units must be one of auto, clusters, items (got {units!r})")
    needles = needles if needles is not None else load_needles(tokenizer, corpus, max_length, limit, seed)
    samples = needles.samples
    pad = tokenizer_pad_id(tokenizer) if tokenizer is not None else 0
    if base is None:
        base = greedy_answers(model, samples, pad, (), batch_size)
    edits = list(edits)
    edited = greedy_answers(model, samples, pad, edits, batch_size) if edits else base
    want = [list(s.info["answer_ids"]) for s in samples]

    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))

    cluster = [s.info.get("cluster") for s in samples]
    if units == "clusters" and any(c is None for c in cluster):
        k = next(i for i, c in enumerate(cluster) if c is None)
        raise TaskError(
            f"needle input {k} has no cluster id (field 'cluster' of its info): the cluster statistics need the "
            "needle every input shares; use the built-in needle corpus, or --units items"
        )
    clusters = None if units == "items" or any(c is None for c in cluster) else cluster
    items = pd.DataFrame(
        {
            "id": [f"needle-{i}" for i in range(len(samples))],
            "cluster": cluster,
            "needle": [s.info.get("needle_id") for s in samples],
            "haystack": [s.info.get("haystack") for s in samples],
            "context_length": [s.info.get("context_length") for s in samples],
            "depth": [s.info.get("depth") for s in samples],
            "answer": [s.info.get("answer") for s in samples],
            "pred_base": [text(g) for g in base],
            "pred_edit": [text(g) for g in edited],
            "correct_base": [g == w for g, w in zip(base, want, strict=True)],
            "correct_edit": [g == w for g, w in zip(edited, want, strict=True)],
        }
    )
    acc = compare(items.correct_base, items.correct_edit, bootstrap, seed, clusters)
    return EvalResult(needles.name, "needle", acc, items, None, describe_edits(edits))
