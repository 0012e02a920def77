"""``headmap compress``: every press at every ratio against the full cache, on the same long-context items.

Writes ``compress.parquet`` (one row per press, ratio and item: correct, cache bytes, prefill and
per-token decode time, peak memory), ``compress.json`` (accuracy with cluster-bootstrap intervals per
press and ratio) and ``compress.png`` (accuracy against cache bytes, one line per press).
See docs/compress.md.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
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
    if prefill not in PREFILL_MODES:
        raise OptionError(f"--prefill must be one of {', '.join(PREFILL_MODES)} (got {prefill!r})")
    rows: list[dict[str, Any]] = []
    runs = with_full(presses)
    for done, item in enumerate(items, start=1):
        rows.extend(item_rows(model, tokenizer, runs, item, steps, prefill))
        if on_item is not None:
            on_item(rows)
        if progress is not None:
            progress(done, len(items))
    return rows


def with_full(presses: list[tuple[str, float, Any]]) -> list[tuple[str, float, Any]]:
    """The runs of every item: the full cache (press ``full``, ratio 0), then every (press, ratio)."""
    from ..presses import make_press

    return [("full", 0.0, make_press("knorm", ratio=0.0)), *presses]


def item_rows(
    model: Any, tokenizer: Any, runs: list[tuple[str, float, Any]], item: dict, steps: int | None, prefill: str
) -> list[dict[str, Any]]:
    """The rows of one item: one per run of ``runs`` (:func:`with_full`), in that order."""
    n = steps if steps is not None else answer_steps(tokenizer, item["answers"])
    if prefill == "shared":
        results = run_shared(model, tokenizer, runs, item["prompt"], n)
    else:
        results = []
        for _, _, press in runs:
            got = run_item(model, tokenizer, press, item["prompt"], n)
            results.append({**got, "press_s": float("nan")})
    return [
        _row(item, name, ratio, {**got, "max_new_tokens": n})
        for (name, ratio, _), got in zip(runs, results, strict=True)
    ]


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


# -- resuming and sharing a run ---------------------------------------------------------------------------------

#: The fingerprint of the run in --out: everything that decides its rows (see :func:`run_fingerprint`).
FINGERPRINT_FILE = "compress-fingerprint.json"
FINGERPRINT_FORMAT = "headmap-compress-fingerprint/1"
ROWS_FILE = "compress.parquet"
#: A rank's own finished items in a data-parallel run, until rank 0 writes compress.parquet.
RANK_DIR = ".headmap-compress-rank-{rank}-of-{world}"
RANK_PREFIX = ".headmap-compress-rank-"
#: Columns of compress.parquet that measure time or memory (they differ between runs of the same rows).
TIME_COLUMNS = ("prefill_s", "press_s", "decode_s_per_token", "peak_bytes")


def plan_presses(specs: list[str], ratios: list[float], atlas: Path | None) -> list[tuple[str, float, Any]]:
    """(spec, ratio, press) for every --press at every --ratio, in the order of the rows; bad specs fail here."""
    from ..presses import parse_press

    presses = []
    for spec in specs:
        for r in ratios:
            extra = {"atlas": str(atlas)} if atlas is not None and spec.split(":")[0] == "head_aware" else {}
            presses.append((spec, r, parse_press(spec, ratio=r, **extra)))
    return presses


def _sha256(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _is_file_task(spec: str) -> bool:
    return spec.endswith(".jsonl") or Path(spec).is_file()


def run_fingerprint(
    model: str,
    presses: list[tuple[str, float, Any]],
    ratios: list[float],
    tasks: list[str],
    limit: int,
    steps: int | None,
    prefill: str,
    atlas: Path | None,
    dtype: str,
    shard: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """What decides the rows of a compress run, as plain JSON data (written to ``FINGERPRINT_FILE``).

    The model as given (a local folder by its absolute path), the dtype, every press with its resolved
    parameters at every ratio, the ratios, the tasks with their parameters (a task file also by its
    SHA-256), --limit, --max-new-tokens, --prefill, the atlas (path and SHA-256 of its heads.parquet
    and meta.json) and --shard. Computed from the arguments alone, before the model loads.
    """
    local = Path(model).expanduser()
    task_ids = []
    for spec in tasks:
        if _is_file_task(spec) and Path(spec).is_file():
            task_ids.append({"task": spec, "file": str(Path(spec).resolve()), "sha256": _sha256(Path(spec))})
        else:
            task_ids.append({"task": spec})
    atlas_id = None
    if atlas is not None:
        path = Path(atlas)
        files = [path / n for n in ("heads.parquet", "meta.json")] if path.is_dir() else [path]
        present = [f for f in files if f.is_file()]
        atlas_id = {"path": str(path.resolve()), "sha256": _sha256(*present) if present else None}
    fp = {
        "format": FINGERPRINT_FORMAT,
        "model": str(local.resolve()) if local.exists() else model,
        "dtype": dtype,
        "presses": [[spec, r, built.describe()] for spec, r, built in presses],
        "ratios": list(ratios),
        "tasks": task_ids,
        "limit": limit,
        "max_new_tokens": "auto" if steps is None else steps,
        "prefill": prefill,
        "atlas": atlas_id,
        "shard": None if shard is None else f"{shard[0]}/{shard[1]}",
    }
    return json.loads(json.dumps(fp))  # the form it has after a round trip through disk


def _brief(value: Any, limit: int = 160) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fingerprint_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """One phrase per field that differs between the folder's fingerprint ``old`` and this command's ``new``."""
    names = {"max_new_tokens": "--max-new-tokens", "limit": "--limit", "prefill": "--prefill", "shard": "--shard"}
    out = []
    for key in [*new, *(k for k in old if k not in new)]:
        if old.get(key) != new.get(key):
            what = names.get(key, key)
            out.append(f"{what} differs: the folder has {_brief(old.get(key))}, this command {_brief(new.get(key))}")
    return out


def read_fingerprint(out: Path) -> dict[str, Any] | None:
    path = out / FINGERPRINT_FILE
    if not path.is_file():
        return None
    try:
        fp = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(fp, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as exc:
        raise OutputError(f"{path} is damaged ({exc}); restore it, or choose another --out") from None
    return fp


def write_fingerprint(out: Path, fp: dict[str, Any]) -> Path:
    from ..rundir import write_text

    return write_text(out / FINGERPRINT_FILE, json.dumps(fp, indent=2) + "\n")


def rank_folders(out: Path) -> list[Path]:
    """The rank folders of a data-parallel compress run in ``out`` (of any number of ranks)."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.name.startswith(RANK_PREFIX) and p.is_dir())


def earlier_results(out: Path) -> list[str]:
    """What of an earlier compress run ``out`` holds: its table, fingerprint, rank folders."""
    found = [n for n in (ROWS_FILE, FINGERPRINT_FILE) if (out / n).exists()]
    return found + [p.name for p in rank_folders(out)]


def check_out(out: Path, fp: dict[str, Any], overwrite: bool, resume: bool) -> None:
    """Before the model loads: refuse an --out that holds compress results unless --resume (same
    fingerprint: else one line naming the fields that differ) or --overwrite."""
    from ..rundir import check_writable

    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder; choose a folder path")
    check_writable(out)
    found = earlier_results(out) if out.is_dir() else []
    if not found or overwrite:
        return
    if not resume:
        raise OutputError(
            f"--out {out} already holds compress results ({', '.join(found)}); pass --resume to continue that run, "
            "--overwrite to replace it, or choose another --out"
        )
    old = read_fingerprint(out)
    if old is None:
        raise OutputError(
            f"--resume: {out} holds {', '.join(found)} but no {FINGERPRINT_FILE} (a run of an older headmap); "
            f"write one with bench/compress_fingerprint.py {out} -- <its compress arguments>, or choose another --out"
        )
    diffs = fingerprint_differences(old, fp)
    if diffs:
        raise OutputError(
            f"--resume: {out} holds another compress run: {'; '.join(diffs)}; run the command that made it "
            f"(see {out / FINGERPRINT_FILE}), or choose another --out"
        )


def item_key(item: dict[str, Any]) -> tuple[str, str]:
    return (str(item.get("task")), str(item["id"]))


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a compress.parquet as the dicts :func:`sweep` made (NaN where a float was NaN or null)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(f"{path} is damaged ({exc}); move it away to start that part over") from None
    floats = [f.name for f in table.schema if pa.types.is_floating(f.type)]
    rows = table.to_pylist()
    for row in rows:
        for name in floats:
            if row[name] is None:
                row[name] = float("nan")
    return rows


def finished_items(
    paths: list[Path], runs: list[tuple[str, float, Any]], items: list[dict[str, Any]]
) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """The rows of every item that ``paths`` (compress.parquet files) hold complete: one row per run of
    ``runs`` (the full cache and every press x ratio), ordered as the runs. Items with some rows missing
    are left out (computed again); a row of an item this run does not make is refused."""
    order = {(name, float(ratio)): k for k, (name, ratio, _) in enumerate(runs)}
    known = {item_key(it) for it in items}
    found: dict[tuple[str, str], dict[tuple[str, float], dict[str, Any]]] = {}
    for path in paths:
        for row in read_rows(path):
            key = (str(row.get("task")), str(row.get("item")))
            if key not in known:
                raise OutputError(
                    f"{path} holds item {key[1]} of task {key[0]}, which this command does not make; "
                    "run the command that made the folder, or choose another --out"
                )
            found.setdefault(key, {}).setdefault((str(row.get("press")), float(row.get("ratio"))), row)
    done = {}
    for key, got in found.items():
        if set(got) == set(order):
            done[key] = sorted(got.values(), key=lambda r: order[(str(r["press"]), float(r["ratio"]))])
    return done


def ordered_rows(items: list[dict[str, Any]], rows: dict[tuple[str, str], list[dict[str, Any]]]) -> list[dict]:
    """The rows of the items of ``rows``, in the order of ``items`` (the order of an uninterrupted run)."""
    return [r for it in items if item_key(it) in rows for r in rows[item_key(it)]]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pandas as pd

    from ..rundir import write_file

    return write_file(path, lambda fh: pd.DataFrame(rows).to_parquet(fh, index=False))


def remove_rank_folders(out: Path) -> None:
    for folder in rank_folders(out):
        for name in (ROWS_FILE,):
            (folder / name).unlink(missing_ok=True)
        for stray in folder.glob(f".{ROWS_FILE}.*"):  # a temporary file of a write that was killed
            stray.unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:
            pass  # it holds files headmap did not write: leave them


def start_rows(
    out: Path,
    fp: dict[str, Any],
    runs: list[tuple[str, float, Any]],
    items: list[dict[str, Any]],
    lengths: dict[tuple[str, str], int],
    overwrite: bool,
    resume: bool,
) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Rank 0 (or the one process) before the first item: the rows of the items already finished (with
    --resume: from compress.parquet and the rank folders of a stopped data-parallel run, gathered into
    compress.parquet), the earlier results gone (with --overwrite), and the fingerprint written."""
    out.mkdir(parents=True, exist_ok=True)
    done: dict[tuple[str, str], list[dict[str, Any]]] = {}
    if overwrite and not resume:
        (out / ROWS_FILE).unlink(missing_ok=True)  # a stopped replacement must not resume the old rows
        remove_rank_folders(out)
    elif resume:
        paths = [p for p in [out / ROWS_FILE, *(f / ROWS_FILE for f in rank_folders(out))] if p.is_file()]
        done = finished_items(paths, runs, items)
        for key, rows in done.items():
            if rows[0].get("length") is not None and int(rows[0]["length"]) != lengths[key]:
                raise OutputError(
                    f"--resume: {out / ROWS_FILE} has item {key[1]} at {rows[0]['length']} tokens, this run makes "
                    f"it {lengths[key]} tokens (another tokenizer?); run the command that made the folder, or "
                    "choose another --out"
                )
        if rank_folders(out):  # one table again: the rank folders' rows move into compress.parquet
            write_rows(out / ROWS_FILE, ordered_rows(items, done))
            remove_rank_folders(out)
    write_fingerprint(out, fp)
    return done


def shard_items(items: list[dict[str, Any]], part: tuple[int, int]) -> list[dict[str, Any]]:
    """Shard i of n (0-based): a contiguous run of the items (scan's --shard, with one item per batch)."""
    index, count = part
    chosen = items[len(items) * index // count : len(items) * (index + 1) // count]
    if not chosen:
        raise OptionError(f"--shard {index}/{count} holds no item: the tasks make {len(items)} items; use fewer shards")
    return chosen


def items_signature(items: list[dict[str, Any]]) -> str:
    """SHA-256 of every item's task, id, prompt, answers and cluster, in order (what the ranks compare)."""
    rows = [[it.get("task"), it["id"], it["prompt"], it["answers"], it.get("cluster")] for it in items]
    return f"{len(items)} items, sha256 {hashlib.sha256(json.dumps(rows, default=str).encode()).hexdigest()[:16]}"


# -- merging the run folders of separate --shard runs ------------------------------------------------------------

#: The fields of compress.json that every shard of one run has alike (items, shard and summary are per shard).
SHARED_FIELDS = ("model", "task", "tasks", "max_new_tokens", "prefill", "timing", "held_out")


def _shard_of(folder: Path) -> tuple[dict[str, Any], tuple[int, int]]:
    """The fingerprint of the --shard run in ``folder`` and its shard (i, n); OutputError when it is none."""
    from ..specs import is_finite_number

    path = folder / FINGERPRINT_FILE
    if not folder.is_dir():
        raise OutputError(f"--merge {folder}: no such folder; pass the --out folders of the --shard runs")
    if not path.is_file():
        raise OutputError(
            f"--merge {folder} is not a compress run folder (no {FINGERPRINT_FILE}); pass the --out folders of "
            "the --shard runs"
        )
    try:
        fp = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(fp, dict):
            raise ValueError("not an object")
        presses = fp.get("presses")
        if not isinstance(presses, list) or not all(
            isinstance(p, list) and len(p) == 3 and is_finite_number(p[1]) for p in presses
        ):
            raise ValueError("no list of presses")
    except (OSError, ValueError) as exc:
        raise OutputError(f"--merge: {path} is damaged ({exc}); restore it, or run that shard again") from None
    text = fp.get("shard")
    if text is None:
        raise OutputError(
            f"--merge {folder} is not a --shard run (its {FINGERPRINT_FILE} has no shard): it holds a whole run "
            "already; pass the folders of headmap compress ... --shard I/N runs"
        )
    index, _, count = str(text).partition("/")
    try:
        part = (int(index), int(count))
    except ValueError:
        raise OutputError(f"--merge: {path} has shard {text!r}, not I/N; restore it, or run that shard again") from None
    if not 0 <= part[0] < part[1]:
        raise OutputError(f"--merge: {path} has shard {text!r}, out of range; restore it, or run that shard again")
    return fp, part


def _finished_rows(folder: Path, fp: dict[str, Any], part: tuple[int, int]) -> tuple[dict[str, Any], list[dict]]:
    """The compress.json and the rows of a finished shard; OutputError (what is missing) when it is not."""
    name = f"{folder} (shard {part[0]}/{part[1]})"
    finish = "finish it with the command that made it plus --resume"
    summary_path, rows_path = folder / "compress.json", folder / ROWS_FILE
    if not rows_path.is_file() or not summary_path.is_file():
        missing = " and ".join(p.name for p in (rows_path, summary_path) if not p.is_file())
        raise OutputError(f"--merge: {name} is not finished: it has no {missing}; {finish}")
    try:
        data = json.loads(summary_path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or type(data.get("items")) is not int:
            raise ValueError("no count of items")
    except (OSError, ValueError) as exc:
        raise OutputError(f"--merge: {summary_path} is damaged ({exc}); {finish}") from None
    if data.get("shard") != fp["shard"]:
        raise OutputError(
            f"--merge: {summary_path} is of shard {data.get('shard')!r}, its {FINGERPRINT_FILE} of {fp['shard']!r} "
            f"(a stopped replacement?); {finish}"
        )
    rows = read_rows(rows_path)
    order = [("full", 0.0), *((str(spec), float(r)) for spec, r, _ in fp["presses"])]
    items: dict[tuple[str, str], list[tuple[str, float]]] = {}
    for row in rows:
        key = (str(row.get("task")), str(row.get("item")))
        items.setdefault(key, []).append((str(row.get("press")), float(row.get("ratio"))))
    complete = sum(got == order for got in items.values())
    if complete != len(items) or len(items) != data["items"]:
        raise OutputError(
            f"--merge: {name} is not finished: {ROWS_FILE} holds {complete} of its {data['items']} items complete; "
            f"{finish}"
        )
    blocks = [rows[k : k + len(order)] for k in range(0, len(rows), len(order))]
    keys = [{(str(r.get("task")), str(r.get("item"))) for r in block} for block in blocks]
    if any(len(k) != 1 for k in keys) or len({next(iter(k)) for k in keys}) != len(blocks):
        raise OutputError(f"--merge: {rows_path} does not hold each item's rows together, in run order; {finish}")
    counted = {}
    for row in rows:
        got = counted.setdefault((str(row.get("press")), float(row.get("ratio"))), [0, 0])
        got[0] += 1
        got[1] += bool(row.get("correct"))
    summary = data.get("summary") if isinstance(data.get("summary"), list) else []
    told = [[t.get(k) for k in ("press", "ratio", "n", "accuracy")] if isinstance(t, dict) else t for t in summary]
    made = [[p, r, n, c / n] for (p, r), (n, c) in counted.items()]
    if sorted(json.dumps(t, default=str) for t in told) != sorted(json.dumps(t) for t in made):
        raise OutputError(f"--merge: {summary_path} does not summarize {rows_path} (written by another run?); {finish}")
    return data, rows


def merge_shards(folders: list[Path], out: Path, overwrite: bool = False) -> dict[str, Any]:
    """Merge the run folders of ``headmap compress ... --shard I/N`` runs (all N of one run) into ``out``.

    The shards must hold the same fingerprint except the shard (the model, dtype, presses, ratios, tasks,
    --limit, --max-new-tokens, --prefill and atlas), each shard 0 to N-1 once, each finished. ``out``
    then holds what one process running the same command without --shard writes: compress.parquet (the
    shards' rows in shard order), compress-fingerprint.json (without the shard: the same command with
    --resume finds every item done), compress.json, compress.png and report.html. Every refusal is one
    OutputError naming what differs or what is missing, before anything is written. Returns compress.json's
    content.
    """
    from ..report import write_compress_report
    from ..rundir import check_unlocked, check_writable, lock, lock_holder, write_text

    if not folders:
        raise OptionError("--merge needs the folders of the --shard runs, e.g. --merge runs/c0 --merge runs/c1")
    shards = [(Path(f), *_shard_of(Path(f))) for f in folders]
    first, fp0, _ = shards[0]
    for folder, fp, _ in shards[1:]:
        diffs = [
            f"{key} differs: {first} has {_brief(fp0.get(key))}, {folder} {_brief(fp.get(key))}"
            for key in dict.fromkeys([*fp0, *fp])
            if key != "shard" and fp0.get(key) != fp.get(key)
        ]
        if diffs:
            raise OutputError(f"--merge: {folder} is a shard of another compress run: {'; '.join(diffs)}")
    counts = sorted({part[1] for _, _, part in shards})
    if len(counts) > 1:
        listed = ", ".join(f"{folder} is {part[0]}/{part[1]}" for folder, _, part in shards)
        raise OutputError(
            f"--merge: the folders are shards of different counts ({listed}); pass the N shards of one run"
        )
    count = counts[0]
    given: dict[int, Path] = {}
    for folder, _, part in shards:
        if part[0] in given:
            raise OutputError(
                f"--merge: shard {part[0]}/{count} is given twice ({given[part[0]]} and {folder}); pass each shard once"
            )
        given[part[0]] = folder
    missing = [f"{k}/{count}" for k in range(count) if k not in given]
    if missing:
        many = len(missing) > 1
        raise OutputError(
            f"--merge: shard{'s' if many else ''} {', '.join(missing)} {'are' if many else 'is'} missing (given: "
            f"{', '.join(f'{k}/{count} in {given[k]}' for k in sorted(given))}); run {'them' if many else 'it'} with "
            f"--shard {', '.join(missing)} and pass {'their folders' if many else 'its folder'} too"
        )
    out = Path(out)
    for folder in given.values():
        if out.resolve() == folder.resolve():
            raise OutputError(f"--out {out} is one of the shard folders; choose another folder for the merged run")
        try:
            check_unlocked(folder)
        except OutputError:
            raise OutputError(
                f"--merge: {folder} is being written by another headmap process ({lock_holder(folder)}); wait "
                "until that run ends"
            ) from None
    ordered = [next(s for s in shards if s[2][0] == k) for k in range(count)]
    done = [_finished_rows(folder, fp, part) for folder, fp, part in ordered]
    for (folder, _, _), (data, _) in zip(ordered[1:], done[1:], strict=True):
        diffs = [key for key in SHARED_FIELDS if data.get(key) != done[0][0].get(key)]
        if diffs:
            raise OutputError(
                f"--merge: {folder / 'compress.json'} differs from {ordered[0][0] / 'compress.json'} in "
                f"{', '.join(diffs)} (shards of one run have them alike); run that shard again"
            )
    total = sum(data["items"] for data, _ in done)
    seen: dict[tuple[str, str], Path] = {}
    for (folder, _, (k, _)), (data, rows) in zip(ordered, done, strict=True):
        expect = total * (k + 1) // count - total * k // count
        if data["items"] != expect:
            raise OutputError(
                f"--merge: {folder} (shard {k}/{count}) holds {data['items']} items, but shard {k} of {count} of a run "
                f"of {total} items holds {expect}; run that shard again"
            )
        for row in rows:
            key = (str(row.get("task")), str(row.get("item")))
            if seen.setdefault(key, folder) != folder:
                raise OutputError(
                    f"--merge: item {key[1]} of task {key[0]} is in {seen[key]} and in {folder}; pass the shards of "
                    "one run"
                )
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder; choose a folder path")
    check_writable(out)
    found = earlier_results(out) if out.is_dir() else []
    if found and not overwrite:
        raise OutputError(
            f"--out {out} already holds compress results ({', '.join(found)}); pass --overwrite to replace them, "
            "or choose another --out"
        )
    rows = [row for _, shard_rows in done for row in shard_rows]
    summary = summarize(rows)
    data = {key: value for key, value in done[0][0].items() if key != "shard"}
    data.update(items=total, summary=summary)
    with lock(out, command=_command_line()):
        if overwrite:
            (out / "compress.json").unlink(missing_ok=True)  # a stop below leaves no summary of other rows
            remove_rank_folders(out)
        write_fingerprint(out, {**fp0, "shard": None})
        write_rows(out / ROWS_FILE, rows)
        write_text(out / "compress.json", json.dumps(data, indent=2))
        plot(summary, out / "compress.png")
        write_compress_report(out)
    return data


RESUME_HELP = (
    "continue the stopped run in --out (the same command): items whose rows compress.parquet holds complete are "
    "kept, the others computed; refused when the command differs from the folder's compress-fingerprint.json"
)
SHARD_HELP = "evaluate shard I of N only (0-based, e.g. 0/4): a contiguous run of the items"


MODEL_HELP = "hub id, local folder or built-in name (smollm2); a causal LM (none with --merge)"
MERGE_HELP = (
    "merge the --out folders of separate --shard I/N runs of one command (repeat --merge for each of the N) into "
    "--out, as one process would have written it; takes no MODEL nor run options (they come from the shards)"
)
#: The options --merge takes; any other option given beside it is refused.
MERGE_OPTIONS = ("merge", "out", "overwrite", "progress")


@app.command("compress")
def compress_command(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Argument(help=MODEL_HELP)] = None,
    press: Annotated[list[str] | None, typer.Option("--press", help=PRESS_HELP)] = None,
    out: Annotated[Path | None, typer.Option(help="folder for compress.parquet, compress.json and compress.png")] = (
        None
    ),
    ratio: Annotated[str, typer.Option(help="fractions of the cache removed, comma-separated")] = "0.25,0.5,0.75",
    task: Annotated[list[str] | None, typer.Option("--task", help=TASK_HELP)] = None,
    atlas: Annotated[Path | None, typer.Option(help="run folder of headmap scan (for head_aware)")] = None,
    limit: Annotated[int, typer.Option(help="items to evaluate per task (caps a RULER-style task's n=)")] = 20,
    max_new_tokens: Annotated[str, typer.Option(help=TOKENS_HELP)] = "16",
    prefill: Annotated[str, typer.Option(help=PREFILL_HELP)] = "shared",
    allow_overlap: Annotated[bool, typer.Option("--allow-overlap", help=OVERLAP_HELP)] = False,
    overwrite: Annotated[
        bool, typer.Option(help="replace an earlier compress run in --out (its table is deleted at the start)")
    ] = False,
    resume: Annotated[bool, typer.Option("--resume", help=RESUME_HELP)] = False,
    shard: Annotated[str | None, typer.Option(help=SHARD_HELP)] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto")] = "float32",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, mps or auto")] = "cpu",
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar over the items")] = True,
    merge: Annotated[list[Path] | None, typer.Option("--merge", help=MERGE_HELP)] = None,
) -> None:
    """Evaluate every --press at every --ratio against the full cache on the same --task items.

    A stopped run continues with --resume. Started by torchrun --nproc-per-node N -m headmap compress ...
    (or accelerate launch), the ranks share the items and rank 0 writes the one run folder. The folders
    of separate --shard I/N runs become one run folder with --merge DIR (each of them) --out DIR.
    """
    from ..parallel import Ranks
    from ..scan.check import shard as parse_shard

    needed = (("out", out),) if merge else (("model", model), ("press", press), ("out", out))
    for name, value in needed:
        if not value:  # required (MODEL and --press unless --merge): click's usage message, as when click checked
            param = next(p for p in ctx.command.params if p.name == name)
            raise sys.modules[typer.BadParameter.__module__].MissingParameter(ctx=ctx, param=param)
    assert out is not None
    if merge:
        _merge_command(ctx, merge, out, overwrite)
        return
    assert model is not None and press is not None
    tasks = list(task or ["needle"])
    ratios = parse_ratios(ratio)
    steps = parse_steps(max_new_tokens)
    if limit < 1:
        raise OptionError(f"--limit must be at least 1, got {limit}")
    if prefill not in PREFILL_MODES:
        raise OptionError(f"--prefill must be one of {', '.join(PREFILL_MODES)} (got {prefill!r})")
    if resume and overwrite:
        raise OptionError("--resume continues the run in --out and --overwrite replaces it; pass one of them")
    part = parse_shard(shard)
    for spec in tasks:
        check_task(spec)
    presses = plan_presses(press, ratios, atlas)
    fp = run_fingerprint(model, presses, ratios, tasks, limit, steps, prefill, atlas, dtype, part)
    ranks = Ranks.start(device)  # None: one process; else this rank of a torchrun / accelerate launch
    try:
        if ranks is not None and part is not None:
            raise OptionError("--shard selects work for one process; under torchrun the ranks share the items")
        _compress(
            ranks, model, presses, tasks, fp, out, atlas, limit, steps, max_new_tokens, prefill, allow_overlap,
            overwrite, resume, part, dtype, ranks.device(device) if ranks else device,
            placement(device_map, max_memory, offload_folder), progress,
        )  # fmt: skip
    finally:
        if ranks is not None:
            ranks.close()


def _merge_command(ctx: typer.Context, folders: list[Path], out: Path, overwrite: bool) -> None:
    """``headmap compress --merge DIR ... --out DIR``: refuse any run option beside it, merge, say what was written."""
    given = [
        p for p in ctx.command.params
        if p.name not in MERGE_OPTIONS and getattr(ctx.get_parameter_source(p.name), "name", "DEFAULT") != "DEFAULT"
    ]  # fmt: skip
    if given:
        names = ", ".join(p.name.upper() if p.param_type_name == "argument" else p.opts[0] for p in given)
        raise OptionError(
            f"--merge takes the shard folders, --out and --overwrite only (the run's settings come from the shards); "
            f"drop {names}"
        )
    data = merge_shards(folders, out, overwrite)
    for s in data["summary"]:
        console.print(
            f"{s['press']:<28} ratio {s['ratio']:.2f}  accuracy {s['accuracy']:.2f} [{s['low']:.2f}, {s['high']:.2f}]"
            f"  cache {s['cache_bytes'] / 2**20:.2f} MiB",
            highlight=False, markup=False, soft_wrap=True,
        )  # fmt: skip
    console.print(
        f"merged {len(folders)} shards ({data['items']} items) into {out}: wrote {out / ROWS_FILE}, "
        f"{out / 'compress.json'}, {out / 'compress.png'}, {out / 'report.html'}",
        highlight=False, markup=False, soft_wrap=True,
    )  # fmt: skip


def _compress(
    ranks: Any,
    model: str,
    presses: list[tuple[str, float, Any]],
    tasks: list[str],
    fp: dict[str, Any],
    out: Path,
    atlas: Path | None,
    limit: int,
    steps: int | None,
    max_new_tokens: str,
    prefill: str,
    allow_overlap: bool,
    overwrite: bool,
    resume: bool,
    part: tuple[int, int] | None,
    dtype: str,
    device: str,
    where: dict[str, Any],
    progress: bool,
) -> None:
    from ..edits import load_atlas
    from ..evaluation import heldout
    from ..models import load_model, max_positions
    from ..parallel import owner, sharing, split_work
    from ..presses.base import check_model
    from ..rundir import lock, write_text
    from .evaluate import _checks

    lead = ranks is None or ranks.leader
    together = ranks.together if ranks is not None else (lambda step: step())
    together(lambda: check_out(out, fp, overwrite, resume) if lead else None)  # before the model loads
    atlas_obj = load_atlas(atlas) if atlas is not None else None
    atlas_side = heldout.from_description((getattr(atlas_obj, "meta", None) or {}).get("corpus"))
    exclude = [atlas_side.as_exclude()] if atlas_obj is not None and atlas_side.recorded else None
    checks: list = []
    per_task: dict[str, list[dict[str, Any]]] = {}
    for spec in tasks:  # task files are read (and checked against the atlas) before the model loads
        if _is_file_task(spec):
            per_task[spec] = load_items(spec, None, limit, None)
            if atlas_obj is not None:
                side = heldout.from_items([it["info"] for it in per_task[spec]], f"task {spec}")
                checks.append(heldout.check(atlas_side, side, allow_overlap))
    loaded = load_model(model, dtype=dtype, device=device, **where)
    check_model(loaded.model)
    limit_tokens = max_positions(loaded.model.config)
    for spec in tasks:
        if spec not in per_task:  # RULER-style: generated for this tokenizer, avoiding the atlas's corpus
            per_task[spec] = load_items(spec, loaded.tokenizer, limit, limit_tokens, exclude)
            if atlas_obj is not None:
                side = heldout.from_items([it["info"] for it in per_task[spec]], f"task {spec}")
                checks.append(heldout.check(atlas_side, side, allow_overlap))
    items = interleave([per_task[spec] for spec in tasks])
    lengths: dict[tuple[str, str], int] = {}
    for item in items:
        n = len(loaded.tokenizer(item["prompt"])["input_ids"])
        lengths[item_key(item)] = n
        new = steps if steps is not None else answer_steps(loaded.tokenizer, item["answers"])
        if limit_tokens is not None and n + new > limit_tokens:
            raise TaskError(
                f"--task item {item['id']}: {n} tokens + {new} new tokens exceed the model's limit of "
                f"{limit_tokens} positions; use a shorter context or fewer --max-new-tokens"
            )
    if part is not None:
        items = shard_items(items, part)
    for _, _, built in presses:
        built.bind(loaded.model)
    if ranks is not None:  # every rank runs the same command on the same items, or none starts
        mine = {**fp, "items": items_signature(items), "--out": str(out.resolve()), "--resume": resume}
        together(lambda: ranks.agree_on(mine, "compress"))
    if atlas_obj is not None and lead:
        _checks(checks, atlas_obj)
    runs = with_full(presses)

    say: Callable[[str], None] = (
        (lambda text: console.print(text, highlight=False, markup=False, soft_wrap=True))
        if lead
        else (lambda text: None)
    )
    # one writer per output folder (rank 0's lock); the ranks write only their own rank folders
    with lock(out, command=_command_line()) if lead else nullcontext():
        kept = together(lambda: start_rows(out, fp, runs, items, lengths, overwrite, resume) if lead else {})
        kept_keys = set(kept) if ranks is None else ranks.gather(set(kept) if lead else None)[0]
        todo = [it for it in items if item_key(it) not in kept_keys]
        if resume:
            say(f"resuming {out}: {len(items) - len(todo)} of {len(items)} items done, {len(todo)} to go")
        new: dict[tuple[str, str], list[dict[str, Any]]] = {}
        mine_file = out / RANK_DIR.format(rank=ranks.rank, world=ranks.world) / ROWS_FILE if ranks else None
        share = len(todo) if ranks is None else sum(owner(k, ranks.world) == ranks.rank for k in range(len(todo)))

        with _progress_bar(progress and lead, share) as step:

            def compute(item: dict[str, Any]) -> list[dict[str, Any]]:
                rows = item_rows(loaded.model, loaded.tokenizer, runs, item, steps, prefill)
                new[item_key(item)] = rows
                if mine_file is None:  # one process: the whole table so far, after every item
                    write_rows(out / ROWS_FILE, ordered_rows(items, {**kept, **new}))
                else:  # a rank: its own finished items, in its own folder
                    mine_file.parent.mkdir(exist_ok=True)
                    write_rows(mine_file, ordered_rows(items, new))
                step(len(new), share)
                return rows

            try:
                with sharing(ranks):
                    done = split_work(todo, compute, "item") if todo else []
            except KeyboardInterrupt:
                if lead:
                    err_print(
                        f"headmap: stopped after {len(kept) + len(new)} of {len(items)} items; {out / ROWS_FILE} "
                        "keeps them: run the same command with --resume to continue"
                    )
                raise
        if not lead:
            return
        rows = ordered_rows(items, {**kept, **dict(zip(map(item_key, todo), done, strict=True))})
        target = write_rows(out / ROWS_FILE, rows)
        remove_rank_folders(out)
        meta = {
            "tasks": tasks,
            "items": len(items),
            "max_new_tokens": max_new_tokens,
            "prefill": prefill,
            "timing": TIMING[prefill],
            "held_out": [c.as_dict() for c in checks] if atlas_obj is not None else "not checked: no --atlas",
        }
        if part is not None:
            meta["shard"] = f"{part[0]}/{part[1]}"
        summary = summarize(rows)
        task_text = " + ".join(tasks)
        write_text(
            out / "compress.json",
            json.dumps({"model": loaded.model_id, "task": task_text, **meta, "summary": summary}, indent=2),
        )
        plot(summary, out / "compress.png")
        for s in summary:
            say(
                f"{s['press']:<28} ratio {s['ratio']:.2f}  accuracy {s['accuracy']:.2f} [{s['low']:.2f}, "
                f"{s['high']:.2f}]  cache {s['cache_bytes'] / 2**20:.2f} MiB  prefill {s['prefill_s']:.3f} s"
                f"  decode {1000 * s['decode_s_per_token']:.1f} ms/token"
            )
        say(f"wrote {target}, {out / 'compress.json'}, {out / 'compress.png'}")
        from ..report import write_compress_report

        page = write_compress_report(out)  # the scan's report with a compress section when --out is a scan run
        say(f"wrote {page}")


def _command_line() -> str:
    from ..rundir import command_line

    return command_line()


def err_print(text: str) -> None:
    from .app import err

    err.print(text, highlight=False, markup=False, soft_wrap=True)
