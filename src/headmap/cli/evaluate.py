"""``headmap eval`` and ``headmap tune``: accuracy with and without edits, paired, with bootstrap intervals."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .app import app, console

EDIT_HELP = (
    "an edit as NAME:key=value:key=value (repeat --edit for several), e.g. ablate:heads=[[18,6]]:mode=zero or "
    'scale_first_token:heads="top 10% sink":factor=0.5 (heads rules need --atlas); see docs/steering.md'
)
TASK_HELP = (
    "JSONL file (one item a line: context, options, answer index, optional id), a built-in task (mc_dev, "
    "mc_test), or a needle corpus spec (needle, needle:lengths=256,512:depths=0,0.5,1) for retrieval accuracy"
)


def _is_needle(task: str) -> bool:
    return task == "needle" or task.startswith("needle:")


def _fmt_ci(ci: tuple[float, float] | list[float]) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def _fmt_diff(value: float) -> str:
    return f"{value:+.3f}"


def _write(out: Path, items: Any, summary: dict[str, Any], extra: dict[str, Any] | None = None) -> list[Path]:
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


def _table(title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("condition", "accuracy", "95% CI", "vs base", "95% CI", "gained", "lost"):
        table.add_column(col, justify="left" if col == "condition" else "right")
    return table


def _rows(table: Table, label: str, comparison: Any, with_base: bool) -> None:
    c = comparison
    if with_base:
        table.add_row("base", f"{c.accuracy_base:.3f}", _fmt_ci(c.ci_base), "", "", "", "")
    table.add_row(
        label,
        f"{c.accuracy_edit:.3f}",
        _fmt_ci(c.ci_edit),
        _fmt_diff(c.difference),
        _fmt_ci(c.ci_difference),
        str(c.gained),
        str(c.lost),
    )


@app.command(name="eval")
def eval_command(
    model: Annotated[
        str | None, typer.Argument(help="hub id, local folder, .gguf file, or built-in name: smollm2 (default)")
    ] = None,
    task: Annotated[str, typer.Option(help=TASK_HELP)] = "mc_test",
    edit: Annotated[list[str] | None, typer.Option("--edit", help=EDIT_HELP)] = None,
    atlas: Annotated[
        Path | None, typer.Option(help='run folder of headmap scan, for heads rules such as "top 5 retrieval"')
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="folder for items.csv, items.parquet (per item) and summary.json")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="use the first N items (needle: N inputs)")] = None,
    random_heads: Annotated[
        int,
        typer.Option(
            help="also run N controls (random 0..N-1): each edit on as many heads drawn at random (seeded) from "
            "the heads no edit names"
        ),
    ] = 0,
    batch_size: Annotated[int, typer.Option(help="sequences per forward pass")] = 8,
    max_length: Annotated[
        int | None, typer.Option(help="tokens per input (needle: context length, default 512; else the model's)")
    ] = None,
    bootstrap: Annotated[int, typer.Option(help="bootstrap resamples of the items for the 95% intervals")] = 2000,
    seed: Annotated[int, typer.Option(help="seed of the bootstrap and of the needle corpus")] = 0,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto")] = "float32",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, mps or auto")] = "cpu",
) -> None:
    """Accuracy on TASK without and with the --edit edits: each, their paired difference and 95% intervals.

    Multiple-choice items are scored by the summed log-probability of each option given the context (acc;
    acc_norm divides by the option's length in bytes). A needle spec scores retrieval: the greedy answer must
    reproduce the needle's number. Both runs use the headmap engine, so the edits are the only difference.
    """
    from ..corpus import parse_spec
    from ..errors import OptionError
    from ..evaluation import (
        DEFAULT_BATCH_SIZE,
        build_edits,
        compare,
        describe_edits,
        evaluate,
        greedy_answers,
        load_needles,
        load_task,
        needle_accuracy,
        predict,
        random_like,
    )
    from ..models import load_model

    specs = list(edit or [])
    if random_heads < 0:
        raise OptionError(f"--random-heads must be 0 or more (got {random_heads})")
    if random_heads and not specs:
        raise OptionError("--random-heads draws controls for the --edit edits; give at least one --edit")
    if limit is not None and limit < 1:
        raise OptionError(f"--limit must be at least 1 (got {limit})")
    needle = _is_needle(task)
    if needle:
        parse_spec(task)  # bad needle options fail here, before the model loads
        task_obj = None
    else:
        task_obj = load_task(task, limit=limit)  # a malformed line fails here
    from ..edits import load_atlas

    atlas_obj = load_atlas(atlas) if atlas is not None else None
    edits = build_edits(specs, atlas_obj)  # unknown names and bad values fail here
    lm = load_model(model, dtype=dtype, device=device)
    if specs:
        from ..steer import prepare

        prepare(edits, lm.tokenizer)
        for e in edits:  # heads the model does not have fail here, before any scoring
            e.bind(lm.model)
    batch = batch_size or DEFAULT_BATCH_SIZE
    controls: list[tuple[int, list]] = [(s, random_like(edits, lm.model, s)) for s in range(random_heads)]
    if needle:
        length = max_length or 512
        needles = load_needles(lm.tokenizer, task, length, limit, seed)
        base = greedy_answers(lm.model, needles.samples, _pad(lm.tokenizer), (), max(1, min(batch, 4)))
        result = needle_accuracy(
            lm.model, lm.tokenizer, edits, task, length, limit, seed, max(1, min(batch, 4)), bootstrap, base, needles
        )
        control_results = [
            needle_accuracy(
                lm.model, lm.tokenizer, ce, task, length, limit, seed, max(1, min(batch, 4)), bootstrap, base, needles
            )
            for _, ce in controls
        ]
        what = f"{len(needles)} needle inputs; accuracy = greedy answer equals the needle's number"
    else:
        base_pred = predict(lm.model, lm.tokenizer, task_obj, (), batch, max_length)
        result = evaluate(lm.model, lm.tokenizer, task_obj, edits, batch, max_length, bootstrap, seed, base=base_pred)
        control_results = [
            evaluate(lm.model, lm.tokenizer, task_obj, ce, batch, max_length, bootstrap, seed, base=base_pred)
            for _, ce in controls
        ]
        what = f"{len(task_obj)} items; acc = option with the highest summed log-probability"
    console.print(f"[bold]{lm.model_id}[/] on {result.task}: {what}", highlight=False)
    for line in result.edits:
        console.print(f"edit: {line}", highlight=False, markup=False)
    table = _table("acc" if not needle else "retrieval accuracy")
    _rows(table, "edited" if specs else "(no edits)", result.acc, True)
    items = result.items.copy()
    summary: dict[str, Any] = {"model": lm.model_id, **result.summary(), "options": {"limit": limit, "seed": seed}}
    if controls:
        diffs = []
        for (s, _ce), cr in zip(controls, control_results, strict=True):
            _rows(table, f"random {s}", cr.acc, False)
            items[f"pred_random{s}"] = cr.items["pred_edit"]
            items[f"correct_random{s}"] = cr.items["correct_edit"]
            diffs.append(cr.acc.difference)
        # the edit against the random controls, item by item: edited correct vs mean control correct
        rand = items[[f"correct_random{s}" for s, _ in controls]].to_numpy(dtype=float).mean(axis=1)
        versus = compare(rand, items["correct_edit"].to_numpy(dtype=float), bootstrap, seed)
        summary["random_controls"] = [
            {**cr.acc.as_dict(), "draw": s, "heads": [list(h) for e in ce for h in (getattr(e, "heads", None) or [])]}
            for (s, ce), cr in zip(controls, control_results, strict=True)
        ]
        summary["edit_vs_random"] = versus.as_dict()
        console.print(table)
        console.print(
            f"random-head controls: mean accuracy {versus.accuracy_base:.3f} (difference vs base "
            f"{_fmt_diff(sum(diffs) / len(diffs))}); edited minus random: {_fmt_diff(versus.difference)} "
            f"{_fmt_ci(versus.ci_difference)}",
            highlight=False,
        )
        for s, ce in controls:
            console.print(f"  random {s}: {'; '.join(describe_edits(ce))}", highlight=False, markup=False)
    else:
        console.print(table)
    if result.acc_norm is not None:
        n = result.acc_norm
        console.print(
            f"acc_norm (per byte): base {n.accuracy_base:.3f}, edited {n.accuracy_edit:.3f}, difference "
            f"{_fmt_diff(n.difference)} {_fmt_ci(n.ci_difference)}",
            highlight=False,
        )
    console.print(
        f"95% intervals: percentile bootstrap over items, {bootstrap} resamples, seed {seed}", highlight=False
    )
    if out is not None:
        written = _write(out, items, summary)
        console.print(f"wrote {out}/: " + ", ".join(p.name for p in written), highlight=False)


def _pad(tokenizer: Any) -> int:
    from ..evaluation import _pad_id

    return _pad_id(tokenizer)


@app.command(name="tune")
def tune_command(
    model: Annotated[
        str | None, typer.Argument(help="hub id, local folder, .gguf file, or built-in name: smollm2 (default)")
    ] = None,
    task_dev: Annotated[str, typer.Option(help="the split the factors are chosen on (JSONL or mc_dev)")] = "mc_dev",
    task_test: Annotated[
        str, typer.Option(help="the held-out split the chosen edits are scored on (JSONL or mc_test)")
    ] = "mc_test",
    edit_template: Annotated[
        list[str] | None,
        typer.Option(
            "--edit-template",
            help='an edit spec with {f} where the factor goes, e.g. scale_first_token:heads="top 10% sink":factor={f}; '
            "repeat for several head groups (tuned one after another)",
        ),
    ] = None,
    grid: Annotated[str, typer.Option(help="comma-separated factors to try")] = "0.5,0.75,1,1.25,1.5",
    neutral: Annotated[float, typer.Option(help="the factor that leaves the model unchanged")] = 1.0,
    atlas: Annotated[Path | None, typer.Option(help="run folder of headmap scan, for heads rules")] = None,
    out: Annotated[Path | None, typer.Option(help="folder for dev.csv, items.csv (test) and summary.json")] = None,
    limit: Annotated[int | None, typer.Option(help="use the first N items of each split")] = None,
    batch_size: Annotated[int, typer.Option(help="sequences per forward pass")] = 8,
    max_length: Annotated[int | None, typer.Option(help="tokens per input (default: the model's limit)")] = None,
    bootstrap: Annotated[int, typer.Option(help="bootstrap resamples of the test items")] = 2000,
    seed: Annotated[int, typer.Option(help="seed of the bootstrap")] = 0,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto")] = "float32",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, mps or auto")] = "cpu",
) -> None:
    """Choose edit factors on the dev split only, then report held-out test accuracy against the unedited model.

    Each --edit-template is one head group; every factor of --grid is tried on dev for one group at a time
    (earlier groups at their chosen factors, later ones at --neutral). The best factor on dev (accuracy, ties:
    mean probability of the right option) is kept only when it raises dev accuracy over the neutral setting.
    The test split is read once the factors are chosen.
    """
    import math

    from ..errors import OptionError
    from ..evaluation import build_edits, load_task, tune

    templates = list(edit_template or [])
    if not templates:
        raise OptionError("tune needs at least one --edit-template, e.g. scale_first_token:heads=[[0,1]]:factor={f}")
    try:
        factors = [float(x) for x in grid.split(",") if x.strip()]
    except ValueError:
        raise OptionError(f"--grid must be comma-separated numbers (got {grid!r})") from None
    if not factors or not all(math.isfinite(f) for f in factors):
        raise OptionError(f"--grid needs at least one finite factor (got {grid!r})")
    for t in templates:
        if "{f}" not in t:
            raise OptionError(f"--edit-template {t!r} has no {{f}} where the factor goes")
    dev = load_task(task_dev, limit=limit)
    test = load_task(task_test, limit=limit)
    from ..edits import load_atlas

    atlas_obj = load_atlas(atlas) if atlas is not None else None
    for t in templates:  # every template must make valid edits at every factor, before the model loads
        for f in {*factors, neutral}:
            build_edits([t.replace("{f}", repr(float(f)))], atlas_obj)
    from ..models import load_model

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
    console.print(
        f"[bold]{lm.model_id}[/]: tuned on {result.dev_task} ({len(dev)} items), reported on "
        f"{result.test_task} ({len(test)} items)",
        highlight=False,
    )
    dev_table = Table(title="dev split", title_justify="left")
    for col in ("group", "factor", "dev accuracy", "dev p(answer)"):
        dev_table.add_column(col, justify="right")
    for r in result.dev.itertuples():
        mark = " *" if r.factor == result.chosen[r.group] else ""
        dev_table.add_row(str(r.group), f"{r.factor:g}{mark}", f"{r.dev_accuracy:.3f}", f"{r.dev_p_answer:.4f}")
    console.print(dev_table)
    for g, spec in enumerate(result.specs):
        console.print(f"chosen for group {g}: {spec}", highlight=False, markup=False)
    table = _table(f"held-out test: {result.test_task}")
    _rows(table, "tuned edits", result.test.acc, True)
    console.print(table)
    n = result.test.acc_norm
    if n is not None:
        console.print(
            f"acc_norm (per byte): base {n.accuracy_base:.3f}, edited {n.accuracy_edit:.3f}, difference "
            f"{_fmt_diff(n.difference)} {_fmt_ci(n.ci_difference)}",
            highlight=False,
        )
    if all(f == neutral for f in result.chosen):
        console.print("no factor beat the neutral setting on dev: the tuned edits leave the model unchanged")
    if out is not None:
        summary = {"model": lm.model_id, **result.summary()}
        written = _write(out, result.test.items, summary, {"dev": result.dev})
        console.print(f"wrote {out}/: " + ", ".join(p.name for p in written), highlight=False)
