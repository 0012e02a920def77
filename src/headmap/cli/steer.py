"""``headmap steer``: the greedy generation of a prompt without and with attention edits, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from .app import app, console
from .options import DeviceMap, MaxMemory, OffloadFolder, placement

#: Characters a generation may hold that a table cell would show as blank space: shown escaped instead.
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

EDIT_HELP = (
    "an edit as NAME:key=value:key=value (values JSON or bare words; repeat --edit for several). Names: ablate "
    "(heads, mode=zero|mean, reference=FILE), scale_first_token (heads, factor), scale_span (heads, span, factor, "
    "where=probs|logits), calibrate_sinks (heads, tau, factor), redistribute_sinks (heads, span, p, sinks, tau), "
    "temperature (heads, tau), reinforce_local (heads, k, factor|amount). heads=[[layer,head],...] or a rule over "
    '--atlas such as heads="top 5% retrieval"; span=[start,end] token positions or span="text in the prompt". '
    "E.g. ablate:heads=[[18,6]]:mode=zero. See docs/steering.md"
)


@app.command()
def steer(
    edit: Annotated[list[str], typer.Option("--edit", help=EDIT_HELP)],
    prompt: Annotated[str, typer.Option(help="the text to continue")],
    model: Annotated[
        str | None,
        typer.Argument(
            help="hub id, local folder, .gguf file, or built-in name: smollm2 (default); a causal language model"
        ),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate (greedy)")] = 30,
    atlas: Annotated[
        Path | None, typer.Option(help='run folder of headmap scan, for heads rules such as "top 5% retrieval"')
    ] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto")] = "float32",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, mps or auto")] = "cpu",
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
) -> None:
    """Generate greedily from --prompt without and with the --edit edits, and print both side by side.

    Both runs use the headmap engine, so the edits are the only difference. Bad edits (a layer or head the
    model does not have, a negative, NaN or infinite factor, a span not in the prompt, an unknown name or
    parameter) get one line and exit code 2 before anything is generated.
    """
    from ..steer import compare

    result = compare(
        model,
        edit,
        prompt,
        max_new_tokens=max_new_tokens,
        atlas=atlas,
        dtype=dtype,
        device=device,
        **placement(device_map, max_memory, offload_folder),
    )
    console.print(f"[bold]{result.model_id}[/]", highlight=False)
    for line in result.edits:
        console.print(f"edit: {line}", highlight=False, markup=False)
    console.print(f"prompt: {result.prompt}", highlight=False, markup=False)
    table = Table(show_lines=True)
    table.add_column("without edits", overflow="fold", ratio=1)
    table.add_column("with edits", overflow="fold", ratio=1)
    table.add_row(visible(result.without), visible(result.steered))
    console.print(table)
    if result.identical:
        console.print("the edits did not change the greedy generation")


def visible(text: str) -> Text:
    """``text`` for a table cell: line breaks and tabs as a dim ``\\n``, ``\\r``, ``\\t`` (no blank rows)."""
    out = Text()
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char], style="dim")
        else:
            out.append(char)
    return out
