"""``headmap explain``'s library half: read the texts, check everything, explain, write the tables.

Order: the options and --out are checked before the model loads; the target and the methods after
(they need the tokenizer and the model), before any attribution. The tables are written at the end,
each through a temporary file renamed into place, so a failure leaves what was in --out as it was.

Resumable: while it runs, every finished batch of texts is written at once into
``<out>/.headmap-explain/`` (``batch-NNNNNN.parquet``, its attribution rows, then ``batch-NNNNNN.json``,
its per-input faithfulness numbers; a batch counts as done when both are there), after a
``fingerprint.json`` of what decides the rows (:func:`fingerprint`) written before the first batch.
A stopped run keeps its finished batches; ``--resume`` compares the fingerprint (a difference is one
line naming the field), skips those batches and computes the others: the tables equal an
uninterrupted run's, since every batch is formed and computed as one process forms it, and the
random-order control of each batch is drawn after the draws of the batches before it. The folder
goes once the tables are written.

Data parallel: under ``torchrun --nproc-per-node N -m headmap explain ...`` every rank loads the
model and plans the run, the ranks compare fingerprints before any work, each rank explains its
share of the batches (:func:`headmap.parallel.split_work`: batch ``i`` on rank ``i mod N``) and
writes each into the same checkpoint folder as it finishes, and rank 0 gathers every batch over
``torch.distributed`` and writes the one run folder. A checkpoint is of batches, not of ranks, so
``--resume`` may use another number of ranks (or one process).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import CorpusError, OptionError, OutputError
from ..models import load_model, weights_signature
from ..parallel import Ranks, sharing
from ..rundir import check_writable, os_error_text, write_file, write_text
from .api import METHODS, BatchResult, Plan, _pad, merge, plan, resolve_methods, run_batches
from .base import make_job
from .integrated_gradients import IntegratedGradients
from .occlusion import Occlusion
from .page import write_page

#: What ``headmap explain`` writes into --out (and the only files it replaces there).
FILES = ("attributions.parquet", "faithfulness.parquet", "explain.json", "explain.html")


@dataclass
class ExplainRun:
    attributions: pd.DataFrame
    faithfulness: pd.DataFrame
    meta: dict
    written: list[Path]
    lead: bool = True  # False on ranks other than 0 of a data-parallel run: they write nothing


def read_texts(text: Sequence[str] | None, corpus: Path | None) -> list[str]:
    """The --text values, or the non-blank lines of --corpus (exactly one of the two)."""
    if bool(text) == (corpus is not None):
        raise OptionError("give the inputs with --text TEXT (repeatable) or --corpus FILE, one of the two")
    if text:
        return list(text)
    path = Path(corpus)
    if not path.is_file():
        raise CorpusError(f"--corpus {path}: no such file; give a UTF-8 text file, one input per line")
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise CorpusError(f"--corpus {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not lines:
        raise CorpusError(f"--corpus {path} holds no text; write one input per line")
    return lines


def parse_methods(
    spec: str, steps: int, occlusion_window: int | None = None, occlusion_stride: int | None = None
) -> list:
    """The methods of --methods: integrated_gradients with --steps, occlusion with --occlusion-window and
    --occlusion-stride (refused without occlusion in --methods, where they would do nothing)."""
    names = [m.strip() for m in spec.split(",") if m.strip()]
    if not names:
        raise OptionError(f"--methods is empty; use some of: {', '.join(METHODS)}")
    window, stride = occlusion_window, occlusion_stride
    given = [f for f, v in (("--occlusion-window", window), ("--occlusion-stride", stride)) if v is not None]
    if given and "occlusion" not in names:
        raise OptionError(
            f"{' and '.join(given)} set occlusion's windows, but --methods has no occlusion; add it or drop them"
        )
    if window is not None and window < 1:
        raise OptionError(
            f"--occlusion-window must be at least 1 token (got {window}); 1 is leave-one-token-out, "
            "a few hundred makes 16K tokens affordable"
        )
    window = 1 if window is None else window
    if stride is not None and stride < 1:
        raise OptionError(f"--occlusion-stride must be at least 1 token (got {stride}); leave it out to use the window")
    if stride is not None and stride > window:
        raise OptionError(
            f"--occlusion-stride {stride} is longer than --occlusion-window {window}, which leaves tokens that no "
            "window covers; pass a stride of at most the window (left out, it is the window)"
        )

    def make(name: str):
        if name == "integrated_gradients":
            return IntegratedGradients(steps=steps)
        if name == "occlusion":
            return Occlusion(window=window, stride=stride)
        return name

    return [make(n) for n in names]


#: Finished batches of an explanation in progress (see the module docstring).
CHECKPOINT = ".headmap-explain"
FINGERPRINT = "fingerprint.json"


def _batch_name(index: int) -> str:
    return f"batch-{index:06d}"


def check_out(out: Path, overwrite: bool, resume: bool = False) -> None:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder; choose a folder path")
    check_writable(out)
    if overwrite or resume:
        return
    if (out / CHECKPOINT / FINGERPRINT).is_file():
        done = len(_done_names(out / CHECKPOINT))
        raise OutputError(
            f"--out {out} holds an interrupted explanation ({CHECKPOINT}, {done} batch(es) done); pass --resume "
            "to continue it, --overwrite to start over, or choose another folder"
        )
    ours = [name for name in FILES if (out / name).exists()]
    if ours:
        raise OutputError(
            f"--out {out} already holds an explanation ({', '.join(ours)}); pass --overwrite to replace it "
            "(--resume to finish it if it was stopped) or choose another folder"
        )


# -- what decides the rows, and the finished batches on disk -------------------------------------------


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(
    loaded: Any,
    work: Plan,
    texts: Sequence[str],
    dtype: str,
    device: str,
    max_length: int | None,
    limit: int | None,
    seed: int,
) -> dict[str, Any]:
    """What decides an explanation's rows, field by field: the model (class, config and a sample of its
    weights), dtype, device, the methods with their parameters, the target, the texts (their count and a
    SHA-256 of the texts and of their token ids as cut), --max-length, --limit, --batch-size (the padding of
    a batch), --seed (the random-order control) and the software versions."""
    software = {}
    for pkg in ("headmap", "torch", "transformers"):
        try:
            software[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            software[pkg] = None
    model = loaded.model
    fp = {
        "model": {
            "id": loaded.model_id,
            "class": type(model).__name__,
            "config": _sha(model.config.to_dict())[:16],
            "weights": weights_signature(model)[:16],
        },
        "dtype": dtype,
        "device": device,
        "methods": [{"name": m.name, "params": m.params()} for m in work.chosen],
        "target": work.goal.spec,
        "texts": {"count": len(texts), "sha256": _sha(list(texts))[:16], "tokens": _sha(work.rows)[:16]},
        "max_length": max_length,
        "limit": limit,
        "batch_size": work.batch_size,
        "seed": seed,
        "software": software,
    }
    return json.loads(json.dumps(fp, default=str))  # the form it has after a round trip through disk


FIELD_NAMES = {"max_length": "--max-length", "limit": "--limit", "batch_size": "--batch-size", "seed": "--seed"}
#: the command-line option of a method's parameter, named when only parameters of the same methods differ
PARAM_OPTIONS = {
    ("integrated_gradients", "steps"): "--steps",
    ("occlusion", "window"): "--occlusion-window",
    ("occlusion", "stride"): "--occlusion-stride",
}
#: the value of a parameter a method leaves out of its params() (occlusion's, when leave-one-out)
LEFT_OUT = {("occlusion", "window"): 1, ("occlusion", "stride"): 1}


def differences(old: dict[str, Any], new: dict[str, Any], theirs: str = "the checkpoint") -> list[str]:
    """One phrase per field of ``new`` that ``old`` differs in (the model's id excepted: the same weights
    from another path are the same model)."""
    out = []
    for key, value in new.items():
        mine, was = value, old.get(key)
        if key == "model" and isinstance(was, dict):
            mine = {k: v for k, v in value.items() if k != "id"}
            was = {k: v for k, v in was.items() if k != "id"}
        if was != mine:
            detail = _param_changes(was, mine, theirs) if key == "methods" else None
            detail = detail or f"{theirs} has {_text(was)}, this run {_text(mine)}"
            out.append(f"{FIELD_NAMES.get(key, key)} differs ({detail})")
    return out


def _param_changes(old: Any, new: Any, theirs: str) -> str | None:
    """The parameters that differ between two lists of the same methods, by option where there is one
    (``--occlusion-window: the checkpoint has 1, this run 256``); None when the methods themselves differ."""
    try:
        if [m["name"] for m in old] != [m["name"] for m in new]:
            return None
        parts = []
        for was, mine in zip(old, new, strict=True):
            params_was, params_mine = was.get("params") or {}, mine.get("params") or {}
            for p in sorted(set(params_was) | set(params_mine)):
                unset = LEFT_OUT.get((mine["name"], p))
                a, b = params_was.get(p, unset), params_mine.get(p, unset)
                if a != b:
                    label = PARAM_OPTIONS.get((mine["name"], p), f"{mine['name']} {p}")
                    parts.append(f"{label}: {theirs} has {_text(a)}, this run {_text(b)}")
    except (TypeError, KeyError, AttributeError):  # a fingerprint of another form: the plain comparison
        return None
    return "; ".join(parts) or None


def _text(value: Any, limit: int = 100) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _done_names(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("batch-*.json") if (folder / f"{p.stem}.parquet").is_file())


def save_batch(folder: Path, result: BatchResult) -> None:
    """One finished batch: its rows, then its faithfulness numbers (the file that marks it done)."""
    name = _batch_name(result.index)
    folder.mkdir(parents=True, exist_ok=True)
    write_file(folder / f"{name}.parquet", lambda fh: result.frame.to_parquet(fh, index=False))
    record = {
        "index": result.index,
        "methods": result.methods,
        "curves": {
            m: {k: [np.asarray(r).tolist() for r in rows] for k, rows in c.items()} for m, c in result.curves.items()
        },
        "pairs": [[*key, vals] for key, vals in result.pairs.items()],
        "gaps": result.gaps,
    }
    write_text(folder / f"{name}.json", json.dumps(record) + "\n")  # floats as repr: they read back exactly


def read_batches(folder: Path, batches: int) -> dict[int, BatchResult]:
    """The finished batches in the checkpoint folder (of a run of ``batches`` batches)."""
    done: dict[int, BatchResult] = {}
    for name in _done_names(folder):
        try:
            record = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
            index = int(record["index"])
            if _batch_name(index) != name or not 0 <= index < batches:
                raise ValueError(f"batch {index} in a file named {name}, of {batches} batches")
            frame = pd.read_parquet(folder / f"{name}.parquet")
            curves = {
                m: {k: [np.asarray(r, dtype=np.float64) for r in rows] for k, rows in c.items()}
                for m, c in record["curves"].items()
            }
            pairs = {(a, metric, b): [float(v) for v in vals] for a, metric, b, vals in record["pairs"]}
            gaps = [float(g) for g in record["gaps"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise OutputError(
                f"the checkpoint {folder / name}.json is damaged ({exc}); add --overwrite to start over"
            ) from None
        done[index] = BatchResult(index, frame, curves, pairs, list(record["methods"]), gaps)
    return done


def read_fingerprint(folder: Path) -> dict[str, Any] | None:
    path = folder / FINGERPRINT
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OutputError(f"{path} is damaged ({exc}); add --overwrite to start over") from None


def remove_checkpoint(folder: Path) -> None:
    """Delete the files explain wrote into the checkpoint folder (temporaries too), then the folder if empty."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for path in folder.iterdir():
        name = path.name.lstrip(".")
        if (name.startswith("batch-") or name.startswith(FINGERPRINT)) and path.is_file() and not path.is_symlink():
            path.unlink()
    try:
        folder.rmdir()
    except OSError:
        pass  # it holds files explain did not write: leave them


def _write_parquet(path: Path, frame: pd.DataFrame) -> Path:
    return write_file(path, lambda fh: frame.to_parquet(fh, index=False))


def run_explain(
    model: str,
    text: Sequence[str] | None = None,
    corpus: Path | None = None,
    target: str = "next",
    methods: str = "rollout,attn_grad,saliency,integrated_gradients",
    steps: int = 32,
    dtype: str = "float32",
    device: str = "cpu",
    max_length: int | None = None,
    batch_size: int = 1,
    out: Path = Path("explain"),
    overwrite: bool = False,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    on_layer: Callable[[str, int, int], None] | None = None,
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    offload_folder: str | Path | None = None,
    resume: bool = False,
    limit: int | None = None,
    occlusion_window: int | None = None,
    occlusion_stride: int | None = None,
) -> ExplainRun:
    """Explain ``target`` on the texts with ``methods``; write attributions.parquet, faithfulness.parquet,
    explain.json and explain.html (token strips and deletion curves) into ``out``.

    ``progress(done, total)`` is called after each batch of texts. ``device_map``, ``max_memory``,
    ``offload_folder``: model parallel placement (:func:`headmap.load_model`). ``limit``: the first N texts.
    ``occlusion_window``, ``occlusion_stride``: occlusion's windows (:class:`~headmap.explain.Occlusion`;
    default leave-one-token-out).
    ``resume``: go on from the finished batches of a stopped run in ``out`` (see the module docstring);
    under torchrun the ranks share the batches and rank 0 writes (:attr:`ExplainRun.lead`)."""
    ranks = Ranks.start(device)
    try:
        return _run_explain(
            ranks, model, text, corpus, target, methods, steps, dtype, device, max_length, batch_size, Path(out),
            overwrite, seed, progress, on_layer,
            {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}, resume, limit,
            (occlusion_window, occlusion_stride),
        )  # fmt: skip
    finally:
        if ranks is not None:
            ranks.close()


def _run_explain(
    ranks: Ranks | None,
    model: str,
    text: Sequence[str] | None,
    corpus: Path | None,
    target: str,
    methods: str,
    steps: int,
    dtype: str,
    device: str,
    max_length: int | None,
    batch_size: int,
    out: Path,
    overwrite: bool,
    seed: int,
    progress: Callable[[int, int], None] | None,
    on_layer: Callable[[str, int, int], None] | None,
    placed: dict[str, Any],
    resume: bool,
    limit: int | None,
    occlusion: tuple[int | None, int | None] = (None, None),
) -> ExplainRun:
    texts = read_texts(text, corpus)
    if limit is not None:
        if limit < 1:
            raise OptionError(f"--limit must be at least 1 (got {limit})")
        texts = texts[:limit]
    chosen = resolve_methods(parse_methods(methods, steps, *occlusion))
    if max_length is not None and max_length < 1:
        raise OptionError(f"--max-length must be at least 1 (got {max_length})")
    if batch_size < 1:
        raise OptionError(f"--batch-size must be at least 1 (got {batch_size})")
    check_out(out, overwrite, resume)
    lead = ranks is None or ranks.leader
    loaded = load_model(model, dtype=dtype, device=ranks.device(device) if ranks else device, **placed)
    work = plan(loaded.model, loaded.tokenizer, texts, target, chosen, batch_size, max_length, stacklevel=4)
    trial = make_job(loaded.model, work.goal, [work.rows[0][:1]], _pad(loaded.model, loaded.tokenizer))
    for method in work.chosen:  # a method that does not apply fails here, before anything is written
        method.check(trial)
    fp = fingerprint(loaded, work, texts, dtype, device, max_length, limit, seed)
    if ranks is not None:
        ranks.agree_on({**fp, "--out": str(out.resolve()), "--resume": resume}, "explain")
    folder = out / CHECKPOINT
    batches = len(work.starts)

    def start() -> tuple[dict[int, BatchResult], ExplainRun | None]:
        done, finished = _resume_point(out, folder, fp, batches, resume, overwrite)
        if finished is None and lead:
            if not done:  # a new run: the fingerprint first, then the batches
                remove_checkpoint(folder)
                _guard(lambda: folder.mkdir(parents=True, exist_ok=True), out)
                _guard(lambda: write_text(folder / FINGERPRINT, json.dumps(fp, indent=2) + "\n"), out)
        return done, finished

    done, finished = start() if ranks is None else ranks.together(start)
    if finished is not None:
        return finished if lead else ExplainRun(finished.attributions, finished.faithfulness, finished.meta, [], False)
    if ranks is not None:
        ranks.barrier()  # the checkpoint folder and its fingerprint exist before any rank writes a batch
    started = time.perf_counter()
    count = [sum(len(work.batch(i)) for i in done)]

    def step(n: int) -> None:
        count[0] += n
        if progress is not None:
            progress(count[0], len(texts))

    def keep(result: BatchResult) -> None:
        _guard(lambda: save_batch(folder, result), out)

    with sharing(ranks):
        results = run_batches(
            loaded.model, loaded.tokenizer, work, seed, done, keep,
            progress=step if lead else None, on_layer=on_layer if lead else None,
        )  # fmt: skip
    attributions, faith = merge(work, results, seed)
    faithfulness = faith.frame()
    meta = {
        "model": loaded.model_id,
        "target": target,
        "methods": {m.name: m.params() for m in chosen},
        "inputs": len(texts),
        "tokens": int(attributions.groupby("method").size().iloc[0]),
        "dtype": dtype,
        "device": device,
        "max_length": max_length,
        "seed": seed,
        "wall_time_s": round(time.perf_counter() - started, 3),
        "integrated_gradients_gap": attributions.attrs.get("integrated_gradients_gap"),
        "limit": limit,
        "batches": batches,
        "resumed_batches": len(done),
        "ranks": 1 if ranks is None else ranks.world,
        "fingerprint": fp,
    }
    if not lead:
        return ExplainRun(attributions, faithfulness, meta, [], False)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        _write_parquet(out / "attributions.parquet", attributions),
        _write_parquet(out / "faithfulness.parquet", faithfulness),
        write_text(out / "explain.json", json.dumps(meta, indent=2, default=str) + "\n"),
        write_page(out / "explain.html", attributions, faithfulness, meta),
    ]
    remove_checkpoint(folder)
    return ExplainRun(attributions, faithfulness, meta, written)


def _guard(write: Callable[[], Any], out: Path) -> Any:
    """``write()``; an OSError (a full disk, a folder gone) is one OutputError, the batches written so far kept."""
    try:
        return write()
    except OSError as exc:
        raise OutputError(
            f"{os_error_text(exc, f'writing the checkpoint into {out / CHECKPOINT}')}; the batches written so "
            "far are kept: fix that and run again with --resume"
        ) from None


def _resume_point(
    out: Path, folder: Path, fp: dict[str, Any], batches: int, resume: bool, overwrite: bool
) -> tuple[dict[int, BatchResult], ExplainRun | None]:
    """(the finished batches to keep, the finished run when there is nothing left to do)."""
    if not resume:
        return {}, None
    old = read_fingerprint(folder)
    if old is None:
        meta_path = out / "explain.json"
        if not meta_path.is_file() or not (out / "attributions.parquet").is_file():
            return {}, None  # nothing to resume: a new run
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise OutputError(f"{meta_path} is damaged ({exc}); add --overwrite to start over") from None
        diffs = differences(meta.get("fingerprint") or {}, fp, "the finished explanation")
        if not diffs:
            written = [out / name for name in FILES if (out / name).exists()]
            frames = pd.read_parquet(out / "attributions.parquet"), pd.read_parquet(out / "faithfulness.parquet")
            return {}, ExplainRun(frames[0], frames[1], {**meta, "nothing_to_resume": True}, written)
        if overwrite:
            return {}, None
        raise OutputError(
            f"cannot resume in {out}: it holds a finished explanation of another run: {'; '.join(diffs)}; pass "
            "--overwrite to replace it or choose another folder"
        )
    diffs = differences(old, fp)
    if diffs:
        if overwrite:
            return {}, None
        done = len(_done_names(folder))
        raise OutputError(
            f"cannot resume the explanation in {out}: {'; '.join(diffs)}; its {done} finished batch(es) are kept: "
            "rerun the command that started it with --resume, or add --overwrite to start over"
        )
    return read_batches(folder, batches), None
