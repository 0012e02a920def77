"""The runs behind ``headmap eval`` and ``headmap tune``: every check made before the model loads,
the scoring, and the files written to ``--out``. The command line only parses and prints.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..corpus import parse_spec
from ..errors import OptionError, OutputError
from ..models import load_model, pad_id
from ..rundir import check_writable
from .controls import RandomControls, draw_controls, random_head_controls
from .editing import build_edits, prepare_edits
from .needle import greedy_answers, load_needles, needle_accuracy
from .scoring import DEFAULT_BATCH_SIZE, DEFAULT_BOOTSTRAP, EvalResult, evaluate, predict
from .tasks import Task, load_task
from .tuning import TuneResult, parse_grid, tune

#: Inputs per batch of the needle task's greedy decoding, at most.
NEEDLE_BATCH = 4
#: Context length of a needle task when --max-length is not given.
NEEDLE_LENGTH = 512


def is_needle(task: str) -> bool:
    """Whether ``task`` is a needle corpus spec (``needle`` or ``needle:...``) rather than a task."""
    return task == "needle" or task.startswith("needle:")


def check_out(out: Path | None) -> None:
    """Refuse an ``--out`` folder that cannot be written, before any model loads: a file, a place
    that cannot be written (``/proc``, a read-only folder), a dangling link."""
    if out is None:
        return
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder; choose a folder path")
    check_writable(out, "--out")


def check_counts(batch_size: int, bootstrap: int, limit: int | None = None) -> None:
    """--batch-size, --bootstrap and --limit are whole numbers >= 1 (checked before any work)."""
    if batch_size < 1:
        raise OptionError(f"--batch-size must be at least 1 (got {batch_size})")
    if bootstrap < 1:
        raise OptionError(f"--bootstrap must be at least 1 (got {bootstrap})")
    if limit is not None and limit < 1:
        raise OptionError(f"--limit must be at least 1 (got {limit})")


def write_results(out: Path, items: Any, summary: dict[str, Any], extra: dict[str, Any] | None = None) -> list[Path]:
    """items.csv, items.parquet and summary.json in ``out`` (other files there are left alone)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, frame in {"items": items, **(extra or {})}.items():
        for suffix in (".csv", ".parquet"):
            path = out / f"{name}{suffix}"
            tmp = path.with_name(f".{path.name}.tmp")
            if suffix == ".csv":
                frame.to_csv(tmp, index=False)
            else:
                frame.to_parquet(tmp, index=False)
            os.replace(tmp, path)
            written.append(path)
    path = out / "summary.json"
    tmp = path.with_name(".summary.json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    written.append(path)
    return written


@dataclass
class EvalRun:
    """What ``headmap eval`` reports: the result, the random-head controls, the per-item table and
    the summary written to summary.json."""

    model_id: str
    result: EvalResult
    needle: bool
    what: str  # one line: how many items and how they are scored
    items: pd.DataFrame
    summary: dict[str, Any]
    controls: RandomControls | None
    edited: bool  # whether any --edit was given

    def write(self, out: Path) -> list[Path]:
        return write_results(out, self.items, self.summary)


def run_eval(
    model: str | None = None,
    task: str = "mc_test",
    edits: list[str] | None = None,
    atlas: Path | None = None,
    out: Path | None = None,
    limit: int | None = None,
    random_heads: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
) -> EvalRun:
    """``headmap eval``: accuracy on ``task`` without and with ``edits`` (specs), and ``random_heads``
    random-head controls. Every option, the task, the edits and ``out`` are checked before the model
    loads; the edits are bound to the model before any scoring."""
    specs = list(edits or [])
    if random_heads < 0:
        raise OptionError(f"--random-heads must be 0 or more (got {random_heads})")
    if random_heads and not specs:
        raise OptionError("--random-heads draws controls for the --edit edits; give at least one --edit")
    check_counts(batch_size, bootstrap, limit)
    check_out(out)
    needle = is_needle(task)
    task_obj: Task | None = None
    if needle:
        parse_spec(task)  # bad needle options fail here, before the model loads
    else:
        task_obj = load_task(task, limit=limit)  # a malformed line fails here
    from ..edits import load_atlas

    atlas_obj = load_atlas(atlas) if atlas is not None else None
    edit_objs = build_edits(specs, atlas_obj)  # unknown names and bad values fail here
    lm = load_model(model, dtype=dtype, device=device)
    prepare_edits(edit_objs, lm.tokenizer, lm.model)  # heads the model does not have fail here
    draws = draw_controls(edit_objs, lm.model, random_heads)
    if needle:
        length = max_length or NEEDLE_LENGTH
        batch = max(1, min(batch_size, NEEDLE_BATCH))
        needles = load_needles(lm.tokenizer, task, length, limit, seed)
        base = greedy_answers(lm.model, needles.samples, pad_id(lm.tokenizer), (), batch)

        def score(edits: list) -> EvalResult:
            return needle_accuracy(
                lm.model, lm.tokenizer, edits, task, length, limit, seed, batch, bootstrap, base, needles
            )

        what = f"{len(needles)} needle inputs; accuracy = greedy answer equals the needle's number"
    else:
        assert task_obj is not None
        base_pred = predict(lm.model, lm.tokenizer, task_obj, (), batch_size, max_length)

        def score(edits: list) -> EvalResult:
            return evaluate(
                lm.model, lm.tokenizer, task_obj, edits, batch_size, max_length, bootstrap, seed, base=base_pred
            )

        what = f"{len(task_obj)} items; acc = option with the highest summed log-probability"
    result = score(edit_objs)
    summary: dict[str, Any] = {"model": lm.model_id, **result.summary(), "options": {"limit": limit, "seed": seed}}
    controls = None
    items = result.items.copy()
    if draws:
        controls = random_head_controls(result, draws, score, bootstrap, seed)
        items = controls.items
        summary.update(controls.summary())
    return EvalRun(lm.model_id, result, needle, what, items, summary, controls, bool(specs))


@dataclass
class TuneRun:
    """What ``headmap tune`` reports: the tuning result, the split sizes and the summary."""

    model_id: str
    result: TuneResult
    dev_items: int
    test_items: int
    neutral: float
    summary: dict[str, Any]

    def write(self, out: Path) -> list[Path]:
        return write_results(out, self.result.test.items, self.summary, {"dev": self.result.dev})


def run_tune(
    model: str | None = None,
    task_dev: str = "mc_dev",
    task_test: str = "mc_test",
    templates: list[str] | None = None,
    grid: str = "0.5,0.75,1,1.25,1.5",
    neutral: float = 1.0,
    atlas: Path | None = None,
    out: Path | None = None,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
) -> TuneRun:
    """``headmap tune``: factors chosen on ``task_dev``, held-out accuracy on ``task_test``. The
    templates, the grid, the tasks, every edit at every factor and ``out`` are checked before the
    model loads."""
    templates = list(templates or [])
    if not templates:
        raise OptionError("tune needs at least one --edit-template, e.g. scale_first_token:heads=[[0,1]]:factor={f}")
    factors = parse_grid(grid)
    for t in templates:
        if "{f}" not in t:
            raise OptionError(f"--edit-template {t!r} has no {{f}} where the factor goes")
    check_counts(batch_size, bootstrap, limit)
    check_out(out)
    dev = load_task(task_dev, limit=limit)
    test = load_task(task_test, limit=limit)
    from ..edits import load_atlas

    atlas_obj = load_atlas(atlas) if atlas is not None else None
    for t in templates:  # every template must make valid edits at every factor, before the model loads
        for f in {*factors, neutral}:
            build_edits([t.replace("{f}", repr(float(f)))], atlas_obj)
    lm = load_model(model, dtype=dtype, device=device)
    result = tune(
        lm.model,
        lm.tokenizer,
        dev,
        test,
        templates,
        factors,
        neutral=neutral,
        atlas=atlas_obj,
        batch_size=batch_size,
        max_length=max_length,
        bootstrap=bootstrap,
        seed=seed,
    )
    summary = {"model": lm.model_id, **result.summary()}
    return TuneRun(lm.model_id, result, len(dev), len(test), neutral, summary)
