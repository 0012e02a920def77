"""``headmap compress``: every press at every ratio against the full cache, on the same long-context items.

Writes ``compress.parquet`` (one row per press, ratio and item: correct, cache bytes, prefill and
per-token decode time, peak memory), ``compress.json`` (accuracy with cluster-bootstrap intervals per
press and ratio) and ``compress.png`` (accuracy against cache bytes, one line per press).
See docs/compress.md.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import OptionError, OutputError, TaskError
from .app import app, console
from .options import DeviceMap, MaxMemory, OffloadFolder, placement

PRESS_HELP = (
    "a press as NAME[:key=value...] (repeat --press for several): streaming (sinks, window), h2o, snapkv (window, "
    "kernel), pyramidkv (window, kernel, beta), knorm, adakv (scorer, alpha), head_aware (rule, sinks; needs "
    "--atlas). See docs/compress.md"
)
TASK_HELP = (
    "repeat --task for several (their items taken in turn): needle (niah_single), a RULER-style task (niah_single, "
    "niah_multikey, variable_tracking, ...) with the options of headmap eval (lengths=1024,2048:n=100:seed=0:"
    "per_haystack=1:text=0.5-1:echo=true), or a JSONL file with context, question and answer per line"
)


#: Items per task when neither --limit nor the task's n= says otherwise.
DEFAULT_LIMIT = 20
#: --prefill: one prefill per item shared by every press, or one per press and item.
PREFILL_MODES = ("shared", "each")


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


def load_items(
    task: str, tokenizer: Any, limit: int | None, max_length: int | None, exclude: Any = None
) -> list[dict[str, Any]]:
    """Items as dicts with ``id``, ``prompt``, ``answers``, ``cluster``, ``task`` and ``info`` (what the held-out
    check reads: ``context``, ``needle``/``needles``, ``haystack``, ``paragraphs``).

    A RULER-style task takes the options of ``headmap eval`` (``lengths``, ``n``, ``seed``, ``per_haystack``,
    ``text``, ``echo``; :func:`headmap.evaluation.tasks.parse_ruler_spec`); ``needle`` is ``niah_single``.
    ``limit`` caps the number of items (and is ``n`` when the spec gives none); ``exclude`` lists sets
    (the atlas's corpus) whose needles, haystacks and prose the generated items avoid.
    """
    path = Path(task)
    if task.endswith(".jsonl") or path.is_file():
        return _file_items(path)[:limit]
    from ..evaluation.ruler import generate
    from ..evaluation.tasks import parse_ruler_spec

    spec = "niah_single" + task[len("needle") :] if task == "needle" or task.startswith("needle:") else task
    if spec.split(":", 1)[0] not in _ruler_tasks():
        raise OptionError(f"--task {task!r}: not a file, 'needle' or a RULER-style task ({', '.join(_ruler_tasks())})")
    name, kwargs = parse_ruler_spec(spec)
    kwargs.setdefault("lengths", [1024])
    n = kwargs.pop("n", None)
    if n is None:
        n = limit if limit is not None else DEFAULT_LIMIT
    elif limit is not None:
        n = min(n, limit)
    items = generate(name, tokenizer, n=n, max_length=max_length, exclude=exclude, **kwargs)
    return [
        {
            "id": it.id,
            "prompt": it.context,
            "answers": it.answers,
            "cluster": it.cluster,
            "task": task,
            "info": {
                "context": it.context,
                "needle": it.needle,
                "needles": it.needles,
                "haystack": it.haystack,
                "paragraphs": it.paragraphs,
            },
        }
        for it in items
    ]


def _ruler_tasks() -> tuple[str, ...]:
    from ..evaluation.ruler import TASKS

    return TASKS


def check_task(task: str) -> None:
    """Bad options of a RULER-style ``--task`` fail here, before the model loads (a file is read later)."""
    from ..evaluation.tasks import parse_ruler_spec

    if task.endswith(".jsonl") or Path(task).is_file():
        return
    spec = "niah_single" + task[len("needle") :] if task == "needle" or task.startswith("needle:") else task
    if spec.split(":", 1)[0] not in _ruler_tasks():
        raise OptionError(f"--task {task!r}: not a file, 'needle' or a RULER-style task ({', '.join(_ruler_tasks())})")
    parse_ruler_spec(spec)


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
        info = {k: obj[k] for k in ("needle", "needles", "haystack", "paragraphs") if k in obj}
        items.append(
            {
                "id": str(obj.get("id", number)),
                "prompt": prompt,
                "answers": answers,
                "cluster": obj.get("cluster"),
                "task": str(path),
                "info": {"context": obj["context"], **info},
            }
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


def _row(item: dict, name: str, ratio: float, got: dict[str, Any]) -> dict[str, Any]:
    correct = all(a.lower() in got["output"].lower() for a in item["answers"])
    return {
        "press": name,
        "ratio": ratio,
        "task": item.get("task"),
        "item": item["id"],
        "cluster": item["cluster"],
        "correct": correct,
        **got,
    }


def run_shared(model: Any, tokenizer: Any, runs: list[tuple[str, float, Any]], prompt: str, steps: int) -> list[dict]:
    """One prefill of ``prompt`` for every press of ``runs``, then per press the cache surgery on a copy of
    the full cache and its greedy decoding: one result per run, as :func:`run_item` gives it."""
    import torch

    from ..presses.shared import greedy_continue, press_prefill, shared_prefill

    enc = tokenizer(prompt, return_tensors="pt")
    device = next(model.parameters()).device
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    cuda = device.type == "cuda"

    def now() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = now()
    prefill = shared_prefill(model, [press for _, _, press in runs], ids, mask)
    prefill_s = now() - start
    prefill_peak = int(torch.cuda.max_memory_allocated(device)) if cuda else None
    out = []
    for _, _, press in runs:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = now()
        pressed = press_prefill(prefill, press, model)
        size = pressed.cache_bytes()
        t1 = now()
        tokens = greedy_continue(model, prefill, pressed, steps)
        end = now()
        out.append(
            {
                "output": tokenizer.decode(tokens[0], skip_special_tokens=True),
                "cache_bytes": size,
                "full_bytes": prefill.full_bytes,
                "prefill_s": prefill_s,
                "press_s": t1 - t0,
                "decode_s_per_token": (end - t1) / (steps - 1) if steps > 1 else float("nan"),
                "peak_bytes": max(prefill_peak, int(torch.cuda.max_memory_allocated(device))) if cuda else None,
                "length": int(ids.shape[1]),
            }
        )
        del pressed
    return out


def sweep(
    model: Any,
    tokenizer: Any,
    presses: list[tuple[str, float, Any]],
    items: list[dict],
    steps: int | None,
    prefill: str = "shared",
    progress: Callable[[int, int], None] | None = None,
    on_item: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Rows of compress.parquet: the full cache (press ``full``, ratio 0) and every (press, ratio) on every item.

    ``prefill="shared"``: one prefill per item whose recordings serve every press (headmap.presses.shared);
    ``"each"``: one prefill per press and item. ``steps``: greedy tokens per answer (None: as many as the
    item's reference answers take, see :func:`answer_steps`). ``progress(done, total)`` after each item;
    ``on_item(rows)`` with every row so far (to write them as they come).
    """
    from ..presses import make_press

    if prefill not in PREFILL_MODES:
        raise OptionError(f"--prefill must be one of {', '.join(PREFILL_MODES)} (got {prefill!r})")
    rows: list[dict[str, Any]] = []
    runs = [("full", 0.0, make_press("knorm", ratio=0.0)), *presses]
    for done, item in enumerate(items, start=1):
        n = steps if steps is not None else answer_steps(tokenizer, item["answers"])
        if prefill == "shared":
            results = run_shared(model, tokenizer, runs, item["prompt"], n)
        else:
            results = []
            for _, _, press in runs:
                got = run_item(model, tokenizer, press, item["prompt"], n)
                results.append({**got, "press_s": float("nan")})
        for (name, ratio, _), got in zip(runs, results, strict=True):
            rows.append(_row(item, name, ratio, {**got, "max_new_tokens": n}))
        if on_item is not None:
            on_item(rows)
        if progress is not None:
            progress(done, len(items))
    return rows


def answer_steps(tokenizer: Any, answers: list[str]) -> int:
    """Greedy tokens that can hold every reference answer: the tokens of ``" " + ", ".join(answers)`` plus 2."""
    ids = tokenizer(" " + ", ".join(answers), add_special_tokens=False)["input_ids"]
    return len(ids) + 2


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


TOKENS_HELP = (
    "greedy tokens per answer, or auto: as many as the item's reference answers take (their tokens joined "
    "by ', ', plus 2)"
)
PREFILL_HELP = (
    "shared: one prefill per item records what every press reads, then each press prunes a copy of the full "
    "cache and decodes (the same kept entries and tokens as its own prefill); each: one prefill per press and item"
)
OVERLAP_HELP = (
    "evaluate even when the task shares needles, haystacks, prose or items with the --atlas's corpus; the "
    "overlap is recorded in compress.json"
)
#: What the time columns of compress.parquet measure, per --prefill mode (written to compress.json).
TIMING = {
    "shared": "prefill_s: the one prefill of the item shared by every press (the same on each of its rows), under "
    "the engine when any press reads attention or keeps head-wise budgets; press_s: the press's scoring and "
    "cache surgery on a copy of the full cache; decode_s_per_token: the press's own greedy steps after it",
    "each": "prefill_s: the press's own prefill, its scoring and cache surgery included; press_s: not measured "
    "apart (NaN); decode_s_per_token: the press's greedy steps after it",
}


def parse_steps(text: str) -> int | None:
    """--max-new-tokens: a whole number >= 1, or auto (None: per item, see answer_steps)."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise OptionError(f"--max-new-tokens must be a whole number or auto (got {text!r})") from None
    if value < 1:
        raise OptionError(f"--max-new-tokens must be at least 1 (got {value})")
    return value


def interleave(groups: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Items of several tasks in turn (one of each, then the next of each): a stopped run keeps a balanced set."""
    out = []
    for k in range(max((len(g) for g in groups), default=0)):
        out.extend(g[k] for g in groups if k < len(g))
    return out


@contextmanager
def _progress_bar(show: bool, total: int) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar over the items on stderr (when it is a terminal); yields the step callback."""
    if not (show and sys.stderr.isatty()):
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .app import err

    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err,
        transient=True,
    )  # fmt: skip
    bar.start()
    task = bar.add_task("items", total=total)
    try:
        yield lambda done, total: bar.update(task, completed=done, total=total)
    finally:
        bar.stop()


@app.command("compress")
def compress_command(
    model: Annotated[str, typer.Argument(help="hub id, local folder or built-in name (smollm2); a causal LM")],
    press: Annotated[list[str], typer.Option("--press", help=PRESS_HELP)],
    out: Annotated[Path, typer.Option(help="folder for compress.parquet, compress.json and compress.png")],
    ratio: Annotated[str, typer.Option(help="fractions of the cache removed, comma-separated")] = "0.25,0.5,0.75",
    task: Annotated[list[str] | None, typer.Option("--task", help=TASK_HELP)] = None,
    atlas: Annotated[Path | None, typer.Option(help="run folder of headmap scan (for head_aware)")] = None,
    limit: Annotated[int, typer.Option(help="items to evaluate per task (caps a RULER-style task's n=)")] = 20,
    max_new_tokens: Annotated[str, typer.Option(help=TOKENS_HELP)] = "16",
    prefill: Annotated[str, typer.Option(help=PREFILL_HELP)] = "shared",
    allow_overlap: Annotated[bool, typer.Option("--allow-overlap", help=OVERLAP_HELP)] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an earlier compress.parquet in --out")] = False,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto")] = "float32",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, mps or auto")] = "cpu",
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar over the items")] = True,
) -> None:
    """Evaluate every --press at every --ratio against the full cache on the same --task items."""
    from ..edits import load_atlas
    from ..evaluation import heldout
    from ..models import load_model, max_positions
    from ..presses import parse_press
    from ..presses.base import check_model
    from ..rundir import check_writable, write_file, write_text
    from .evaluate import _checks

    tasks = list(task or ["needle"])
    ratios = parse_ratios(ratio)
    steps = parse_steps(max_new_tokens)
    if limit < 1:
        raise OptionError(f"--limit must be at least 1, got {limit}")
    if prefill not in PREFILL_MODES:
        raise OptionError(f"--prefill must be one of {', '.join(PREFILL_MODES)} (got {prefill!r})")
    for spec in tasks:
        check_task(spec)
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
    atlas_obj = load_atlas(atlas) if atlas is not None else None
    atlas_side = heldout.from_description((getattr(atlas_obj, "meta", None) or {}).get("corpus"))
    exclude = [atlas_side.as_exclude()] if atlas_obj is not None and atlas_side.recorded else None
    checks: list = []
    per_task: dict[str, list[dict[str, Any]]] = {}
    for spec in tasks:  # task files are read (and checked against the atlas) before the model loads
        if spec.endswith(".jsonl") or Path(spec).is_file():
            per_task[spec] = load_items(spec, None, limit, None)
            if atlas_obj is not None:
                side = heldout.from_items([it["info"] for it in per_task[spec]], f"task {spec}")
                checks.append(heldout.check(atlas_side, side, allow_overlap))
    loaded = load_model(model, dtype=dtype, device=device, **placement(device_map, max_memory, offload_folder))
    check_model(loaded.model)
    limit_tokens = max_positions(loaded.model.config)
    for spec in tasks:
        if spec not in per_task:  # RULER-style: generated for this tokenizer, avoiding the atlas's corpus
            per_task[spec] = load_items(spec, loaded.tokenizer, limit, limit_tokens, exclude)
            if atlas_obj is not None:
                side = heldout.from_items([it["info"] for it in per_task[spec]], f"task {spec}")
                checks.append(heldout.check(atlas_side, side, allow_overlap))
    items = interleave([per_task[spec] for spec in tasks])
    for item in items:
        n = len(loaded.tokenizer(item["prompt"])["input_ids"])
        new = steps if steps is not None else answer_steps(loaded.tokenizer, item["answers"])
        if limit_tokens is not None and n + new > limit_tokens:
            raise TaskError(
                f"--task item {item['id']}: {n} tokens + {new} new tokens exceed the model's limit of "
                f"{limit_tokens} positions; use a shorter context or fewer --max-new-tokens"
            )
    for _, _, built in presses:
        built.bind(loaded.model)
    if atlas_obj is not None:
        _checks(checks, atlas_obj)
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)

    def write_rows(rows: list[dict[str, Any]]) -> None:  # after every item: a stopped run keeps what is done
        write_file(target, lambda fh: pd.DataFrame(rows).to_parquet(fh, index=False))

    with _progress_bar(progress, len(items)) as step:
        rows = sweep(
            loaded.model, loaded.tokenizer, presses, items, steps, prefill=prefill, progress=step, on_item=write_rows
        )
    meta = {
        "tasks": tasks,
        "items": len(items),
        "max_new_tokens": max_new_tokens,
        "prefill": prefill,
        "timing": TIMING[prefill],
        "held_out": [c.as_dict() for c in checks] if atlas_obj is not None else "not checked: no --atlas",
    }
    summary = summarize(rows)
    task_text = " + ".join(tasks)
    write_text(
        out / "compress.json",
        json.dumps({"model": loaded.model_id, "task": task_text, **meta, "summary": summary}, indent=2),
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
    from ..report import write_compress_report

    page = write_compress_report(out)  # the scan's report with a compress section when --out is a scan run
    console.print(f"wrote {page}", highlight=False, markup=False)
