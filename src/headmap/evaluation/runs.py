"""The runs behind ``headmap eval`` and ``headmap tune``: every check made before the model loads,
the scoring, and the files written to ``--out``. The command line only parses and prints.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import stats
from ..corpus import parse_spec
from ..errors import OptionError, OutputError, TaskError
from ..models import load_model, pad_id
from ..parallel import Ranks, sharing
from ..rundir import check_writable, write_file, write_text
from . import heldout
from .controls import DEFAULT_CONTROLS, MATCHES, RandomControls, draw_controls, random_head_controls
from .editing import build_edits, prepare_edits
from .needle import greedy_answers, load_needles, needle_accuracy, needle_spec
from .scoring import DEFAULT_BATCH_SIZE, DEFAULT_BOOTSTRAP, Comparison, EvalResult, Predictions, evaluate, predict
from .tasks import UNITS, Task, is_ruler, load_task, parse_ruler_spec, ruler_task
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
        written.append(write_file(out / f"{name}.csv", lambda fh, f=frame: f.to_csv(fh, index=False)))
        written.append(write_file(out / f"{name}.parquet", lambda fh, f=frame: f.to_parquet(fh, index=False)))
    written.append(write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n"))
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
    checks: list = field(default_factory=list)  # held-out checks against the atlas's corpus
    lead: bool = True  # False on ranks other than 0 of a data-parallel run: they write nothing
    checkpoint: Path | None = None  # the finished conditions kept while it ran (removed once written)

    def write(self, out: Path) -> list[Path]:
        if not self.lead:
            return []
        written = write_results(out, self.items, self.summary)
        if self.checkpoint is not None and Path(out).resolve() == self.checkpoint.parent.resolve():
            remove_checkpoint(self.checkpoint)
        return written


def run_eval(
    model: str | None = None,
    task: str = "mc_test",
    edits: list[str] | None = None,
    atlas: Path | None = None,
    out: Path | None = None,
    limit: int | None = None,
    random_heads: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
    units: str = "auto",
    control_heads: str = "layer",
    allow_overlap: bool = False,
    power_effect: float | None = None,
    progress: Callable[[str], None] | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: str | dict[Any, Any] | None = None,
    offload_folder: str | Path | None = None,
    resume: bool = False,
) -> EvalRun:
    """``headmap eval``: accuracy on ``task`` without and with ``edits`` (specs), and ``random_heads``
    random-head controls (default: 20 when the edits name heads, drawn from the same layers; 0 otherwise).

    ``task`` is a JSONL file, a built-in task, a needle corpus spec or a RULER-style task with its
    options (``niah_single:lengths=512:n=120``, generated for the model's tokenizer, avoiding the
    atlas's needles and prose). With ``atlas``, the task's needles, haystacks, prose and items are
    checked against the atlas's corpus (meta.json): an overlap is refused unless ``allow_overlap``;
    the check is recorded in the summary. ``power_effect``: also report how many items a paired
    comparison needs to detect a difference of that size with 80% power at the base accuracy and
    discordance measured here (:func:`stats.paired_sample_size`). Every option, the task, the edits
    and ``out`` are checked before the model loads; the edits are bound to the model before any scoring.

    ``device_map``, ``max_memory``, ``offload_folder``: model parallel placement (:func:`headmap.load_model`).
    Started by ``torchrun --nproc-per-node N -m headmap eval ...`` (or ``accelerate launch``), the ranks
    check that they run the same evaluation (:func:`fingerprint`), each scores its share of the batches,
    every rank gathers every item's outcome, and only rank 0 writes (:attr:`EvalRun.lead`); the per-item
    outcomes equal a single process's bit for bit (every batch is the one a single process runs).
    ``progress`` receives one line as each condition (base, edited, every control) is done.

    With ``out``, every finished condition (the unedited predictions, the edited run, each control) is kept
    in ``<out>/.headmap-eval/`` as soon as it is done (by rank 0 under torchrun), after a fingerprint of the
    run; ``resume=True`` (``--resume``) reads those back instead of scoring them again, after any rank or
    the one process stopped, and refuses a different run naming the field. :meth:`EvalRun.write` removes
    the folder once the results are written."""
    ranks = Ranks.start(device)
    try:
        return _run_eval(
            ranks, model, task, edits, atlas, out, limit, random_heads, batch_size, max_length, bootstrap, seed,
            dtype, ranks.device(device) if ranks else device, units, control_heads, allow_overlap, power_effect,
            {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder},
            progress if progress is not None and (ranks is None or ranks.leader) else (lambda _msg: None), resume,
        )  # fmt: skip
    finally:
        if ranks is not None:
            ranks.close()


def _run_eval(
    ranks: Ranks | None,
    model: str | None,
    task: str,
    edits: list[str] | None,
    atlas: Path | None,
    out: Path | None,
    limit: int | None,
    random_heads: int | None,
    batch_size: int,
    max_length: int | None,
    bootstrap: int,
    seed: int,
    dtype: str,
    device: str,
    units: str,
    control_heads: str,
    allow_overlap: bool,
    power_effect: float | None,
    placement: dict[str, Any],
    say: Callable[[str], None],
    resume: bool = False,
) -> EvalRun:
    specs = list(edits or [])
    if resume and out is None:
        raise OptionError("--resume needs --out, the folder that holds the stopped evaluation")
    if random_heads is not None and random_heads < 0:
        raise OptionError(f"--random-heads must be 0 or more (got {random_heads})")
    if random_heads and not specs:
        raise OptionError("--random-heads draws controls for the --edit edits; give at least one --edit")
    if control_heads not in MATCHES:
        raise OptionError(f"--control-heads must be one of {', '.join(MATCHES)} (got {control_heads!r})")
    if units not in UNITS:
        raise OptionError(f"--units must be one of {', '.join(UNITS)} (got {units!r})")
    if power_effect is not None:
        stats.paired_sample_size(power_effect)  # an effect of 0 (or not a number) fails here
    check_counts(batch_size, bootstrap, limit)
    check_out(out)
    check_checkpoint(out, resume)
    needle = is_needle(task)
    ruler = is_ruler(task)
    task_obj: Task | None = None
    if needle:
        parse_spec(needle_spec(task))  # bad needle options fail here, before the model loads
    elif ruler:
        parse_ruler_spec(task)  # unknown options and bad values fail here
    else:
        task_obj = load_task(task, limit=limit)  # a malformed line fails here
        task_obj.clusters(units)  # items without a cluster, when the statistics need one, fail here
    from ..edits import load_atlas

    atlas_obj = load_atlas(atlas) if atlas is not None else None
    atlas_side = heldout.from_description((getattr(atlas_obj, "meta", None) or {}).get("corpus"))
    checks: list[heldout.Check] = []
    if task_obj is not None and atlas_obj is not None:  # before the model loads
        checks.append(heldout.check(atlas_side, heldout.from_items(task_obj.items, f"task {task}"), allow_overlap))
    edit_objs = build_edits(specs, atlas_obj)  # unknown names and bad values fail here
    lm = load_model(model, dtype=dtype, device=device, **placement)
    prepare_edits(edit_objs, lm.tokenizer, lm.model)  # heads the model does not have fail here
    if random_heads is None:
        named = any(getattr(e, "heads", None) is not None for e in edit_objs)
        random_heads = DEFAULT_CONTROLS if named else 0
    draws = draw_controls(edit_objs, lm.model, random_heads, control_heads)
    options = {
        "limit": limit, "batch_size": batch_size, "max_length": max_length, "bootstrap": bootstrap, "seed": seed,
        "units": units, "control_heads": control_heads, "random_heads": random_heads, "task": task,
    }  # fmt: skip
    if needle:
        length = max_length or NEEDLE_LENGTH
        batch = max(1, min(batch_size, NEEDLE_BATCH))
        needles = load_needles(lm.tokenizer, task, length, limit, seed)
        if atlas_obj is not None:
            side = heldout.from_items([s.info for s in needles.samples], f"task {task}")
            checks.append(heldout.check(atlas_side, side, allow_overlap))
        if units == "clusters" and any(s.info.get("cluster") is None for s in needles.samples):
            raise TaskError("the needle inputs have no cluster ids (field 'cluster'); use --units items")
        started = time.perf_counter()
        inputs = [[list(s.ids), list(s.info["answer_ids"]), s.info.get("cluster")] for s in needles.samples]
        keep = start_checkpoint(ranks, out, resume, lm, inputs, specs, edit_objs, draws, dtype, options)

        def answers() -> list[list[int]]:
            with sharing(ranks):
                return greedy_answers(lm.model, needles.samples, pad_id(lm.tokenizer), (), batch)

        base = keep.base(answers, lambda b: b, lambda d: [[int(t) for t in row] for row in d])
        say(f"base: {len(needles)} needle inputs, {time.perf_counter() - started:.1f} s{keep.note('base')}")

        def score_one(edits: list) -> EvalResult:
            return needle_accuracy(
                lm.model, lm.tokenizer, edits, task, length, limit, seed, batch, bootstrap, base, needles, units
            )

        what = f"{len(needles)} needle inputs; accuracy = greedy answer equals the needle's number"
    else:
        if ruler:
            exclude = [atlas_side.as_exclude()] if atlas_side.recorded else None
            task_obj = ruler_task(task, lm.tokenizer, lm.max_length, limit, exclude)
            if atlas_obj is not None:
                side = heldout.from_items(task_obj.items, f"task {task}")
                checks.append(heldout.check(atlas_side, side, allow_overlap))
        assert task_obj is not None
        started = time.perf_counter()
        keep = start_checkpoint(ranks, out, resume, lm, _item_rows(task_obj), specs, edit_objs, draws, dtype, options)

        def predictions() -> Predictions:
            with sharing(ranks):
                return predict(lm.model, lm.tokenizer, task_obj, (), batch_size, max_length)

        base_pred = keep.base(predictions, _predictions_json, _predictions_from)
        say(f"base: {len(task_obj)} items, {time.perf_counter() - started:.1f} s{keep.note('base')}")

        def score_one(edits: list) -> EvalResult:
            return evaluate(
                lm.model,
                lm.tokenizer,
                task_obj,
                edits,
                batch_size,
                max_length,
                bootstrap,
                seed,
                base=base_pred,
                units=units,
            )

        what = f"{len(task_obj)} items; acc = option with the highest summed log-probability"
    done = [0]
    conditions = 1 + len(draws)

    def score(edits: list) -> EvalResult:
        started = time.perf_counter()
        out = keep.condition(done[0], lambda: score_one(edits))
        done[0] += 1
        name = "edited" if done[0] == 1 else f"control {done[0] - 1}/{len(draws)}"
        say(
            f"condition {done[0]}/{conditions} ({name}): accuracy {out.acc.accuracy_edit:.3f}, "
            f"{time.perf_counter() - started:.1f} s{keep.note(done[0] - 1)}"
        )
        return out

    with sharing(ranks):
        result = score(edit_objs)
    summary: dict[str, Any] = {
        "model": lm.model_id,
        **result.summary(),
        "options": {"limit": limit, "seed": seed, "units": units, "control_heads": control_heads},
        "held_out": [c.as_dict() for c in checks] if atlas_obj is not None else "not checked: no --atlas",
    }
    if power_effect is not None:
        summary["power"] = power_summary(result, power_effect)
    controls = None
    items = result.items.copy()
    if draws:
        with sharing(ranks):
            controls = random_head_controls(result, draws, score, bootstrap, seed, control_heads)
        items = controls.items
        summary.update(controls.summary())
    lead = ranks is None or ranks.leader
    run = EvalRun(lm.model_id, result, needle, what, items, summary, controls, bool(specs), checks, lead)
    run.checkpoint = keep.folder
    return run


def power_summary(result: EvalResult, effect: float) -> dict[str, Any]:
    """Independent items needed to detect ``effect`` (80% power, alpha 0.05) at this run's base accuracy,
    with the discordance measured here (when it exceeds the effect; else stats' default correlation
    model). Items in clusters need that many times the design effect 1 + (m - 1) icc."""
    acc = result.acc
    base = min(max(acc.accuracy_base, 0.0), 1.0)
    discordance = (acc.gained + acc.lost) / acc.n
    kwargs: dict[str, Any] = {}
    if discordance > abs(effect):
        kwargs["discordance"] = discordance
    else:
        kwargs["accuracy"] = base if 0 <= base + effect <= 1 else base - effect
    need = stats.paired_sample_size(effect, **kwargs)
    text = need.format() + (
        "; items in clusters need this times the design effect 1 + (m - 1) icc" if acc.clusters else ""
    )
    return {"effect": effect, "independent_items": need.items, "discordance": need.discordance, "text": text}


@dataclass
class TuneRun:
    """What ``headmap tune`` reports: the tuning result, the split sizes and the summary."""

    model_id: str
    result: TuneResult
    dev_items: int
    test_items: int
    neutral: float
    summary: dict[str, Any]
    checks: list = field(default_factory=list)
    lead: bool = True  # False on ranks other than 0 of a data-parallel run: they write nothing
    checkpoint: Path | None = None  # the finished dev trials kept while it ran (removed once written)

    def write(self, out: Path) -> list[Path]:
        if not self.lead:
            return []
        written = write_results(out, self.result.test.items, self.summary, {"dev": self.result.dev})
        if self.checkpoint is not None and Path(out).resolve() == self.checkpoint.parent.resolve():
            remove_checkpoint(self.checkpoint, TUNE)
        return written


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
    units: str = "auto",
    allow_overlap: bool = False,
    device_map: str | dict[str, Any] | None = None,
    max_memory: str | dict[Any, Any] | None = None,
    offload_folder: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    resume: bool = False,
) -> TuneRun:
    """``headmap tune``: factors chosen on ``task_dev``, held-out accuracy on ``task_test``. The
    templates, the grid, the tasks, every edit at every factor and ``out`` are checked before the
    model loads. Dev and test (and the atlas's corpus, with ``atlas``) must read disjoint items,
    needles, haystacks and prose unless ``allow_overlap``; RULER-style tasks are generated so that
    they do (test avoids dev's needles and prose, both avoid the atlas's).

    ``device_map``, ``max_memory``, ``offload_folder``: as in :func:`run_eval`; so is data parallel under
    torchrun (each rank scores its share of every batch list, only rank 0 writes). ``progress`` receives
    one line per dev trial and one once the test split is scored (rank 0's only, under torchrun).

    With ``out``, every finished dev trial (the factors of every group -> dev accuracy and p(answer)) is
    kept in ``<out>/.headmap-tune/`` as soon as it is done (by rank 0 under torchrun), after a fingerprint
    of the run (model and weights, the dev and test items, the templates resolved at every factor, the
    options); ``resume=True`` (``--resume``) reads them back instead of scoring them again (rank 0 reads,
    every rank gets them) and refuses a different run naming the field, as :func:`run_eval` does; the
    choice and the test result equal an uninterrupted run's. :meth:`TuneRun.write` removes the folder
    once the results are written."""
    ranks = Ranks.start(device)
    try:
        return _run_tune(
            ranks, model, task_dev, task_test, templates, grid, neutral, atlas, out, limit, batch_size, max_length,
            bootstrap, seed, dtype, ranks.device(device) if ranks else device, units, allow_overlap,
            {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder},
            progress if progress is not None and (ranks is None or ranks.leader) else (lambda _msg: None), resume,
        )  # fmt: skip
    finally:
        if ranks is not None:
            ranks.close()


def _run_tune(
    ranks: Ranks | None,
    model: str | None,
    task_dev: str,
    task_test: str,
    templates: list[str] | None,
    grid: str,
    neutral: float,
    atlas: Path | None,
    out: Path | None,
    limit: int | None,
    batch_size: int,
    max_length: int | None,
    bootstrap: int,
    seed: int,
    dtype: str,
    device: str,
    units: str,
    allow_overlap: bool,
    placement: dict[str, Any],
    say: Callable[[str], None],
    resume: bool = False,
) -> TuneRun:
    if resume and out is None:
        raise OptionError("--resume needs --out, the folder that holds the stopped tune")
    templates = list(templates or [])
    if not templates:
        raise OptionError("tune needs at least one --edit-template, e.g. scale_first_token:heads=[[0,1]]:factor={f}")
    factors = parse_grid(grid)
    for t in templates:
        if "{f}" not in t:
            raise OptionError(f"--edit-template {t!r} has no {{f}} where the factor goes")
    if units not in UNITS:
        raise OptionError(f"--units must be one of {', '.join(UNITS)} (got {units!r})")
    check_counts(batch_size, bootstrap, limit)
    check_out(out)
    check_checkpoint(out, resume, TUNE)
    for spec in (task_dev, task_test):
        if is_ruler(spec):
            parse_ruler_spec(spec)
    dev = None if is_ruler(task_dev) else load_task(task_dev, limit=limit)
    test = None if is_ruler(task_test) else load_task(task_test, limit=limit)
    if test is not None:
        test.clusters(units)
    from ..edits import load_atlas

    atlas_obj = load_atlas(atlas) if atlas is not None else None
    atlas_side = heldout.from_description((getattr(atlas_obj, "meta", None) or {}).get("corpus"))

    def checks_of(dev: Task, test: Task) -> list[heldout.Check]:
        sides = [heldout.from_items(dev.items, f"dev {task_dev}"), heldout.from_items(test.items, f"test {task_test}")]
        if atlas_obj is not None:
            sides.insert(0, atlas_side)
        return heldout.check_all(sides, allow_overlap)

    if dev is not None and test is not None:
        if dev.path and Path(dev.path).resolve() == Path(test.path).resolve():
            raise OptionError("the dev and test tasks are the same file; tune on a dev split and report on another")
        checks = checks_of(dev, test)  # before the model loads
    every = []  # every template must make valid edits at every factor, before the model loads
    for t in templates:
        for f in sorted({*factors, float(neutral)}):
            every += build_edits([t.replace("{f}", repr(float(f)))], atlas_obj)
    lm = load_model(model, dtype=dtype, device=device, **placement)
    prepare_edits(every, lm.tokenizer, lm.model)  # heads resolved (the fingerprint's); ones the model lacks fail
    exclude = [atlas_side.as_exclude()] if atlas_side.recorded else []
    if dev is None:
        dev = ruler_task(task_dev, lm.tokenizer, lm.max_length, limit, exclude or None)
    if test is None:
        test = ruler_task(task_test, lm.tokenizer, lm.max_length, limit, [*exclude, *_item_dicts(dev)])
    checks = checks_of(dev, test)
    options = {
        "limit": limit, "batch_size": batch_size, "max_length": max_length, "bootstrap": bootstrap, "seed": seed,
        "units": units, "grid": grid, "neutral": neutral, "templates": templates, "tasks": [task_dev, task_test],
    }  # fmt: skip
    inputs = [_item_rows(dev), _item_rows(test)]
    keep = start_checkpoint(ranks, out, resume, lm, inputs, [], every, [], dtype, options, TUNE)
    with sharing(ranks):
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
            units=units,
            progress=say,
            known=keep.stored,
            on_trial=keep.trial,
        )
    summary = {"model": lm.model_id, **result.summary(), "held_out": [c.as_dict() for c in checks]}
    lead = ranks is None or ranks.leader
    return TuneRun(lm.model_id, result, len(dev), len(test), neutral, summary, checks, lead, keep.folder)


def _item_dicts(task: Task) -> list[dict[str, Any]]:
    """The needles, haystacks and paragraphs of ``task``'s items, as ruler.generate's ``exclude`` reads them."""
    return [
        {**it.info, "needles": it.info.get("needles") or [], "haystack": it.info.get("haystack")} for it in task.items
    ]


# -- data parallel ----------------------------------------------------------------------------------


def _item_rows(task: Task) -> list[list[Any]]:
    """What decides an item's scores: its id, context, options, answer and cluster."""
    return [[it.id, it.context, list(it.options), it.answer, it.cluster] for it in task.items]


def fingerprint(
    lm: Any, inputs: Any, specs: list[str], edits: list, draws: list, dtype: str, options: dict[str, Any]
) -> dict[str, Any]:
    """What every rank of a data-parallel eval or tune must share, field by field: the model (its config and
    a checksum of its weights' shapes), the inputs (a SHA-256 of every item), the edits as given and as
    resolved, the random-head controls drawn, the dtype, the options and the software versions."""
    import hashlib
    import importlib.metadata

    import torch

    def sha(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()

    shapes = [[name, list(p.shape), str(p.dtype)] for name, p in lm.model.named_parameters()]
    software = {"torch": torch.__version__}
    for name in ("transformers", "headmap"):
        try:
            software[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            software[name] = None
    return {
        "model": f"{lm.model_id} (config {sha(lm.model.config.to_dict())[:12]}, weights {sha(shapes)[:12]})",
        "inputs": f"{len(inputs)} inputs, sha256 {sha(inputs)[:16]}",
        "edits": list(specs),
        "resolved edits": [e.describe() for e in edits],
        "random-head controls": [[d.draw, [e.describe() for e in d.edits]] for d in draws],
        "dtype": dtype,
        **{f"--{k.replace('_', '-')}": v for k, v in options.items()},
        "software": software,
    }


# -- resuming a stopped eval or tune ------------------------------------------------------------------------

FINGERPRINT = "fingerprint.json"


@dataclass(frozen=True)
class CheckpointKind:
    """What a run keeps in its --out folder while it runs: the folder's name, its files besides the
    fingerprint (name prefixes), the files that count as finished units, and the words its messages use."""

    folder: str  # inside --out
    run: str  # the verb, as the ranks' agreement names it
    noun: str  # the run, as messages name it: "a stopped evaluation", "cannot resume the evaluation"
    unit: str  # one finished unit, singular
    files: tuple[str, ...]  # name prefixes of the files it writes (temporaries too, after their dot)
    counted: tuple[str, ...]  # globs of the files that are one finished unit each
    read: Callable[[Path], dict[Any, Any]]  # the finished units of a folder, as Keeper.stored holds them


def _read_checkpoint(folder: Path) -> dict[Any, Any]:
    """The conditions kept in ``folder``: "base" (as written) and condition numbers (EvalResults)."""
    stored: dict[Any, Any] = {}
    try:
        if (folder / "base.json").is_file():
            stored["base"] = json.loads((folder / "base.json").read_text(encoding="utf-8"))
        for path in sorted(folder.glob("condition-*.json")):
            k = int(path.stem.removeprefix("condition-"))
            d = json.loads(path.read_text(encoding="utf-8"))
            items = pd.read_parquet(path.with_suffix(".parquet"))
            stored[k] = EvalResult(
                d["task"], d["kind"], _comparison(d["acc"]), items, _comparison(d["acc_norm"]), d["edits"], d["extra"]
            )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OutputError(f"the checkpoint in {folder} is damaged ({exc}); remove {folder} to start over") from None
    return stored


def _read_trials(folder: Path) -> dict[Any, Any]:
    """The dev trials kept in ``folder``: factors (a tuple, one per group) -> (dev accuracy, p(answer))."""
    stored: dict[Any, Any] = {}
    try:
        for path in sorted(folder.glob("trial-*.json")):
            d = json.loads(path.read_text(encoding="utf-8"))
            stored[tuple(float(f) for f in d["factors"])] = (float(d["dev_accuracy"]), float(d["dev_p_answer"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OutputError(f"the checkpoint in {folder} is damaged ({exc}); remove {folder} to start over") from None
    return stored


#: eval keeps the unedited predictions (base.json) and each finished condition (condition-NNNN.json/.parquet).
EVAL = CheckpointKind(
    ".headmap-eval", "eval", "evaluation", "condition", ("condition-", "base.json"), ("condition-*.json", "base.json"),
    _read_checkpoint,
)  # fmt: skip
#: tune keeps each finished dev trial (trial-NNNN.json: the factors, dev accuracy and p(answer)).
TUNE = CheckpointKind(".headmap-tune", "tune", "tune", "dev trial", ("trial-",), ("trial-*.json",), _read_trials)
#: The finished conditions of an eval in progress, inside its --out folder.
CHECKPOINT = EVAL.folder
#: The finished dev trials of a tune in progress, inside its --out folder.
TUNE_CHECKPOINT = TUNE.folder


def check_checkpoint(out: Path | None, resume: bool, kind: CheckpointKind = EVAL) -> None:
    """Refuse an --out holding a stopped eval (or ``kind``'s run) unless ``resume`` (before the model loads)."""
    if out is None or resume:
        return
    folder = Path(out) / kind.folder
    if (folder / FINGERPRINT).is_file():
        done = sum(len(list(folder.glob(pattern))) for pattern in kind.counted)
        raise OutputError(
            f"--out {out} holds a stopped {kind.noun} ({kind.folder}, {done} {kind.unit}(s) done); pass --resume to "
            f"continue it, or choose another folder (or remove {folder} to start over)"
        )


def remove_checkpoint(folder: Path, kind: CheckpointKind = EVAL) -> None:
    """Delete the files the run wrote into its checkpoint folder (temporaries too), then the folder if empty."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for path in folder.iterdir():
        name = path.name.lstrip(".")
        ours = name.startswith((*kind.files, FINGERPRINT))
        if ours and path.is_file() and not path.is_symlink():
            path.unlink()
    try:
        folder.rmdir()
    except OSError:
        pass  # it holds files the run did not write: leave them


def _predictions_json(p: Predictions) -> dict[str, Any]:
    return {"pred": p.pred.tolist(), "pred_norm": p.pred_norm.tolist(), "logprobs": p.logprobs,
            "p_answer": p.p_answer.tolist()}  # fmt: skip


def _predictions_from(d: dict[str, Any]) -> Predictions:
    return Predictions(
        np.array(d["pred"], dtype=np.int64),
        np.array(d["pred_norm"], dtype=np.int64),
        [[float(x) for x in lp] for lp in d["logprobs"]],
        np.array(d["p_answer"], dtype=np.float64),
    )


def _comparison(d: dict[str, Any] | None) -> Comparison | None:
    if d is None:
        return None
    pairs = ("ci_base", "ci_edit", "ci_difference")
    return Comparison(**{k: tuple(v) if k in pairs else v for k, v in d.items()})


def _plain(value: Any) -> Any:
    """numpy scalars as Python numbers, for JSON."""
    return value.item() if isinstance(value, np.generic) else str(value)


@dataclass
class Keeper:
    """The finished conditions of this eval (or dev trials of this tune, ``kind``): read back on --resume
    (rank 0's, handed to every rank), and written by rank 0 as each is done (``folder`` None: no --out,
    nothing kept)."""

    folder: Path | None
    lead: bool
    stored: dict[Any, Any] = field(default_factory=dict)  # eval: "base" and condition numbers; tune: factors
    resumed: list[str] = field(default_factory=list)
    kind: CheckpointKind = EVAL

    def note(self, key: Any) -> str:
        return ", from the checkpoint" if str(key) in self.resumed else ""

    def _write(self, name: str, write: Callable[[Path], Any]) -> None:
        if self.folder is None or not self.lead:
            return
        try:
            write(self.folder / name)
        except OSError as exc:
            from ..rundir import os_error_text

            raise OutputError(
                f"{os_error_text(exc, f'writing the checkpoint into {self.folder}')}; the {self.kind.unit}s written "
                "so far are kept: fix that and run again with --resume"
            ) from None

    def base(self, compute: Callable[[], Any], dump: Callable[[Any], Any], load: Callable[[Any], Any]) -> Any:
        if "base" in self.stored:
            self.resumed.append("base")
            return load(self.stored["base"])
        value = compute()
        self._write("base.json", lambda path: write_text(path, json.dumps(dump(value), default=_plain) + "\n"))
        return value

    def condition(self, k: int, compute: Callable[[], EvalResult]) -> EvalResult:
        if k in self.stored:
            self.resumed.append(str(k))
            return self.stored[k]
        result = compute()
        record = {
            "task": result.task, "kind": result.kind, "acc": dataclasses.asdict(result.acc),
            "acc_norm": dataclasses.asdict(result.acc_norm) if result.acc_norm is not None else None,
            "edits": result.edits, "extra": result.extra,
        }  # fmt: skip
        name = f"condition-{k:04d}"
        self._write(f"{name}.parquet", lambda path: write_file(path, lambda fh: result.items.to_parquet(fh)))
        self._write(f"{name}.json", lambda path: write_text(path, json.dumps(record, default=_plain) + "\n"))
        return result

    def trial(self, factors: tuple[float, ...], score: tuple[float, float]) -> None:
        """Keep one finished dev trial of tune (floats through JSON's repr: read back exactly); its file is
        numbered after the trials kept before it, read back ones included."""
        self.stored[tuple(factors)] = score
        record = {"factors": list(factors), "dev_accuracy": score[0], "dev_p_answer": score[1]}
        name = f"trial-{len(self.stored) - 1:04d}.json"
        self._write(name, lambda path: write_text(path, json.dumps(record) + "\n"))


def start_checkpoint(
    ranks: Ranks | None,
    out: Path | None,
    resume: bool,
    lm: Any,
    inputs: Any,
    specs: list[str],
    edits: list,
    draws: list,
    dtype: str,
    options: dict[str, Any],
    kind: CheckpointKind = EVAL,
) -> Keeper:
    """Check that the ranks run the same eval (or ``kind``'s run, tune) under torchrun, then set up the
    checkpoint of finished conditions (tune: dev trials): on ``resume``, compare the stored fingerprint (one
    line naming every field that differs) and read them back; else start an empty one. Before any scoring."""
    fp = fingerprint(lm, inputs, specs, edits, draws, dtype, options)
    if ranks is not None:
        ranks.agree_on({**fp, "--out": str(Path(out).resolve()) if out else None, "--resume": resume}, kind.run)
    lead = ranks is None or ranks.leader
    if out is None:
        return Keeper(None, lead, kind=kind)
    from ..models import weights_signature

    fp = {**fp, "weights": weights_signature(lm.model)[:16]}  # the values too, not only the shapes
    folder = Path(out) / kind.folder

    def begin() -> dict[str, Any]:
        if not lead:
            return {}
        stored: dict[str, Any] = {}
        if resume and (folder / FINGERPRINT).is_file():
            try:
                old = json.loads((folder / FINGERPRINT).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise OutputError(f"{folder / FINGERPRINT} is damaged ({exc}); remove {folder} to start over") from None
            new = json.loads(json.dumps(fp, default=str))
            diffs = [
                f"{key} differs (the checkpoint has {_brief(old.get(key))}, this run {_brief(new[key])})"
                for key in new
                if old.get(key) != new[key]
            ]
            if diffs:
                raise OutputError(
                    f"cannot resume the {kind.noun} in {out}: {'; '.join(diffs)}; its finished {kind.unit}s are "
                    f"kept: rerun the command that started it with --resume, or remove {folder} to start over"
                )
            stored = kind.read(folder)
        else:
            try:
                remove_checkpoint(folder, kind)
                folder.mkdir(parents=True, exist_ok=True)
                write_text(folder / FINGERPRINT, json.dumps(fp, indent=2, default=str) + "\n")
            except OSError as exc:
                from ..rundir import os_error_text

                raise OutputError(os_error_text(exc, f"writing the checkpoint into {folder}")) from None
        return stored

    stored = begin() if ranks is None else ranks.together(begin)
    if ranks is not None:
        stored = ranks.gather(stored if lead else None)[0]  # rank 0's view, on every rank
    return Keeper(folder, lead, stored, kind=kind)


def _brief(value: Any, limit: int = 100) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
