"""``headmap compress``: every press at every ratio against the full cache, on the same long-context items.

Writes ``compress.parquet`` (one row per press, ratio and item: correct, cache bytes, prefill and
per-token decode time, peak memory), ``compress.json`` (accuracy with cluster-bootstrap intervals per
press and ratio) and ``compress.png`` (accuracy against cache bytes, one line per press).
See docs/compress.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import OptionError, OutputError, TaskError
from .app import app, console

PRESS_HELP = (
    "a press as NAME[:key=value...] (repeat --press for several): streaming (sinks, window), h2o, snapkv (window, "
    "kernel), pyramidkv (window, kernel, beta), knorm, adakv (scorer, alpha), head_aware (rule, sinks; needs "
    "--atlas). See docs/compress.md"
)
TASK_HELP = (
    "needle[:lengths=1024,2048], a RULER-style task (niah_single, niah_multikey, variable_tracking, ...)"
    "[:lengths=...], "
    "or a JSONL file with context, question and answer per line"
)


def parse_ratios(text: str) -> list[float]:
    ratios = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise OptionError(f"--ratio {text!r}: {part!r} is not a number; e.g. --ratio 0.25,0.5,0.75") from None
        if not 0.0 <= value < 1.0:
            raise OptionError(f"--ratio {text!r}: {value} is outside [0, 1) (the fraction of the cache removed)")
        ratios.append(value)
    return ratios


def load_items(task: str, tokenizer: Any, limit: int, max_length: int | None) -> list[dict[str, Any]]:
    """Items as dicts with ``id``, ``prompt``, ``answers`` and ``cluster``."""
    path = Path(task)
    if task.endswith(".jsonl") or path.is_file():
        return _file_items(path)[:limit]
    from ..evaluation.ruler import TASKS, generate

    name, _, rest = task.partition(":")
    name = "niah_single" if name == "needle" else name
    if name not in TASKS:
        raise OptionError(f"--task {task!r}: not a file, 'needle' or a RULER-style task ({', '.join(TASKS)})")
    lengths = [1024]
    for option in filter(None, rest.split(":")):
        key, _, value = option.partition("=")
        if key != "lengths":
            raise OptionError(f"--task {task!r}: unknown option {key!r}; the one option is lengths=1024,2048")
        try:
            lengths = [int(x) for x in value.split(",")]
        except ValueError:
            raise OptionError(f"--task {task!r}: lengths must be whole numbers, e.g. lengths=1024,2048") from None
    items = generate(name, tokenizer, n=limit, lengths=lengths, max_length=max_length)
    return [{"id": it.id, "prompt": it.context, "answers": it.answers, "cluster": it.cluster} for it in items]


def _file_items(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TaskError(f"cannot read task file {path}: {exc.strerror or exc}") from None
    items = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise TaskError(f"task file {path}, line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("context"), str):
            raise TaskError(f"task file {path}, line {number}: needs an object with a 'context' string")
        answers = obj.get("answers", obj.get("answer"))
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise TaskError(f"task file {path}, line {number}: needs 'answer' (a string) or 'answers' (strings)")
        question = obj.get("question")
        prompt = obj["context"] if question is None else f"{obj['context']}\n\n{question}\n"
        items.append(
            {"id": str(obj.get("id", number)), "prompt": prompt, "answers": answers, "cluster": obj.get("cluster")}
        )
    if not items:
        raise TaskError(f"task file {path} holds no items")
    return items


def run_item(model: Any, tokenizer: Any, press: Any, prompt: str, steps: int) -> dict[str, Any]:
    """Greedy answer of one prompt under ``press``: text, cache bytes after the prefill, times, peak memory."""
    import torch

    from ..models import greedy_decode
    from ..presses import compress

    enc = tokenizer(prompt, return_tensors="pt")
    device = next(model.parameters()).device
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    stamps: list[float] = []
    sizes: list[int] = []
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with compress(model, press) as run, torch.no_grad():

        def before(k: int) -> None:
            if cuda:
                torch.cuda.synchronize(device)
            stamps.append(time.perf_counter())
            if k == 1:
                sizes.append(run.cache_bytes() if run.cache is not None else 0)

        tokens = greedy_decode(model, ids, mask, steps, before_forward=before)
        if cuda:
            torch.cuda.synchronize(device)
        end = time.perf_counter()
    text = tokenizer.decode(tokens[0], skip_special_tokens=True)
    prefill = (stamps[1] if len(stamps) > 1 else end) - stamps[0]
    decode = (end - stamps[1]) / max(1, len(stamps) - 1) if len(stamps) > 1 else float("nan")
    return {
        "output": text,
        "cache_bytes": sizes[0] if sizes else run.cache_bytes(),
        "full_bytes": run.full_bytes,
        "prefill_s": prefill,
        "decode_s_per_token": decode,
        "peak_bytes": int(torch.cuda.max_memory_allocated(device)) if cuda else None,
        "length": int(ids.shape[1]),
    }


def sweep(
    model: Any, tokenizer: Any, presses: list[tuple[str, float, Any]], items: list[dict], steps: int
) -> list[dict[str, Any]]:
    """Rows of compress.parquet: the full cache (press ``full``, ratio 0) and every (press, ratio) on every item."""
    from ..presses import make_press

    rows = []
    runs = [("full", 0.0, make_press("knorm", ratio=0.0)), *presses]
    for item in items:
        for name, ratio, press in runs:
            got = run_item(model, tokenizer, press, item["prompt"], steps)
            correct = all(a.lower() in got["output"].lower() for a in item["answers"])
            rows.append(
                {
                    "press": name,
                    "ratio": ratio,
                    "item": item["id"],
                    "cluster": item["cluster"],
                    "correct": correct,
                    **got,
                }
            )
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from ..stats import cluster_accuracy

    out = []
    keys = sorted({(r["press"], r["ratio"]) for r in rows}, key=lambda k: (k[0] != "full", k[0], k[1]))
    for press, ratio in keys:
        sel = [r for r in rows if r["press"] == press and r["ratio"] == ratio]
        clusters = [r["cluster"] if r["cluster"] is not None else r["item"] for r in sel]
        interval = cluster_accuracy([r["correct"] for r in sel], clusters)
        out.append(
            {
                "press": press,
                "ratio": ratio,
                "n": len(sel),
                "accuracy": interval.estimate,
                "low": interval.low,
                "high": interval.high,
                "cache_bytes": sum(r["cache_bytes"] for r in sel) / len(sel),
                "prefill_s": sum(r["prefill_s"] for r in sel) / len(sel),
                "decode_s_per_token": sum(r["decode_s_per_token"] for r in sel) / len(sel),
            }
        )
    return out


def plot(summary: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in dict.fromkeys(s["press"] for s in summary):
        pts = sorted((s for s in summary if s["press"] == name), key=lambda s: s["cache_bytes"])
        x = [s["cache_bytes"] / 2**20 for s in pts]
        y = [s["accuracy"] for s in pts]
        err = [[s["accuracy"] - s["low"] for s in pts], [s["high"] - s["accuracy"] for s in pts]]
        style = dict(marker="*", markersize=12, linestyle="none", color="black") if name == "full" else dict(marker="o")
        ax.errorbar(x, y, yerr=err, label=name, capsize=3, **style)
    ax.set_xlabel("KV cache after the prefill (MiB, mean per item)")
    ax.set_ylabel("accuracy (95% cluster-bootstrap interval)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@app.command("compress")
def compress_command(
    model: Annotated[str, typer.Argument(help="hub id, local folder or built-in name (smollm2); a causal LM")],
    press: Annotated[list[str], typer.Option("--press", help=PRESS_HELP)],
    out: Annotated[Path, typer.Option(help="folder for compress.parquet, compress.json and compress.png")],
    ratio: Annotated[str, typer.Option(help="fractions of the cache removed, comma-separated")] = "0.25,0.5,0.75",
    task: Annotated[str, typer.Option(help=TASK_HELP)] = "needle",
    atlas: Annotated[Path | None, typer.Option(help="run folder of headmap scan (for head_aware)")] = None,
    limit: Annotated[int, typer.Option(help="items to evaluate")] = 20,
    max_new_tokens: Annotated[int, typer.Option(help="greedy tokens per answer")] = 16,
    overwrite: Annotated[bool, typer.Option(help="replace an earlier compress.parquet in --out")] = False,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto")] = "float32",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, mps or auto")] = "cpu",
) -> None:
    """Evaluate every --press at every --ratio against the full cache on the same --task items."""
    from ..models import load_model, max_positions
    from ..presses import parse_press
    from ..presses.base import check_model
    from ..rundir import check_writable, write_file, write_text

    ratios = parse_ratios(ratio)
    if limit < 1:
        raise OptionError(f"--limit must be at least 1, got {limit}")
    presses = []
    for spec in press:
        for r in ratios:
            extra = {"atlas": str(atlas)} if atlas is not None and spec.split(":")[0] == "head_aware" else {}
            built = parse_press(spec, ratio=r, **extra)
            presses.append((spec, r, built))
    check_writable(out)
    target = out / "compress.parquet"
    if target.exists() and not overwrite:
        raise OutputError(f"{target} exists; pass --overwrite to replace it, or choose another --out")
    loaded = load_model(model, dtype=dtype, device=device)
    check_model(loaded.model)
    items = load_items(task, loaded.tokenizer, limit, max_positions(loaded.model.config))
    limit_tokens = max_positions(loaded.model.config)
    for item in items:
        n = len(loaded.tokenizer(item["prompt"])["input_ids"])
        if limit_tokens is not None and n + max_new_tokens > limit_tokens:
            raise TaskError(
                f"--task item {item['id']}: {n} tokens + {max_new_tokens} new tokens exceed the model's limit of "
                f"{limit_tokens} positions; use a shorter context or fewer --max-new-tokens"
            )
    for _, _, built in presses:
        built.bind(loaded.model)
    rows = sweep(loaded.model, loaded.tokenizer, presses, items, max_new_tokens)
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    write_file(target, lambda fh: pd.DataFrame(rows).to_parquet(fh, index=False))
    summary = summarize(rows)
    write_text(
        out / "compress.json", json.dumps({"model": loaded.model_id, "task": task, "summary": summary}, indent=2)
    )
    plot(summary, out / "compress.png")
    for s in summary:
        console.print(
            f"{s['press']:<28} ratio {s['ratio']:.2f}  accuracy {s['accuracy']:.2f} [{s['low']:.2f}, {s['high']:.2f}]"
            f"  cache {s['cache_bytes'] / 2**20:.2f} MiB  prefill {s['prefill_s']:.3f} s"
            f"  decode {1000 * s['decode_s_per_token']:.1f} ms/token",
            highlight=False,
            markup=False,
        )
    console.print(f"wrote {target}, {out / 'compress.json'}, {out / 'compress.png'}", highlight=False, markup=False)
    from ..report.compress import write_compress_report

    page = write_compress_report(out)  # the scan's report with a compress section when --out is a scan run
    console.print(f"wrote {page}", highlight=False, markup=False)
