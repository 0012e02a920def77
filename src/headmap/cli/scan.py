"""``headmap scan``: measure every head and token of a model into a run folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import ScanInterrupted
from .app import app, console, err
from .options import DeviceMap, MaxMemory, OffloadFolder, placement


@app.command()
def scan(
    model: Annotated[
        str | None,
        typer.Argument(help="hub id, local folder, .gguf file, or built-in name: smollm2 (default), minilm"),
    ] = None,
    probes: Annotated[
        str | None,
        typer.Option(
            help="comma-separated probe names, each optionally with parameters (waad:window=20, "
            "retrieval:mode=teacher); default: every probe that applies to the model. Head probes: sink, "
            "entropy, mean_distance, waad, prev_token, duplicate_token, induction, retrieval, span, "
            "position_profile; token probes: received, fai, sinks, massive_values"
        ),
    ] = None,
    corpus: Annotated[
        str | None,
        typer.Option(
            help="built-in: text, repeats, needle, items (options: needle:depths=0,0.5,1:lengths=256,512), a "
            "UTF-8 text file (one input per line), JSONL with spans, a folder of .txt/.jsonl files or a Parquet "
            "file with a text column (both streamed); default: each probe's own built-in corpus"
        ),
    ] = None,
    max_length: Annotated[
        int | None,
        typer.Option(help="tokens per input, longer ones truncated (default: 512 or the model's limit)"),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="inputs per forward pass")] = 4,
    limit: Annotated[int | None, typer.Option(help="use at most this many inputs (built-ins: 8)")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto")] = "float32",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, mps or auto")] = "cpu",
    out: Annotated[Path | None, typer.Option(help="run folder (default: runs/<model>)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace the headmap run already in --out")] = False,
    seed: Annotated[int, typer.Option(help="seed of the random corpora")] = 0,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    resume: Annotated[
        bool,
        typer.Option(help="continue the interrupted scan whose checkpoint is in --out (same model, probes, corpus)"),
    ] = False,
    checkpoint_every: Annotated[
        float,
        typer.Option(help="seconds between checkpoints of completed batches in --out (0: after every batch)"),
    ] = 30.0,
    strict: Annotated[
        bool, typer.Option(help="refuse corpus lines longer than --max-length instead of truncating them")
    ] = False,
    report: Annotated[bool, typer.Option(help="also write the HTML report, report.html, into --out")] = False,
    map_inputs: Annotated[
        int | None,
        typer.Option(
            help="inputs (the first of the corpus) that get maps in the report: image overlays (image_attention "
            "keeps that many) and encoder-decoder alignment maps (default: 2, or image_attention's samples)"
        ),
    ] = None,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
    shard: Annotated[
        str | None,
        typer.Option(help="scan shard I of N only (0-based, e.g. 0/4): a contiguous run of whole batches"),
    ] = None,
) -> None:
    """Measure every head and token of MODEL and write heads.parquet, tokens.parquet and meta.json.

    Completed batches are checkpointed into --out/.headmap-checkpoint; after Ctrl-C or a kill, run
    the same command with --resume to finish with the tables an uninterrupted run would give.
    """
    from ..models import progress_bars
    from ..scan import scan as run_scan

    target = out or Path("runs") / _slug(model or "smollm2")
    show = progress and sys.stderr.isatty()
    try:
        with progress_bars(show):  # the GGUF dequantization bar too
            atlas = run_scan(
                model,
                probes=probes,
                corpus=corpus,
                max_length=max_length,
                batch_size=batch_size,
                limit=limit,
                dtype=dtype,
                device=device,
                out=target,
                overwrite=overwrite,
                seed=seed,
                progress=show,
                resume=resume,
                checkpoint_every_s=checkpoint_every,
                strict=strict,
                **placement(device_map, max_memory, offload_folder),
                shard=shard,
                map_inputs=map_inputs,
            )
    except KeyboardInterrupt as exc:  # typer would swallow it into a bare exit code: say what was kept
        if isinstance(exc, ScanInterrupted):
            err.print(f"headmap: {exc}", highlight=False, markup=False, soft_wrap=True)
            raise typer.Exit(128 + exc.signum) from None
        err.print("headmap: interrupted", highlight=False)
        raise typer.Exit(130) from None
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and int(os.environ.get("RANK", "0") or 0) != 0:
        return  # a data-parallel scan: rank 0 wrote the run folder and says so
    if report:
        from ..report import write_report

        write_report(atlas, out=target / "report.html")
    arch = atlas.meta["architecture"]
    console.print(
        f"[bold]{atlas.meta['model']}[/]: {arch['model_type']}, {arch['layers']} layers x {arch['heads']} heads "
        f"({arch['kv_heads']} kv), {atlas.meta['corpus']['inputs']} inputs, "
        f"{atlas.meta['corpus']['tokens']} tokens, {atlas.meta['wall_time_s']:.1f} s"
        + (f" (resumed at input {', '.join(map(str, resumed))})" if (resumed := atlas.meta.get("resumed_from")) else "")
    )
    for probe, reason in (atlas.meta.get("skipped_probes") or {}).items():
        console.print(f"skipped {probe}: {reason}")
    head_probes = set(atlas.heads.probe.unique())
    for probe in atlas.meta["probes"]:
        if probe not in head_probes or (atlas.heads[atlas.heads.probe == probe].metric != probe).all():
            continue
        top = atlas.top(probe, k=5)
        table = Table(title=f"top heads: {probe}", title_justify="left")
        for col in ("layer", "head", "kv_head", "value", "stderr", "n"):
            table.add_column(col, justify="right")
        for r in top.itertuples():
            table.add_row(str(r.layer), str(r.head), str(r.kv_head), f"{r.value:.4f}", f"{r.stderr:.4f}", str(r.n))
        console.print(table)
    console.print(f"wrote {target}/:")
    for name in ("heads.parquet", "tokens.parquet", "maps.parquet", "meta.json", "report.html"):
        path = target / name
        if path.exists():
            console.print(f"  {name:<15} {path.stat().st_size:>10,} bytes")


def _slug(name: str) -> str:
    base = Path(name).name if os.sep in name or name.endswith(".gguf") else name
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in base).strip("-.") or "model"
