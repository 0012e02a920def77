"""``headmap steer``: the greedy generation of a prompt (with pictures for a vision-language model, or of each
input of an image corpus) without and with attention edits, side by side."""

from __future__ import annotations

import sys
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
    prompt: Annotated[
        str | None, typer.Option(help="the text to continue (with --image: the text after the pictures)")
    ] = None,
    model: Annotated[
        str | None,
        typer.Argument(
            help="hub id, local folder, .gguf file, or built-in name: smollm2 (default); a causal language model "
            "or a vision-language model"
        ),
    ] = None,
    image: Annotated[
        list[Path] | None,
        typer.Option(
            "--image",
            help="a picture (PNG, JPEG, ...) for a vision-language model, put before --prompt by the model's "
            "processor with its chat template; repeat for several",
        ),
    ] = None,
    corpus: Annotated[
        str | None,
        typer.Option(
            help="an image corpus whose inputs are steered one by one instead of --prompt: shapes[:size=N] or a "
            'JSONL file of {"image": "a.png", "text": "..."} lines'
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="with --corpus: steer its first N inputs")] = None,
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
    """Generate greedily from --prompt (with --image pictures, or from each input of an image --corpus)
    without and with the --edit edits, and print both side by side.

    Both runs use the headmap engine, so the edits are the only difference. Bad edits (a layer or head the
    model does not have, a negative, NaN or infinite factor, a span not in the prompt, an unknown name or
    parameter, an edit of image tokens on a prompt without an image) and bad inputs (a missing or unreadable
    picture, --image on a model without an image processor) get one line and exit code 2 before anything is
    generated.
    """
    from ..errors import OptionError
    from ..steer import compare, compare_corpus

    if corpus is not None and (prompt is not None or image):
        raise OptionError("give either --corpus or --prompt (with --image), not both")
    if corpus is None and prompt is None:  # typer's usage message, as when --prompt was a required option
        # click's exceptions as typer uses them (its own copy of click, or click): main() shows the usage
        missing = sys.modules[typer.BadParameter.__module__].MissingParameter
        raise missing(param_type="option", param_hint="'--prompt'")
    if limit is not None and corpus is None:
        raise OptionError("--limit counts the inputs of --corpus; with --prompt leave it out")
    common = {
        "max_new_tokens": max_new_tokens,
        "atlas": atlas,
        "dtype": dtype,
        "device": device,
        **placement(device_map, max_memory, offload_folder),
    }
    if corpus is not None:
        results = compare_corpus(model, edit, corpus, limit=limit, **common)
    else:
        results = [compare(model, edit, prompt, images=image or None, **common)]
    first = results[0]
    console.print(f"[bold]{first.model_id}[/]", highlight=False)
    for line in first.edits:
        console.print(f"edit: {line}", highlight=False, markup=False)
    for result in results:
        if result.item is not None:
            known = f" (known answer: {result.answer})" if result.answer is not None else ""
            console.print(f"input: {result.item}{known}", highlight=False, markup=False)
        for path in result.images:
            console.print(f"image: {path}", highlight=False, markup=False)
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
