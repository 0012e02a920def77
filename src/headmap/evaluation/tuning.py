"""Tuning edit factors on a dev split only, then reporting held-out accuracy on a test split."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..errors import OptionError
from .editing import build_edits
from .scoring import DEFAULT_BATCH_SIZE, DEFAULT_BOOTSTRAP, EvalResult, evaluate, predict
from .tasks import Task, load_task

EditFactory = Callable[[float], Sequence]
#: One dev trial's outcome: (dev accuracy, mean p(answer)).
Score = tuple[float, float]


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


def parse_grid(text: str) -> list[float]:
    """The factors of ``--grid`` (comma-separated numbers); OptionError naming a value that is not a finite number."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    factors = []
    for part in parts:
        try:
            factor = float(part)
        except ValueError:
            raise OptionError(
                f"--grid must be comma-separated numbers: {part!r} is not a number (got {text!r})"
            ) from None
        if not math.isfinite(factor):
            raise OptionError(f"--grid: {part!r} is not a finite number; every factor must be finite (got {text!r})")
        factors.append(factor)
    return check_grid(factors, text)


def check_grid(grid: Sequence[float], text: str | None = None) -> list[float]:
    """``grid`` as floats: at least one, every one finite (OptionError naming the first that is not)."""
    factors = [float(g) for g in grid]
    got = f" (got {text!r})" if text is not None else ""
    if not factors:
        raise OptionError(f"--grid needs at least one factor{got}")
    for factor in factors:
        if not math.isfinite(factor):
            raise OptionError(f"--grid: {factor!r} is not a finite number; every factor must be finite")
    return factors


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
    units: str = "auto",
    known: Mapping[tuple[float, ...], Score] | None = None,
    on_trial: Callable[[tuple[float, ...], Score], None] | None = None,
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

    ``progress`` receives one line per dev trial (group, factor, dev accuracy, p(answer)) and one once
    the test split is scored. ``known``: dev trials already scored (the factors of every group, in
    order -> (dev accuracy, mean p(answer))), taken as they are instead of scored again (``headmap tune
    --resume`` reads them from its checkpoint); ``on_trial(factors, score)`` is called as each other
    trial is scored, before its progress line. The choice depends only on these scores, so a run given
    the trials of an earlier one chooses what that run would have.
    """
    dev = dev if isinstance(dev, Task) else load_task(dev)
    test = test if isinstance(test, Task) else load_task(test)
    test.clusters(units)  # items without a cluster, when the statistics need one, fail before any scoring
    if Path(dev.path).resolve() == Path(test.path).resolve() and dev.path:
        raise OptionError("the dev and test tasks are the same file; tune on a dev split and report on another")
    dev_keys = {(it.context, tuple(it.options)) for it in dev.items}
    shared = sum((it.context, tuple(it.options)) in dev_keys for it in test.items)
    if shared:
        warnings.warn(
            f"{shared} test item(s) also appear in the dev split; the held-out score is optimistic", stacklevel=2
        )
    grid = check_grid(grid)
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
    cache: dict[tuple[float, ...], Score] = {}
    given = {tuple(float(f) for f in key): (float(a), float(p)) for key, (a, p) in (known or {}).items()}
    seconds: dict[tuple[float, ...], float] = {}

    def dev_score(factors: list[float]) -> Score:
        key = tuple(factors)
        if key not in cache:
            if key in given:
                cache[key] = given[key]
            else:
                started = time.perf_counter()
                pred = predict(model, tokenizer, dev, edits_for(factors), batch_size, max_length)
                cache[key] = (float(pred.correct(answers).mean()), float(pred.p_answer.mean()))
                seconds[key] = time.perf_counter() - started
                if on_trial is not None:
                    on_trial(key, cache[key])
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
            key = tuple(trial)
            note = f"{seconds[key]:.1f} s" if key in seconds else "from the checkpoint"
            say(f"group {g} factor {_number(f)}: dev accuracy {score[0]:.3f}, p(answer) {score[1]:.4f}, {note}")
            trials.append((score, trial))
        score, trial = max(trials, key=lambda t: t[0])  # accuracy, then p(answer); the first of equals
        if score[0] > current[0]:  # only a gain in dev accuracy changes the model
            chosen = trial
    specs = [
        t.replace("{f}", _number(f)) if isinstance(t, str) else repr(t) for t, f in zip(templates, chosen, strict=True)
    ]
    started = time.perf_counter()
    result = evaluate(model, tokenizer, test, edits_for(chosen), batch_size, max_length, bootstrap, seed, units=units)
    result.edits = specs
    say(
        f"test: {len(test)} items, accuracy {result.acc.accuracy_base:.3f} unedited, "
        f"{result.acc.accuracy_edit:.3f} with the chosen edits, {time.perf_counter() - started:.1f} s"
    )
    return TuneResult(pd.DataFrame(rows), chosen, specs, result, dev.name, test.name)
