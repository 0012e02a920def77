"""``headmap explain``: attribute a prediction to its input tokens by several methods, with faithfulness."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .app import app, console, err
from .options import DeviceMap, MaxMemory, OffloadFolder, placement


@app.command()
def explain(
    model: Annotated[str, typer.Argument(help="hub id, local folder, .gguf file, or built-in name (smollm2, minilm)")],
    out: Annotated[
        Path, typer.Option(help="folder for attributions.parquet, faithfulness.parquet, explain.json, explain.html")
    ],
    text: Annotated[list[str] | None, typer.Option(help="a text to explain (repeat for several)")] = None,
    corpus: Annotated[Path | None, typer.Option(help="a UTF-8 text file, one input per line")] = None,
    target: Annotated[
        str,
        typer.Option(
            help="next, token:WORD, contrast:A,B, span:K (decoders), class:N (classifiers) or "
            "similarity:TEXT (sentence encoders)"
        ),
    ] = "next",
    methods: Annotated[
        str,
        typer.Option(
            help="comma-separated: rollout, attn_grad, saliency, integrated_gradients, occlusion, last_layer_attention"
        ),
    ] = "rollout,attn_grad,saliency,integrated_gradients",
    steps: Annotated[int, typer.Option(help="integrated_gradients: points on the path")] = 32,
    occlusion_window: Annotated[
        int | None,
        typer.Option(
            help="occlusion: replace this many consecutive tokens at once (default 1, leave-one-token-out); "
            "about T / S + 1 forwards (S the stride) instead of T + 1"
        ),
    ] = None,
    occlusion_stride: Annotated[
        int | None,
        typer.Option(
            help="occlusion: tokens between window starts, at most the window (default: the window); a token's "
            "value is the mean over the windows that cover it"
        ),
    ] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto")] = "float32",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, mps or auto")] = "cpu",
    max_length: Annotated[int | None, typer.Option(help="tokens per input, longer ones cut")] = None,
    batch_size: Annotated[int, typer.Option(help="inputs per forward pass")] = 1,
    overwrite: Annotated[bool, typer.Option(help="replace an explanation already in --out")] = False,
    resume: Annotated[
        bool,
        typer.Option(
            help="go on from a stopped run in --out: its finished batches are kept, the others computed "
            "(the same command otherwise; a difference is refused, naming it)"
        ),
    ] = False,
    limit: Annotated[int | None, typer.Option(help="explain the first N inputs only")] = None,
    seed: Annotated[int, typer.Option(help="seed of the random-order control")] = 0,
    progress: Annotated[bool, typer.Option(help="show a progress bar over the inputs")] = True,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
) -> None:
    """Attribute the target on each text to its tokens with every method, and measure each method's
    faithfulness (deletion and insertion curves against a random order) and their agreement.

    See docs/explain.md. Bad input (a target word that is several tokens, a class the model does not have,
    class: without a classification head, an empty text, a method that does not apply) gets one line and
    exit code 2 before anything is written.

    Each finished batch is kept in --out as it is done, so a stopped run goes on with --resume; under
    ``torchrun --nproc-per-node N -m headmap explain ...`` the ranks share the batches and rank 0 writes.
    """
    from ..explain.folder import run_explain

    bar = None
    if progress and sys.stderr.isatty():
        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        )
        bar.start()
        task = bar.add_task("inputs", total=None)
        layers = bar.add_task("layers", total=None, visible=False)

    def step(done: int, total: int) -> None:
        if bar is not None:
            bar.update(task, completed=done, total=total)

    def on_layer(method: str, done: int, total: int) -> None:  # a long input's progress: layers, occlusion's windows
        if bar is not None:
            bar.update(layers, description=method, completed=done, total=total, visible=done < total)

    try:
        result = run_explain(
            model,
            text=text,
            corpus=corpus,
            target=target,
            methods=methods,
            steps=steps,
            dtype=dtype,
            device=device,
            max_length=max_length,
            batch_size=batch_size,
            out=out,
            overwrite=overwrite,
            seed=seed,
            resume=resume,
            limit=limit,
            occlusion_window=occlusion_window,
            occlusion_stride=occlusion_stride,
            progress=step,
            on_layer=on_layer,
            **placement(device_map, max_memory, offload_folder),
        )
    finally:
        if bar is not None:
            bar.stop()
    if not result.lead:  # a data-parallel explain (torchrun): rank 0 prints and writes
        return
    if result.meta.get("nothing_to_resume"):
        console.print(f"nothing to resume: {out} holds the finished explanation of this same run", highlight=False)
        return
    faith = result.faithfulness
    table = Table(title=f"faithfulness: {result.meta['target']}", title_justify="left")
    for col in ("method", "comprehensiveness", "sufficiency", "p above random"):
        table.add_column(col, justify="right")
    for method in faith.method.unique():
        rows = faith[faith.method == method].set_index("metric")

        def cell(metric: str, rows=rows) -> str:
            if metric not in rows.index:
                return ""
            r = rows.loc[metric]
            return f"{r.value:.3g}" if metric == "p_above_random" else f"{r.value:.4f} ± {r.stderr:.4f}"

        table.add_row(method, cell("comprehensiveness"), cell("sufficiency"), cell("p_above_random"))
    console.print(f"[bold]{result.meta['model']}[/]: {result.meta['inputs']} inputs, {result.meta['wall_time_s']} s")
    console.print(table)
    if result.meta.get("resumed_batches"):
        console.print(f"resumed: {result.meta['resumed_batches']} of {result.meta['batches']} batches were done")
    console.print(f"wrote {out}/:")
    for path in result.written:
        console.print(f"  {path.name:<22} {path.stat().st_size:>10,} bytes")
