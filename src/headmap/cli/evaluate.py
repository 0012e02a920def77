"""``headmap eval`` and ``headmap tune``: accuracy with and without edits, paired; every interval from
``headmap.stats``, printed with the number of independent units it stands on."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .app import app, console, err
from .options import DeviceMap, MaxMemory, OffloadFolder, placement

EDIT_HELP = (
    "an edit as NAME:key=value:key=value (repeat --edit for several), e.g. ablate:heads=[[18,6]]:mode=zero or "
    'scale_first_token:heads="top 10% sink":factor=0.5 (heads rules need --atlas); see docs/steering.md'
)
TASK_HELP = (
    "JSONL file (one item a line: context, options, answer index, optional id and cluster), a built-in task "
    "(mc_dev, mc_test), a RULER-style task with options (niah_single, niah_multikey, niah_multivalue, "
    "niah_multiquery, variable_tracking, common_words, qa; e.g. niah_single:lengths=512,1024:n=200:seed=1, "
    "echo=true to end the question with the needle's words; generated offline), or a needle corpus spec "
    "(needle, needle:lengths=256,512:depths=0,0.5,1:echo=true) for greedy retrieval accuracy"
)
UNITS_HELP = (
    "independent units of the statistics: auto (the items' clusters when they carry them, else the items), "
    "clusters (required on every item, field 'cluster') or items"
)
OVERLAP_HELP = (
    "evaluate even when the task shares needles, haystacks, prose or items with the atlas's corpus (or dev with "
    "test); the overlap is recorded in summary.json"
)


def _fmt_ci(ci: tuple[float, float] | list[float]) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def _fmt_diff(value: float) -> str:
    return f"{value:+.3f}"


def _table(title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("condition", "accuracy", "95% CI", "vs base", "95% CI", "p", "gained", "lost", "units"):
        table.add_column(col, justify="left" if col == "condition" else "right")
    return table


def _rows(table: Table, label: str, comparison: Any, with_base: bool) -> None:
    c = comparison
    if with_base:
        table.add_row("base", f"{c.accuracy_base:.3f}", _fmt_ci(c.ci_base), "", "", "", "", "", c.units_text())
    table.add_row(
        label,
        f"{c.accuracy_edit:.3f}",
        _fmt_ci(c.ci_edit),
        _fmt_diff(c.difference),
        _fmt_ci(c.ci_difference),
        f"{c.p_value:.3g}",
        str(c.gained),
        str(c.lost),
        c.units_text(),
    )


def _methods(c: Any) -> None:
    console.print(
        f"95% intervals on {c.units_text()} ({c.units} independent units): {c.ci_method}; p: {c.test}",
        highlight=False,
        markup=False,
    )


def _checks(checks: list, atlas: Any) -> None:
    if atlas is None:
        console.print("held-out check: not made (no --atlas)", highlight=False)
    for c in checks:
        allowed = " (allowed by --allow-overlap)" if c.allowed and not c.disjoint and c.compared else ""
        console.print(f"held-out check, {c.between[0]} vs {c.between[1]}: {c.describe()}{allowed}", highlight=False)


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
        int | None,
        typer.Option(
            help="run N controls (random 0..N-1): each edit on as many heads drawn at random (seeded) from the heads "
            "no edit names; default 20 when the edits name heads, else 0"
        ),
    ] = None,
    control_heads: Annotated[
        str,
        typer.Option(
            help="where controls draw heads: layer (as many in each layer as the edit names there) or uniform"
        ),
    ] = "layer",
    units: Annotated[str, typer.Option(help=UNITS_HELP)] = "auto",
    allow_overlap: Annotated[bool, typer.Option("--allow-overlap", help=OVERLAP_HELP)] = False,
    power_effect: Annotated[
        float | None,
        typer.Option(
            help="also print how many items a paired comparison needs to detect this difference in accuracy "
            "(e.g. 0.02) with 80% power, at the base accuracy and discordance measured here"
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="sequences per forward pass")] = 8,
    max_length: Annotated[
        int | None, typer.Option(help="tokens per input (needle: context length, default 512; else the model's)")
    ] = None,
    bootstrap: Annotated[
        int, typer.Option(help="resamples of the cluster bootstrap (items in clusters; at least 100)")
    ] = 2000,
    seed: Annotated[int, typer.Option(help="seed of the bootstrap and of the needle corpus")] = 0,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto")] = "float32",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, mps or auto")] = "cpu",
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="go on from a stopped eval in --out: the conditions it finished (base, edited, each control) are "
            "read back, the others scored (the same command otherwise; a difference is refused, naming it)"
        ),
    ] = False,
) -> None:
    """Accuracy on TASK without and with the --edit edits: each, their paired difference and 95% intervals.

    Multiple-choice items are scored by the summed log-probability of each option given the context (acc;
    acc_norm divides by the option's length in bytes). A needle spec scores retrieval: the greedy answer must
    reproduce the needle's number. Both runs use the headmap engine, so the edits are the only difference.
    Independent items: exact binomial intervals and the exact McNemar test; items in clusters (a shared needle
    or haystack): a cluster bootstrap and a sign test over clusters. Controls are ranked against the edit.

    With --out, each finished condition is kept in --out as it is done, so a stopped eval (one process or any
    rank of ``torchrun --nproc-per-node N -m headmap eval ...``) goes on with --resume.
    """
    from ..evaluation import run_eval

    run = run_eval(
        model,
        task,
        edit,
        atlas=atlas,
        out=out,
        limit=limit,
        random_heads=random_heads,
        batch_size=batch_size,
        max_length=max_length,
        bootstrap=bootstrap,
        seed=seed,
        dtype=dtype,
        device=device,
        units=units,
        control_heads=control_heads,
        allow_overlap=allow_overlap,
        power_effect=power_effect,
        progress=lambda line: err.print(line, highlight=False, markup=False),
        resume=resume,
        **placement(device_map, max_memory, offload_folder),
    )
    if not run.lead:  # a data-parallel eval (torchrun): rank 0 prints and writes
        return
    result = run.result
    console.print(f"[bold]{run.model_id}[/] on {result.task}: {run.what}", highlight=False)
    for line in result.edits:
        console.print(f"edit: {line}", highlight=False, markup=False)
    table = _table("acc" if not run.needle else "retrieval accuracy")
    _rows(table, "edited" if run.edited else "(no edits)", result.acc, True)
    controls = run.controls
    if controls is not None:
        for d in controls.draws:
            _rows(table, f"random {d.draw}", d.result.acc, False)
        console.print(table)
        versus = controls.versus
        console.print(controls.rank_text(), highlight=False, markup=False)
        console.print(
            f"random-head controls: mean accuracy {versus.accuracy_base:.3f} (difference vs base "
            f"{_fmt_diff(controls.mean_difference)}); edited minus random: {_fmt_diff(versus.difference)} "
            f"{_fmt_ci(versus.ci_difference)} ({versus.units_text()})",
            highlight=False,
        )
        for draw, line in controls.describe():
            console.print(f"  random {draw}: {line}", highlight=False, markup=False)
    else:
        console.print(table)
    _acc_norm(result.acc_norm)
    _methods(result.acc)
    _checks(run.checks, atlas)
    if "power" in run.summary:
        console.print(f"power: {run.summary['power']['text']}", highlight=False, markup=False)
    if out is not None:
        written = run.write(out)
        console.print(f"wrote {out}/: " + ", ".join(p.name for p in written), highlight=False)


def _acc_norm(n: Any) -> None:
    if n is not None:
        console.print(
            f"acc_norm (per byte): base {n.accuracy_base:.3f}, edited {n.accuracy_edit:.3f}, difference "
            f"{_fmt_diff(n.difference)} {_fmt_ci(n.ci_difference)} ({n.units_text()})",
            highlight=False,
        )


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
    bootstrap: Annotated[
        int, typer.Option(help="resamples of the cluster bootstrap (test items in clusters; at least 100)")
    ] = 2000,
    seed: Annotated[int, typer.Option(help="seed of the bootstrap")] = 0,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto")] = "float32",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, mps or auto")] = "cpu",
    units: Annotated[str, typer.Option(help=UNITS_HELP)] = "auto",
    allow_overlap: Annotated[bool, typer.Option("--allow-overlap", help=OVERLAP_HELP)] = False,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="go on from a stopped tune in --out: the dev trials it finished are read back, the others scored "
            "(the same command otherwise; a difference is refused, naming it)"
        ),
    ] = False,
) -> None:
    """Choose edit factors on the dev split only, then report held-out test accuracy against the unedited model.

    Each --edit-template is one head group; every factor of --grid is tried on dev for one group at a time
    (earlier groups at their chosen factors, later ones at --neutral). The best factor on dev (accuracy, ties:
    mean probability of the right option) is kept only when it raises dev accuracy over the neutral setting.
    The test split is read once the factors are chosen.

    Each dev trial prints one line as it is done. With --out, each finished dev trial is kept in --out as it
    is done, so a stopped tune (one process or any rank of torchrun) goes on with --resume.
    """
    from ..evaluation import run_tune

    run = run_tune(
        model,
        task_dev,
        task_test,
        edit_template,
        grid,
        neutral=neutral,
        atlas=atlas,
        out=out,
        limit=limit,
        batch_size=batch_size,
        max_length=max_length,
        bootstrap=bootstrap,
        seed=seed,
        dtype=dtype,
        device=device,
        units=units,
        allow_overlap=allow_overlap,
        progress=lambda line: err.print(line, highlight=False, markup=False),
        resume=resume,
        **placement(device_map, max_memory, offload_folder),
    )
    if not run.lead:  # a data-parallel tune (torchrun): rank 0 prints and writes
        return
    result = run.result
    console.print(
        f"[bold]{run.model_id}[/]: tuned on {result.dev_task} ({run.dev_items} items), reported on "
        f"{result.test_task} ({run.test_items} items)",
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
    _acc_norm(result.test.acc_norm)
    _methods(result.test.acc)
    _checks(run.checks, True)
    if all(f == run.neutral for f in result.chosen):
        console.print("no factor beat the neutral setting on dev: the tuned edits leave the model unchanged")
    if out is not None:
        written = run.write(out)
        console.print(f"wrote {out}/: " + ", ".join(p.name for p in written), highlight=False)
