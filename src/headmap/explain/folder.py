"""``headmap explain``'s library half: read the texts, check everything, explain, write the tables.

Order: the options and --out are checked before the model loads; the target and the methods after
(they need the tokenizer and the model), before any attribution; the tables are written at the end,
each through a temporary file renamed into place, so a failure leaves what was in --out as it was.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..errors import CorpusError, OptionError, OutputError
from ..models import load_model
from ..rundir import check_writable, write_file, write_text
from .api import METHODS, explain_and_measure, resolve_methods
from .integrated_gradients import IntegratedGradients
from .page import write_page

#: What ``headmap explain`` writes into --out (and the only files it replaces there).
FILES = ("attributions.parquet", "faithfulness.parquet", "explain.json", "explain.html")


@dataclass
class ExplainRun:
    attributions: pd.DataFrame
    faithfulness: pd.DataFrame
    meta: dict
    written: list[Path]


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


def parse_methods(spec: str, steps: int) -> list:
    names = [m.strip() for m in spec.split(",") if m.strip()]
    if not names:
        raise OptionError(f"--methods is empty; use some of: {', '.join(METHODS)}")
    return [IntegratedGradients(steps=steps) if n == "integrated_gradients" else n for n in names]


def check_out(out: Path, overwrite: bool) -> None:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder; choose a folder path")
    check_writable(out)
    ours = [name for name in FILES if (out / name).exists()]
    if ours and not overwrite:
        raise OutputError(
            f"--out {out} already holds an explanation ({', '.join(ours)}); pass --overwrite to replace it "
            "or choose another folder"
        )


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
) -> ExplainRun:
    """Explain ``target`` on the texts with ``methods``; write attributions.parquet, faithfulness.parquet,
    explain.json and explain.html (token strips and deletion curves) into ``out``.

    ``progress(done, total)`` is called after each batch of texts. ``device_map``, ``max_memory``,
    ``offload_folder``: model parallel placement (:func:`headmap.load_model`)."""
    texts = read_texts(text, corpus)
    chosen = resolve_methods(parse_methods(methods, steps))
    if max_length is not None and max_length < 1:
        raise OptionError(f"--max-length must be at least 1 (got {max_length})")
    if batch_size < 1:
        raise OptionError(f"--batch-size must be at least 1 (got {batch_size})")
    out = Path(out)
    check_out(out, overwrite)
    placed = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
    loaded = load_model(model, dtype=dtype, device=device, **placed)
    started = time.perf_counter()
    done = [0]

    def step(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], len(texts))

    attributions, faith = explain_and_measure(
        loaded.model,
        loaded.tokenizer,
        texts,
        target=target,
        methods=chosen,
        batch_size=batch_size,
        max_length=max_length,
        progress=step,
        seed=seed,
        on_layer=on_layer,
    )
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
    }
    out.mkdir(parents=True, exist_ok=True)
    written = [
        _write_parquet(out / "attributions.parquet", attributions),
        _write_parquet(out / "faithfulness.parquet", faith),
        write_text(out / "explain.json", json.dumps(meta, indent=2, default=str) + "\n"),
        write_page(out / "explain.html", attributions, faith, meta),
    ]
    return ExplainRun(attributions, faith, meta, written)
