"""Scoring multiple-choice items by log-likelihood, and the paired comparison of two conditions.

Each option is scored by the sum of the log-probabilities of its tokens given the context; the
prediction is the option with the highest sum (``acc``, as lm-evaluation-harness's ``acc``);
``acc_norm`` divides each sum by the option's length in UTF-8 bytes first. Base and edited runs both
go through the headmap engine (the edited one with the edits), so the edits are the only difference.

The comparison is paired: every item is scored with and without the edits; every interval comes from
:mod:`headmap.stats` (exact binomial and exact McNemar for independent items, a cluster
bootstrap and a sign test over clusters for items that share a needle or a haystack), with the
number of independent units beside it. docs/methods/scoring.md and docs/methods/statistics.md state the methods.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import stats
from ..corpus import Tokens, pad_batch
from ..engine import observe
from ..errors import OptionError, TaskError
from ..models import input_device, logits_to_keep, position_ids
from ..models import pad_id as tokenizer_pad_id
from ..parallel import split_work
from .editing import describe_edits
from .tasks import Task, TaskItem, load_task

DEFAULT_BOOTSTRAP = 2000
DEFAULT_BATCH_SIZE = 8


@dataclass
class Continuation:
    """Log-likelihood of one continuation given its context."""

    logprob: float  # sum over the continuation's tokens
    greedy: bool  # every continuation token is the model's argmax
    tokens: int


def engine_with(model: torch.nn.Module, edits: Sequence) -> Any:
    """The engine with ``edits`` (base runs too, with none: both conditions differ by the edits only)."""
    return observe(model, edits=tuple(edits))


def prefix_id(tokenizer: Any) -> int | None:
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return None


def encode_pair(toks: Tokens, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context ids (with the tokenizer's leading special tokens) and continuation ids.

    Trailing white space of the context moves to the continuation (``"Answer: " + "yes"`` is
    scored as ``"Answer:" + " yes"``), as lm-evaluation-harness does, so that a BPE tokenizer
    sees the space where it usually is. An empty context becomes the BOS (else EOS) token.
    """
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    ctx = list(toks.pre) + (toks.plain(stripped) if stripped else [])
    if not ctx:
        prefix = prefix_id(toks.tok)
        if prefix is None:
            raise TaskError("an empty context needs a BOS or EOS token, and the tokenizer has neither")
        ctx = [prefix]
    cont = toks.plain(continuation)
    if not cont:
        raise TaskError(f"the continuation {continuation!r} has no tokens")
    return ctx, cont


def score_token_pairs(
    model: torch.nn.Module,
    pairs: Sequence[tuple[list[int], list[int]]],
    pad_id: int = 0,
    edits: Sequence = (),
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
    share_context: bool = True,
) -> list[Continuation]:
    """Sum log-prob of each continuation's tokens given its context (token ids), in batches.

    Batches are left-padded, with position ids counted from each row's first real token, so a
    score does not depend on what else is in the batch. Inputs longer than ``max_length`` lose
    the start of their context.

    With ``share_context`` (default), continuations of one long context (the options of a
    multiple-choice item) read the context once: one forward pass over it with a KV cache, then
    every continuation on a copy of that cache. The same attention, in another order of
    summation; :data:`SHARED_MIN_CONTEXT` sets how long a context must be for this.
    """
    if batch_size < 1:
        raise OptionError(f"--batch-size must be at least 1 (got {batch_size})")
    device = input_device(model)
    rows = []
    for ctx, cont in pairs:
        if not ctx or not cont:
            raise TaskError("a scored pair needs at least one context token and one continuation token")
        ids = (list(ctx) + list(cont))[:-1]  # the last token is predicted, never read
        if max_length is not None and len(ids) > max_length:
            if len(cont) > max_length:
                raise TaskError(f"a continuation of {len(cont)} tokens does not fit --max-length {max_length}")
            ids = ids[len(ids) - max_length :]
        rows.append((ids, list(cont)))
    out: list[Continuation | None] = [None] * len(rows)
    shared = _shared_contexts(model, pairs, rows, share_context)
    order = sorted(
        (i for i in range(len(rows)) if i not in shared), key=lambda i: -len(rows[i][0])
    )  # similar lengths share a batch
    # work units: each shared context, each batch; under torchrun each rank scores its share (split_work)
    units = [(ctx, members) for ctx, members in _groups(pairs, shared)]
    units += [(None, order[start : start + batch_size]) for start in range(0, len(order), batch_size)]

    def score(unit: tuple[list[int] | None, list[int]]) -> list[Continuation]:
        ctx, chunk = unit
        if ctx is not None:
            return _score_shared(model, ctx, [rows[i][1] for i in chunk], device)
        tail = max(len(rows[i][1]) for i in chunk)  # positions whose logits are read
        ids, mask = pad_batch([rows[i][0] for i in chunk], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        kwargs = logits_to_keep(model, tail)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), **kwargs).logits
        logp = torch.log_softmax(logits[:, -tail:].float(), dim=-1)
        # the last len(cont) positions predict the continuation's tokens
        return [_continuation(logp[r, tail - len(rows[i][1]) :], rows[i][1], device) for r, i in enumerate(chunk)]

    with torch.no_grad(), engine_with(model, edits):
        scored = split_work(units, score)
    for (_, chunk), got in zip(units, scored, strict=True):
        for i, c in zip(chunk, got, strict=True):
            out[i] = c
    return [c for c in out if c is not None]


SHARED_MIN_CONTEXT = 64  # context tokens from which continuations sharing it read it once


def _shared_contexts(model: torch.nn.Module, pairs: Sequence, rows: Sequence, share: bool) -> set[int]:
    """Indices of the pairs scored through a shared context: two or more continuations of the same
    untruncated context of at least SHARED_MIN_CONTEXT tokens, on a model with a KV cache."""
    if not share or not getattr(getattr(model, "config", None), "use_cache", False):
        return set()
    seen: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(pairs):
        if len(ctx) >= SHARED_MIN_CONTEXT and len(rows[i][0]) == len(ctx) + len(cont) - 1:
            seen.setdefault(tuple(ctx), []).append(i)
    return {i for members in seen.values() if len(members) > 1 for i in members}


def _groups(pairs: Sequence, shared: set[int]) -> list[tuple[list[int], list[int]]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in sorted(shared):
        groups.setdefault(tuple(pairs[i][0]), []).append(i)
    return [(list(ctx), members) for ctx, members in groups.items()]


def _continuation(logp: torch.Tensor, cont: list[int], device: torch.device) -> Continuation:
    target = torch.tensor(cont, dtype=torch.long, device=device)
    picked = logp.gather(-1, target[:, None]).squeeze(-1)
    greedy = bool((logp.argmax(dim=-1) == target).all())
    return Continuation(float(picked.double().sum()), greedy, len(cont))


def _score_shared(
    model: torch.nn.Module, ctx: list[int], conts: list[list[int]], device: torch.device
) -> list[Continuation]:
    """Continuations of one context: the context once (with a cache), then all continuations at once."""
    ids = torch.tensor([ctx], dtype=torch.long, device=device)
    first = model(input_ids=ids, use_cache=True, **logits_to_keep(model))
    head = torch.log_softmax(first.logits[:, -1].float(), dim=-1)[0]  # predicts every continuation's first token
    width = max(len(c) for c in conts) - 1
    rest = None
    if width > 0:
        cache = first.past_key_values
        cache.batch_repeat_interleave(len(conts))
        body = torch.tensor([c[:-1] + [c[0]] * (width - len(c) + 1) for c in conts], dtype=torch.long, device=device)
        # right padding only: a padded position comes after every real one, so no real one reads it
        mask = torch.ones(len(conts), len(ctx) + width, dtype=torch.long, device=device)
        pos = torch.arange(len(ctx), len(ctx) + width, device=device).expand(len(conts), width)
        logits = model(
            input_ids=body, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True
        ).logits
        rest = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for r, cont in enumerate(conts):
        lp = head[None] if rest is None else torch.cat([head[None], rest[r, : len(cont) - 1]], dim=0)
        out.append(_continuation(lp[: len(cont)], cont, device))
    return out


def score_options(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[TaskItem],
    edits: Sequence = (),
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
) -> list[list[float]]:
    """For each item, the summed log-probability of each option's tokens given the context."""
    toks = Tokens(tokenizer)
    pairs, owner = [], []
    for k, item in enumerate(items):
        for option in item.options:
            pairs.append(encode_pair(toks, item.context, option))
            owner.append(k)
    scores = score_token_pairs(model, pairs, tokenizer_pad_id(tokenizer), edits, batch_size, max_length)
    out: list[list[float]] = [[] for _ in items]
    for k, s in zip(owner, scores, strict=True):
        out[k].append(s.logprob)
    return out


@dataclass
class Predictions:
    """Per-item outcome of one condition (base or edited)."""

    pred: np.ndarray  # argmax of summed log-prob
    pred_norm: np.ndarray  # argmax of log-prob per UTF-8 byte
    logprobs: list[list[float]]
    p_answer: np.ndarray  # probability of the right option, softmax over the item's option scores

    def correct(self, answers: np.ndarray, norm: bool = False) -> np.ndarray:
        return (self.pred_norm if norm else self.pred) == answers


def predict(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Task,
    edits: Sequence = (),
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
) -> Predictions:
    logprobs = score_options(model, tokenizer, task.items, edits, batch_size, max_length)
    pred, pred_norm, p_answer = [], [], []
    for item, lps in zip(task.items, logprobs, strict=True):
        lp = np.asarray(lps, dtype=np.float64)
        pred.append(int(np.argmax(lp)))
        lengths = np.array([max(len(o.encode("utf-8")), 1) for o in item.options], dtype=np.float64)
        pred_norm.append(int(np.argmax(lp / lengths)))
        p = np.exp(lp - lp.max())
        p_answer.append(float(p[item.answer] / p.sum()))
    return Predictions(np.array(pred), np.array(pred_norm), logprobs, np.array(p_answer))


# -- paired comparison ------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """Paired accuracies of two conditions, every interval from :mod:`headmap.stats`.

    Items taken as independent (``clusters`` None): Clopper-Pearson for each accuracy, exact McNemar
    (``p_value``) with the Bonett-Price interval for the difference. Items in clusters (they share a
    needle, a haystack, a document): a cluster bootstrap for each interval and an exact sign test over
    clusters. ``units`` is the number of independent units behind every interval (clusters, else items).
    """

    n: int
    accuracy_base: float
    accuracy_edit: float
    difference: float
    ci_base: tuple[float, float]
    ci_edit: tuple[float, float]
    ci_difference: tuple[float, float]
    gained: int  # items right only with the edits
    lost: int  # items right only without them
    bootstrap: int  # resamples of the cluster bootstrap (unused when the items are independent)
    seed: int
    clusters: int | None = None  # independent clusters the items come in; None: the items are the units
    units: int = 0  # independent units behind every interval: clusters, else items
    p_value: float = 1.0  # two-sided, of ``test``
    test: str = "exact McNemar"
    ci_method: str = ""  # how the intervals were computed
    level: float = stats.LEVEL

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "units": self.units,
            "clusters": self.clusters,
            "accuracy_base": self.accuracy_base,
            "accuracy_edit": self.accuracy_edit,
            "difference": self.difference,
            "ci_base": list(self.ci_base),
            "ci_edit": list(self.ci_edit),
            "ci_difference": list(self.ci_difference),
            "ci_level": self.level,
            "ci_method": self.ci_method,
            "p_value": self.p_value,
            "test": self.test,
            "gained": self.gained,
            "lost": self.lost,
            "bootstrap": self.bootstrap,
            "seed": self.seed,
        }

    def units_text(self) -> str:
        """``30 items`` or ``30 items, 6 clusters``: what every interval of this comparison stands on."""
        text = f"{self.n} item{'s' if self.n != 1 else ''}"
        if self.clusters is not None:
            text += f", {self.clusters} cluster{'s' if self.clusters != 1 else ''}"
        return text


def bootstrap_indices(n: int, resamples: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> np.ndarray:
    """[resamples, n] item indices drawn with replacement (numpy's PCG64, seeded)."""
    if resamples < 1:
        raise OptionError(f"--bootstrap must be at least 1 (got {resamples})")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _pair(interval: stats.Interval) -> tuple[float, float]:
    return float(interval.low), float(interval.high)


def compare(
    correct_base: Sequence[bool] | np.ndarray,
    correct_edit: Sequence[bool] | np.ndarray,
    resamples: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    clusters: Sequence[Any] | None = None,
) -> Comparison:
    """Accuracy of both conditions and their paired difference (edit - base), with 95% intervals.

    Right/wrong outcomes of independent items (``clusters`` None): exact binomial intervals and the
    exact McNemar test. ``clusters`` (one id per item): a cluster bootstrap of ``resamples`` (seeded)
    and the exact sign test over clusters. Outcomes between 0 and 1 (a mean over controls) without
    clusters: each item is its own cluster. No interval is ever zero-width (docs/methods/statistics.md).
    """
    base = np.asarray(correct_base, dtype=np.float64)
    edit = np.asarray(correct_edit, dtype=np.float64)
    if base.shape != edit.shape or base.ndim != 1 or base.size == 0:
        raise ValueError("compare needs two equally long, non-empty sequences of per-item outcomes")
    n = int(base.size)
    binary = bool(np.all((base == 0) | (base == 1)) and np.all((edit == 0) | (edit == 1)))
    gained = int(np.clip(edit - base, 0, None).sum().round()) if not binary else int(((edit == 1) & (base == 0)).sum())
    lost = int(np.clip(base - edit, 0, None).sum().round()) if not binary else int(((edit == 0) & (base == 1)).sum())
    if clusters is None and binary:
        ci_b = stats.accuracy_interval(base)
        ci_e = stats.accuracy_interval(edit)
        paired = stats.mcnemar(base, edit)
        diff, p_value, test = paired.difference, paired.p_value, "exact McNemar"
        method = f"{ci_b.method} (accuracies); {diff.method} (difference)"
        n_clusters = None
    else:
        groups = list(clusters) if clusters is not None else list(range(n))
        kw = {"resamples": int(resamples), "seed": int(seed)}
        ci_b = stats.cluster_accuracy(base, groups, **kw)
        ci_e = stats.cluster_accuracy(edit, groups, **kw)
        diff = stats.cluster_difference(base, edit, groups, **kw)
        sign = stats.sign_test(base, edit, groups)
        p_value = sign.p_value
        test = "exact sign test over clusters" if clusters is not None else "exact sign test over items"
        method = f"{diff.method}"
        n_clusters = int(diff.clusters) if clusters is not None else None
    return Comparison(
        n=n,
        accuracy_base=float(base.mean()),
        accuracy_edit=float(edit.mean()),
        difference=float(edit.mean() - base.mean()),
        ci_base=_pair(ci_b),
        ci_edit=_pair(ci_e),
        ci_difference=_pair(diff),
        gained=gained,
        lost=lost,
        bootstrap=int(resamples),
        seed=int(seed),
        clusters=n_clusters,
        units=n_clusters if n_clusters is not None else n,
        p_value=float(p_value),
        test=test,
        ci_method=method,
    )


# -- multiple-choice evaluation -------------------------------------------------------------------


@dataclass
class EvalResult:
    """Base and edited accuracy on a task, paired, with per-item results in ``items``."""

    task: str
    kind: str  # "multiple_choice" or "needle"
    acc: Comparison
    items: pd.DataFrame
    acc_norm: Comparison | None = None
    edits: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy_base(self) -> float:
        return self.acc.accuracy_base

    @property
    def accuracy_edit(self) -> float:
        return self.acc.accuracy_edit

    @property
    def difference(self) -> float:
        return self.acc.difference

    @property
    def clusters(self) -> list[Any] | None:
        """The cluster of every item (None where the items are the independent units)."""
        if "cluster" not in self.items or self.items["cluster"].isna().any():
            return None
        return list(self.items["cluster"])

    @property
    def ci(self) -> tuple[float, float]:
        """95% interval of the accuracy difference (edit - base), from :mod:`headmap.stats`."""
        return self.acc.ci_difference

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.task, "kind": self.kind, "edits": self.edits, "acc": self.acc.as_dict()}
        if self.acc_norm is not None:
            out["acc_norm"] = self.acc_norm.as_dict()
        out.update(self.extra)
        return out


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Task | str | Path,
    edits: Sequence = (),
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    base: Predictions | None = None,
    units: str = "auto",
) -> EvalResult:
    """Score every item of ``task`` without and with ``edits``; accuracy, paired difference, 95% CI.

    ``acc`` (summed log-prob) is the primary metric, ``acc_norm`` (per UTF-8 byte) is also given.
    Pass ``base`` (from :func:`predict`) to reuse an unedited run. ``units``: ``auto`` (the items'
    clusters when they carry them, else the items), ``clusters`` (required) or ``items``.
    """
    if not isinstance(task, Task):
        task = load_task(task)
    clusters = task.clusters(units)  # items without a cluster fail here, before any scoring
    edits = list(edits)
    if base is None:
        base = predict(model, tokenizer, task, (), batch_size, max_length)
    edit = predict(model, tokenizer, task, edits, batch_size, max_length) if edits else base
    answers = np.array([it.answer for it in task.items])
    items = pd.DataFrame(
        {
            "id": [it.id for it in task.items],
            "cluster": [it.cluster for it in task.items],
            "answer": answers,
            "pred_base": base.pred,
            "pred_edit": edit.pred,
            "correct_base": base.correct(answers),
            "correct_edit": edit.correct(answers),
            "pred_norm_base": base.pred_norm,
            "pred_norm_edit": edit.pred_norm,
            "p_answer_base": base.p_answer,
            "p_answer_edit": edit.p_answer,
            "logprobs_base": [json.dumps([round(x, 6) for x in lp]) for lp in base.logprobs],
            "logprobs_edit": [json.dumps([round(x, 6) for x in lp]) for lp in edit.logprobs],
        }
    )
    acc = compare(items.correct_base, items.correct_edit, bootstrap, seed, clusters)
    norm = compare(base.correct(answers, True), edit.correct(answers, True), bootstrap, seed, clusters)
    return EvalResult(task.name, "multiple_choice", acc, items, norm, describe_edits(edits))
