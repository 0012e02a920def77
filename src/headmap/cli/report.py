"""``headmap report RUN_DIR``: the HTML report of a run folder (and, with ``--png``, paper figures)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import app, console


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="run folder written by headmap scan")],
    png: Annotated[
        Path | None, typer.Option("--png", help="also write the heatmaps and the sink chart as PNG files into DIR")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="HTML file to write (default: RUN_DIR/report.html)")] = None,
) -> None:
    """Write RUN_DIR/report.html, one self-contained page (no network) about the run.

    It shows the model card, a heatmap of every head metric, head panels with attention maps, token
    strips, the sink chart, the top heads and the settings. --png DIR adds paper-sized PNG figures.
    """
    from ..report import write_report

    written = write_report(run_dir, out=out, png_dir=png)
    for path in written:
        console.print(f"wrote {path} ({path.stat().st_size:,} bytes)", highlight=False, markup=False, soft_wrap=True)
