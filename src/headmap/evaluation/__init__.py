"""Evaluation with and without edits: multiple-choice tasks scored by log-likelihood, needle retrieval.

A *task* is a JSONL file, one item per line::

    {"id": "q1", "context": "Question: ...\\nAnswer:", "options": [" yes", " no"], "answer": 0}

(``id`` is optional). Each option is scored by the sum of the log-probabilities of its tokens
given the context; the prediction is the option with the highest sum (``acc``, the primary
metric, as lm-evaluation-harness's ``acc``). ``acc_norm`` divides each sum by the option's length
in UTF-8 bytes first (lm-evaluation-harness's ``acc_norm``). Shipped tasks: ``mc_dev`` (40
items) and ``mc_test`` (80 items), easy 2-4-option questions written for headmap
(``headmap/data/tasks/``); tune on ``mc_dev``, report on ``mc_test``.

Base and edited runs both go through the headmap engine (the edited one with the edits), so the
only difference between the two is the edits: a neutral edit gives identical predictions.

The comparison is paired: every item is scored with and without the edits, and the 95%
interval of the accuracy difference comes from a seeded bootstrap over items (the same resampled
items for both conditions).

``needle_accuracy`` scores retrieval: the fraction of ``needle`` inputs (``headmap.corpus``)
whose greedy answer reproduces the needle's number exactly.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..corpus import Tokens as _Tokens, load_corpus, pad_batch, parse_spec
from ..engine import observe
from ..errors import EditError, OptionError, TaskError
from ..models import greedy_decode, logits_to_keep, position_ids

BUILTIN_TASKS = {"mc_dev": "data/tasks/mc_dev.jsonl", "mc_test": "data/tasks/mc_test.jsonl"}
DEFAULT_BOOTSTRAP = 2000
DEFAULT_BATCH_SIZE = 8

# -- tasks -----------------------------------------------------------------------------------------


@dataclass
class TaskItem:
    """One multiple-choice item: the context, its options, the index of the right one."""

    id: str
    context: str
    options: list[str]
    answer: int
    line: int = 0


@dataclass
class Task:
    name: str
    path: str
    items: list[TaskItem]

    def __len__(self) -> int:
        return len(self.items)


def _task_source(spec: str | Path) -> tuple[str, str, bytes]:
    """(name, path, bytes) of a built-in task or a task file."""
    spec = str(spec)
    if spec in BUILTIN_TASKS:
        resource = resources.files("headmap").joinpath(BUILTIN_TASKS[spec])
        return spec, str(resource), resource.read_bytes()
    path = Path(spec).expanduser()
    if not path.exists():
        builtin = ", ".join(BUILTIN_TASKS)
        raise TaskError(
            f"task file {path} does not exist; pass a JSONL file (one item per line: "
            f'{{"context": "...", "options": ["...", "..."], "answer": 0}}) or a built-in task: {builtin}'
        )
    if path.is_dir():
        raise TaskError(f"task {path} is a folder; pass a JSONL file with one item per line")
    return path.name, str(path), path.read_bytes()


def load_task(spec: str | Path, limit: int | None = None) -> Task:
    """Read a task: a built-in name (``mc_dev``, ``mc_test``) or a JSONL file.

    Every way a line can be wrong raises :class:`TaskError` naming the file and the line: not
    JSON, not an object, a missing or mistyped field, fewer than two options, an empty option, an
    answer that is not a whole number or is out of range, a repeated id.
    """
    if limit is not None and limit < 1:
        raise OptionError(f"--limit must be at least 1 (got {limit})")
    name, path, data = _task_source(spec)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TaskError(f"task file {path} is not UTF-8 (bad byte at offset {exc.start}); convert it") from exc
    items: list[TaskItem] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.lstrip("\ufeff").splitlines(), start=1):
        if not raw.strip():
            continue
        item = _parse_item(path, number, raw, len(items))
        if item.id in seen:
            raise TaskError(f"task file {path}, line {number}: id {item.id!r} is already used on line {seen[item.id]}")
        seen[item.id] = number
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise TaskError(f"task file {path} is empty (no non-blank line); put one JSON item per line")
    return Task(name, path, items)


def _parse_item(path: str, number: int, raw: str, index: int) -> TaskItem:
    where = f"task file {path}, line {number}"
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise TaskError(
            f'{where}: not valid JSON ({exc.msg}, column {exc.colno}); each line is one object like {{"context": '
            '"...", "options": ["...", "..."], "answer": 0}'
        ) from None
    if not isinstance(obj, dict):
        raise TaskError(f"{where}: a JSON object is needed (got {type(obj).__name__})")
    missing = [k for k in ("context", "options", "answer") if k not in obj]
    if missing:
        raise TaskError(f"{where}: the object has no {', '.join(repr(m) for m in missing)}")
    context, options, answer = obj["context"], obj["options"], obj["answer"]
    if not isinstance(context, str):
        raise TaskError(f'{where}: "context" must be a string (got {type(context).__name__})')
    if not isinstance(options, list):
        raise TaskError(f'{where}: "options" must be a list of strings (got {type(options).__name__})')
    if len(options) < 2:
        raise TaskError(f'{where}: "options" has {len(options)} option(s); an item needs at least 2')
    for k, option in enumerate(options):
        if not isinstance(option, str) or not option.strip():
            raise TaskError(f"{where}: option {k} must be a non-empty string (got {option!r})")
    if isinstance(answer, bool) or not isinstance(answer, int):
        if isinstance(answer, float) and answer.is_integer():
            answer = int(answer)
        else:
            raise TaskError(f'{where}: "answer" must be a whole number, the index of the right option (got {answer!r})')
    if not 0 <= answer < len(options):
        raise TaskError(
            f'{where}: "answer" {answer} is out of range: the item has {len(options)} options, '
            f"so the answer index must be 0 to {len(options) - 1}"
        )
    ident = obj.get("id", f"line-{number}")
    if not isinstance(ident, str | int) or isinstance(ident, bool):
        raise TaskError(f'{where}: "id" must be a string or a whole number (got {ident!r})')
    if not context.strip():
        warnings.warn(f"{where}: the context is empty; options are scored unconditionally", stacklevel=3)
    return TaskItem(str(ident), context, list(options), int(answer), number)


# -- scoring ---------------------------------------------------------------------------------------


@dataclass
class Continuation:
    """Log-likelihood of one continuation given its context."""

    logprob: float  # sum over the continuation's tokens
    greedy: bool  # every continuation token is the model's argmax
    tokens: int


def _engine(model: torch.nn.Module, edits: Sequence) -> Any:
    """The engine with ``edits`` (base runs too, with none: both conditions differ by the edits only)."""
    return observe(model, edits=tuple(edits))


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def _prefix_id(tokenizer: Any) -> int | None:
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return None


def encode_pair(toks: _Tokens, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context ids (with the tokenizer's leading special tokens) and continuation ids.

    Trailing white space of the context moves to the continuation (``"Answer: " + "yes"`` is
    scored as ``"Answer:" + " yes"``), as lm-evaluation-harness does, so that a BPE tokenizer
    sees the space where it usually is. An empty context becomes the BOS (else EOS) token.
    """
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    ctx = list(toks.pre) + (toks.plain(stripped) if stripped else [])
    if not ctx:
        prefix = _prefix_id(toks.tok)
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
) -> list[Continuation]:
    """Sum log-prob of each continuation's tokens given its context (token ids), in batches.

    Batches are left-padded, with position ids counted from each row's first real token, so a
    score does not depend on what else is in the batch. Inputs longer than ``max_length`` lose
    the start of their context.
    """
    if batch_size < 1:
        raise OptionError(f"--batch-size must be at least 1 (got {batch_size})")
    device = next(model.parameters()).device
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
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
    out: list[Continuation | None] = [None] * len(rows)
    with torch.no_grad(), _engine(model, edits):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            tail = max(len(rows[i][1]) for i in chunk)  # positions whose logits are read
            ids, mask = pad_batch([rows[i][0] for i in chunk], pad_id)
            ids, mask = ids.to(device), mask.to(device)
            kwargs = logits_to_keep(model, tail)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), **kwargs).logits
            logp = torch.log_softmax(logits[:, -tail:].float(), dim=-1)
            for r, i in enumerate(chunk):
                cont = rows[i][1]
                n = len(cont)
                target = torch.tensor(cont, dtype=torch.long, device=device)
                lp = logp[r, tail - n :]  # the last n positions predict the continuation's n tokens
                picked = lp.gather(-1, target[:, None]).squeeze(-1)
                greedy = bool((lp.argmax(dim=-1) == target).all())
                out[i] = Continuation(float(picked.double().sum()), greedy, n)
    return [c for c in out if c is not None]


def score_options(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[TaskItem],
    edits: Sequence = (),
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
) -> list[list[float]]:
    """For each item, the summed log-probability of each option's tokens given the context."""
    toks = _Tokens(tokenizer)
    pairs, owner = [], []
    for k, item in enumerate(items):
        for option in item.options:
            pairs.append(encode_pair(toks, item.context, option))
            owner.append(k)
    scores = score_token_pairs(model, pairs, _pad_id(tokenizer), edits, batch_size, max_length)
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


# -- statistics ------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """Paired accuracies of two conditions with seeded bootstrap 95% intervals."""

    n: int
    accuracy_base: float
    accuracy_edit: float
    difference: float
    ci_base: tuple[float, float]
    ci_edit: tuple[float, float]
    ci_difference: tuple[float, float]
    gained: int  # items right only with the edits
    lost: int  # items right only without them
    bootstrap: int
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "accuracy_base": self.accuracy_base,
            "accuracy_edit": self.accuracy_edit,
            "difference": self.difference,
            "ci_base": list(self.ci_base),
            "ci_edit": list(self.ci_edit),
            "ci_difference": list(self.ci_difference),
            "gained": self.gained,
            "lost": self.lost,
            "bootstrap": self.bootstrap,
            "seed": self.seed,
        }


def bootstrap_indices(n: int, resamples: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> np.ndarray:
    """[resamples, n] item indices drawn with replacement (numpy's PCG64, seeded)."""
    if resamples < 1:
        raise OptionError(f"--bootstrap must be at least 1 (got {resamples})")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _interval(values: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def compare(
    correct_base: Sequence[bool] | np.ndarray,
    correct_edit: Sequence[bool] | np.ndarray,
    resamples: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> Comparison:
    """Accuracy of both conditions, their paired difference (edit - base) and percentile bootstrap
    95% intervals over items (every resample draws the same items for both conditions)."""
    base = np.asarray(correct_base, dtype=np.float64)
    edit = np.asarray(correct_edit, dtype=np.float64)
    if base.shape != edit.shape or base.ndim != 1 or base.size == 0:
        raise ValueError("compare needs two equally long, non-empty sequences of per-item outcomes")
    idx = bootstrap_indices(base.size, resamples, seed)
    b, e = base[idx].mean(axis=1), edit[idx].mean(axis=1)
    return Comparison(
        n=int(base.size),
        accuracy_base=float(base.mean()),
        accuracy_edit=float(edit.mean()),
        difference=float(edit.mean() - base.mean()),
        ci_base=_interval(b),
        ci_edit=_interval(e),
        ci_difference=_interval(e - b),
        gained=int(((edit == 1) & (base == 0)).sum()),
        lost=int(((edit == 0) & (base == 1)).sum()),
        bootstrap=int(resamples),
        seed=int(seed),
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
    def ci(self) -> tuple[float, float]:
        """95% bootstrap interval of the accuracy difference (edit - base)."""
        return self.acc.ci_difference

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.task, "kind": self.kind, "edits": self.edits, "acc": self.acc.as_dict()}
        if self.acc_norm is not None:
            out["acc_norm"] = self.acc_norm.as_dict()
        out.update(self.extra)
        return out


def describe_edits(edits: Iterable) -> list[str]:
    return [e.describe() if hasattr(e, "describe") else repr(e) for e in edits]


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
) -> EvalResult:
    """Score every item of ``task`` without and with ``edits``; accuracy, paired difference, 95% CI.

    ``acc`` (summed log-prob) is the primary metric, ``acc_norm`` (per UTF-8 byte) is also given.
    Pass ``base`` (from :func:`predict`) to reuse an unedited run.
    """
    if not isinstance(task, Task):
        task = load_task(task)
    edits = list(edits)
    if base is None:
        base = predict(model, tokenizer, task, (), batch_size, max_length)
    edit = predict(model, tokenizer, task, edits, batch_size, max_length) if edits else base
    answers = np.array([it.answer for it in task.items])
    items = pd.DataFrame(
        {
            "id": [it.id for it in task.items],
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
    acc = compare(items.correct_base, items.correct_edit, bootstrap, seed)
    norm = compare(base.correct(answers, True), edit.correct(answers, True), bootstrap, seed)
    return EvalResult(task.name, "multiple_choice", acc, items, norm, describe_edits(edits))


# -- needle retrieval ------------------------------------------------------------------------------


def greedy_answers(
    model: torch.nn.Module,
    samples: Sequence,
    pad_id: int,
    edits: Sequence = (),
    batch_size: int = 4,
) -> list[list[int]]:
    """Greedy continuation of each sample (``ids``) for as many tokens as its ``info['answer_ids']``."""
    device = next(model.parameters()).device
    out: list[list[int]] = []
    with torch.no_grad(), _engine(model, edits):
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            steps = max(len(s.info["answer_ids"]) for s in chunk)
            ids, mask = pad_batch([s.ids for s in chunk], pad_id)
            gen = greedy_decode(model, ids.to(device), mask.to(device), steps).tolist()
            out += [row[: len(s.info["answer_ids"])] for row, s in zip(gen, chunk, strict=True)]
    return out


def load_needles(tokenizer: Any, spec: str = "needle", max_length: int = 512, limit: int | None = None, seed: int = 0):
    """The needle inputs of ``spec`` (``needle:lengths=...:depths=...``)."""
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
) -> EvalResult:
    """Retrieval accuracy on the needle corpus without and with ``edits``.

    An input counts as right when the model's greedy answer equals the needle's number token for
    token. ``base`` (greedy answers from :func:`greedy_answers`) and ``needles`` (a corpus from
    :func:`load_needles`) reuse earlier work.
    """
    needles = needles if needles is not None else load_needles(tokenizer, corpus, max_length, limit, seed)
    samples = needles.samples
    pad = _pad_id(tokenizer) if tokenizer is not None else 0
    if base is None:
        base = greedy_answers(model, samples, pad, (), batch_size)
    edits = list(edits)
    edited = greedy_answers(model, samples, pad, edits, batch_size) if edits else base
    want = [list(s.info["answer_ids"]) for s in samples]

    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))

    items = pd.DataFrame(
        {
            "id": [f"needle-{i}" for i in range(len(samples))],
            "context_length": [s.info.get("context_length") for s in samples],
            "depth": [s.info.get("depth") for s in samples],
            "answer": [s.info.get("answer") for s in samples],
            "pred_base": [text(g) for g in base],
            "pred_edit": [text(g) for g in edited],
            "correct_base": [g == w for g, w in zip(base, want, strict=True)],
            "correct_edit": [g == w for g, w in zip(edited, want, strict=True)],
        }
    )
    acc = compare(items.correct_base, items.correct_edit, bootstrap, seed)
    return EvalResult(needles.name, "needle", acc, items, None, describe_edits(edits))


# -- edits from specs, random controls -------------------------------------------------------------


def build_edits(specs: Iterable[Any], atlas: Any = None, tokenizer: Any = None) -> list:
    """Edits from ``NAME:key=value`` specs or Edit objects (``headmap.edits.make_edits``); ``atlas`` (an
    Atlas or a run folder) resolves heads rules such as ``heads="top 5 retrieval"``."""
    specs = list(specs)
    if not specs:
        return []
    from ..edits import make_edits

    edits = make_edits(specs, atlas=atlas)
    if tokenizer is not None:
        from ..steer import prepare

        prepare(edits, tokenizer)  # text-file references of mean ablation
    return edits


def model_heads(model: torch.nn.Module) -> list[tuple[int, int]]:
    """Every (layer, query head) of the model."""
    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if not layers or not heads:
        raise EditError("cannot tell the model's layers and heads from its config")
    return [(layer, head) for layer in range(int(layers)) for head in range(int(heads))]


def random_like(edits: Sequence, model: torch.nn.Module, seed: int) -> list:
    """Copies of ``edits`` that touch as many heads as each does, drawn at random (seeded) from the
    model's heads that no edit of ``edits`` touches: the control for "these heads matter"."""
    for e in edits:
        if getattr(e, "heads", None) is None and getattr(e, "heads_rule", None) is not None:
            from ..edits import Edit

            Edit.bind(e, model)  # resolve the heads rule against the atlas
    named = [e for e in edits if getattr(e, "heads", None) is not None]
    if not named:
        raise EditError("a random-heads control needs edits that name their heads (heads=...)")
    taken = {h for e in named for h in e.heads}
    pool = [h for h in model_heads(model) if h not in taken]
    rng = np.random.default_rng(seed)
    out = []
    for e in edits:
        heads = getattr(e, "heads", None)
        if heads is None:
            out.append(e)
            continue
        if len(heads) > len(pool):
            raise EditError(f"cannot draw {len(heads)} random heads from the {len(pool)} heads the edits leave")
        pick = sorted(pool[i] for i in rng.choice(len(pool), size=len(heads), replace=False))
        out.append(with_heads(e, pick))
    return out


def with_heads(edit: Any, heads: Sequence[tuple[int, int]]) -> Any:
    """A copy of ``edit`` that acts on ``heads`` instead (a mean ablation is fitted again on bind)."""
    new = copy.copy(edit)
    new.heads = sorted({(int(la), int(h)) for la, h in heads})
    new._layers = {la for la, _ in new.heads}
    if hasattr(new, "heads_rule"):
        new.heads_rule = None
    if getattr(new, "mode", None) == "mean" and getattr(new, "reference", None) is not None:
        new.means, new._fitted_on = None, None  # the means of other heads: fit them on bind
    return new


# -- tuning ----------------------------------------------------------------------------------------

EditFactory = Callable[[float], Sequence]


@dataclass
class TuneResult:
    """Factors chosen on the dev split, and the held-out test comparison of the chosen edits."""

    dev: pd.DataFrame  # one row per (group, factor) tried on dev
    chosen: list[float]
    specs: list[str]
    test: EvalResult
    dev_task: str
    test_task: str

    def summary(self) -> dict[str, Any]:
        return {
            "dev_task": self.dev_task,
            "test_task": self.test_task,
            "chosen": self.chosen,
            "specs": self.specs,
            "dev": self.dev.to_dict(orient="records"),
            "test": self.test.summary(),
        }


def _factory(template: str | EditFactory, atlas: Any) -> EditFactory:
    if callable(template):
        return template
    if "{f}" not in template:
        raise OptionError(f"edit template {template!r} has no {{f}} where the factor goes")
    return lambda f: build_edits([template.replace("{f}", _number(f))], atlas)


def _number(f: float) -> str:
    return str(int(f)) if float(f).is_integer() else repr(float(f))


def tune(
    model: torch.nn.Module,
    tokenizer: Any,
    dev: Task | str | Path,
    test: Task | str | Path,
    templates: Sequence[str | EditFactory],
    grid: Sequence[float],
    neutral: float = 1.0,
    atlas: Any = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> TuneResult:
    """Choose one factor per head group on ``dev`` only, then report held-out accuracy on ``test``.

    Each template (a spec with ``{f}`` where the factor goes, or a callable ``f -> edits``) is
    one head group. Groups are tuned one after another (coordinate search): every factor of
    ``grid`` (and ``neutral``) is tried for the group with the earlier groups at their chosen
    factors and the later ones at ``neutral``. The best factor by dev accuracy (ties: the mean
    probability of the right option, softmax over options) is kept only when its dev accuracy is
    higher than the group's neutral setting gives; otherwise the group stays neutral. The test
    split is read only after every choice is made, to score the chosen edits against the
    unedited model.
    """
    dev = dev if isinstance(dev, Task) else load_task(dev)
    test = test if isinstance(test, Task) else load_task(test)
    if Path(dev.path).resolve() == Path(test.path).resolve() and dev.path:
        raise OptionError("the dev and test tasks are the same file; tune on a dev split and report on another")
    dev_keys = {(it.context, tuple(it.options)) for it in dev.items}
    shared = sum((it.context, tuple(it.options)) in dev_keys for it in test.items)
    if shared:
        warnings.warn(
            f"{shared} test item(s) also appear in the dev split; the held-out score is optimistic", stacklevel=2
        )
    grid = [float(g) for g in grid]
    if not grid or not all(math.isfinite(g) for g in grid):
        raise OptionError("--grid needs at least one finite factor")
    if not templates:
        raise OptionError("tuning needs at least one edit template")
    factories = [_factory(t, atlas) for t in templates]
    chosen = [float(neutral)] * len(factories)
    say = progress or (lambda _msg: None)

    def edits_for(factors: Sequence[float]) -> list:
        out: list = []
        for make, f in zip(factories, factors, strict=True):
            out += list(make(f))
        return out

    answers = np.array([it.answer for it in dev.items])
    rows = []
    cache: dict[tuple[float, ...], tuple[float, float]] = {}

    def dev_score(factors: list[float]) -> tuple[float, float]:
        key = tuple(factors)
        if key not in cache:
            pred = predict(model, tokenizer, dev, edits_for(factors), batch_size, max_length)
            cache[key] = (float(pred.correct(answers).mean()), float(pred.p_answer.mean()))
        return cache[key]

    values = sorted(set(grid) | {float(neutral)})
    for g in range(len(factories)):
        current = dev_score(chosen)  # this group at neutral, earlier groups at their chosen factors
        trials = []
        for f in values:
            trial = list(chosen)
            trial[g] = f
            score = dev_score(trial)
            rows.append({"group": g, "factor": f, "dev_accuracy": score[0], "dev_p_answer": score[1]})
            say(f"group {g} factor {_number(f)}: dev accuracy {score[0]:.3f}, p(answer) {score[1]:.4f}")
            trials.append((score, trial))
        score, trial = max(trials, key=lambda t: t[0])  # accuracy, then p(answer); the first of equals
        if score[0] > current[0]:  # only a gain in dev accuracy changes the model
            chosen = trial
    specs = [
        t.replace("{f}", _number(f)) if isinstance(t, str) else repr(t) for t, f in zip(templates, chosen, strict=True)
    ]
    result = evaluate(model, tokenizer, test, edits_for(chosen), batch_size, max_length, bootstrap, seed)
    result.edits = specs
    return TuneResult(pd.DataFrame(rows), chosen, specs, result, dev.name, test.name)
