"""Checkpoints of a scan in progress, so that ``headmap scan --resume`` can finish it.

A scan with an output folder writes ``<out>/.headmap-checkpoint/`` at batch boundaries (at most
every ``checkpoint_every_s`` seconds, and once more when it is interrupted):

- ``checkpoint.npz``: every probe's :meth:`~headmap.probes.Probe.state_dict` (keys ``p<i>.<key>``)
  and a ``progress`` record (a JSON string): how many inputs of the corpus are done, the run's
  fingerprint, the layers seen, the time spent so far. ``--resume`` reads only this file.
- ``progress.json``: a copy of the progress record, for people.

The first checkpoint is written into a staging folder renamed into place, later ones file by file
through a temporary file flushed to disk and renamed into place, so a kill or a full disk at any
moment leaves either the previous checkpoint or the new one, never a partial folder; a write that
fails raises one OutputError and keeps the last good checkpoint. A checkpoint folder without its
state file (left by an older version) is ignored with a warning. Files are created with mode
``0666 & ~umask``. Inputs are processed in corpus
order and a checkpoint is taken only between batches, so a resumed scan skips the first
``inputs_done`` inputs, forms the same batches as a scan that never stopped and adds the same
numbers in the same order: its tables are bit-for-bit those of an uninterrupted run.

The *fingerprint* names everything that decides those numbers: the model (architecture and a
sample of every weight tensor), dtype, device, probes and their parameters, a hash of the token
ids of every input, ``max_length``, ``batch_size``, ``seed``, the engine's block budget and the
versions of headmap, torch and transformers. ``--resume`` refuses a checkpoint whose fingerprint
differs and names what differs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError, OutputError
from ..models import device_text, model_shape, weights_signature
from ..rundir import (
    CHECKPOINT_DIR,
    CHECKPOINT_FILE,
    PROGRESS_FILE,
    STAGE_MARK,
    fsync_dir,
    make_dir,
    os_error_text,
    staging_name,
    write_file,
)

STATE_FILE = CHECKPOINT_FILE
FORMAT = "headmap-checkpoint/1"
DEFAULT_EVERY_S = 30.0


@dataclass
class Checkpoint:
    """A checkpoint as read from disk."""

    done: int
    total: int
    fingerprint: dict[str, Any]
    states: list[dict[str, np.ndarray]]
    extra: dict[str, Any] = field(default_factory=dict)


# -- fingerprint ---------------------------------------------------------------------------------


def corpus_signature(samples: Sequence[Any]) -> str:
    """sha256 over the token ids of every input, in order (precomputed by streamed file corpora), and the
    processor's tensors of an image corpus."""
    known = getattr(samples, "signature", None)
    if known is not None:
        return known
    parts = getattr(samples, "parts", None)
    if parts is not None and all(getattr(p, "signature", None) for p in parts):
        digest = hashlib.sha256()
        for p in parts:
            digest.update(p.signature.encode())
        return digest.hexdigest()
    digest = hashlib.sha256()
    for sample in samples:
        ids = np.asarray(sample.ids, dtype=np.int64)
        digest.update(np.int64(len(ids)).tobytes())
        digest.update(ids.tobytes())
        # an image corpus: the pictures as the model sees them (text inputs hash as they always did)
        for key, value in sorted((getattr(sample, "info", None) or {}).get("model_inputs", {}).items()):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _config_counts(config: Any) -> dict[str, Any]:
    """Layers, heads and kv heads for the fingerprint (None each when the config does not say)."""
    try:
        return model_shape(config)._asdict()
    except ModelError:
        return {"layers": None, "heads": None, "kv_heads": None}


def fingerprint(
    loaded: Any,
    probes: Sequence[Any],
    corpus: Any,
    max_length: int,
    batch_size: int,
    seed: int,
    budget_bytes: int,
) -> dict[str, Any]:
    """What decides a scan's numbers (see the module docstring), as plain JSON data."""
    model = loaded.model
    param = next(model.parameters())
    versions = {}
    for pkg in ("headmap", "torch", "transformers"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    desc = corpus.description
    fp = {
        "model": {
            "id": loaded.model_id,
            "model_type": getattr(model.config, "model_type", None),
            "class": type(model).__name__,
            **_config_counts(model.config),
            "weights": weights_signature(model),
        },
        "dtype": str(param.dtype).removeprefix("torch."),
        "device": device_text(model),
        "probes": [
            {"name": p.name, "class": f"{type(p).__module__}.{type(p).__qualname__}", "params": p.params()}
            for p in probes
        ],
        "corpus": {
            "name": desc.get("name", corpus.name),
            "kind": desc.get("kind"),
            "inputs": len(corpus.samples),
            "tokens": desc.get("tokens", sum(len(s.ids) for s in corpus.samples)),
            "sha256": corpus_signature(corpus.samples),
        },
        "options": {"max_length": max_length, "batch_size": batch_size, "seed": seed},
        "engine": {"budget_bytes": int(budget_bytes)},
        "software": versions,
    }
    return json.loads(json.dumps(fp, default=str))  # the form it has after a round trip through disk


def _short(digest: Any) -> str:
    return str(digest)[:12] if digest else "?"


def _model_text(m: dict[str, Any]) -> str:
    return (
        f"{m.get('id')} ({m.get('model_type')}, {m.get('layers')} layers x {m.get('heads')} heads, "
        f"weights {_short(m.get('weights'))})"
    )


def _probes_text(probes: list[dict[str, Any]]) -> str:
    parts = []
    for p in probes:
        params = ", ".join(f"{k}={v}" for k, v in (p.get("params") or {}).items())
        parts.append(f"{p.get('name')}({params})" if params else str(p.get("name")))
    return ", ".join(parts) or "none"


def _corpus_text(c: dict[str, Any]) -> str:
    return f"'{c.get('name')}' ({c.get('inputs')} inputs, {c.get('tokens')} tokens, sha256 {_short(c.get('sha256'))})"


def _shard_text(shard: Any) -> str:
    return f"{shard.get('index')}/{shard.get('count')}" if isinstance(shard, dict) else "the whole corpus"


def differences(old: dict[str, Any] | None, new: dict[str, Any], theirs: str = "checkpoint") -> list[str]:
    """What differs between the fingerprint ``old`` of ``theirs`` and this run's ``new``, one phrase each."""
    old = old if isinstance(old, dict) else {}
    out: list[str] = []

    def differ(what: str, a: Any, b: Any) -> None:
        out.append(f"{what} differs: {theirs} has {a}, this run {b}")

    om, nm = old.get("model") or {}, new["model"]
    if {k: v for k, v in om.items() if k != "id"} != {k: v for k, v in nm.items() if k != "id"}:
        differ("model", _model_text(om), _model_text(nm))  # the same weights from another path are the same model
    for key in ("dtype", "device"):
        if old.get(key) != new[key]:
            differ(key, old.get(key), new[key])
    if old.get("probes") != new["probes"]:
        differ("probe set", _probes_text(old.get("probes") or []), _probes_text(new["probes"]))
    oc, nc = old.get("corpus") or {}, new["corpus"]
    if oc.get("sha256") != nc["sha256"]:
        differ("corpus", _corpus_text(oc), _corpus_text(nc))
    oo = old.get("options") or {}
    for key, value in new["options"].items():
        if oo.get(key) != value:
            differ(f"--{key.replace('_', '-')}", oo.get(key), value)
    if old.get("shard") != new.get("shard"):
        differ("shard (--shard or torchrun rank/world)", _shard_text(old.get("shard")), _shard_text(new.get("shard")))
    ob = (old.get("engine") or {}).get("budget_bytes")
    if ob != new["engine"]["budget_bytes"]:
        differ("engine block budget (bytes)", ob, new["engine"]["budget_bytes"])
    osw = old.get("software") or {}
    changed = [k for k, v in new["software"].items() if osw.get(k) != v]
    if changed:
        differ(
            "software",
            ", ".join(f"{k} {osw.get(k)}" for k in changed),
            ", ".join(f"{k} {new['software'][k]}" for k in changed),
        )
    return out


# -- on disk -------------------------------------------------------------------------------------


def write(
    folder: Path,
    done: int,
    total: int,
    fingerprint: dict[str, Any],
    states: Sequence[dict[str, np.ndarray]],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint of ``done`` completed inputs into ``folder/.headmap-checkpoint``.

    OutputError (one line: what and what to do) when it cannot be written; the previous checkpoint,
    if any, is then kept whole, and nothing partial is left.
    """
    folder = Path(folder)
    target = folder / CHECKPOINT_DIR
    progress = {
        "format": FORMAT,
        "inputs_done": int(done),
        "inputs_total": int(total),
        "probes": len(states),
        **(extra or {}),
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprint": fingerprint,
    }
    text = json.dumps(progress, indent=2, default=str) + "\n"
    arrays: dict[str, np.ndarray] = {"progress": np.array(text)}
    for i, state in enumerate(states):
        for key, value in state.items():
            arrays[f"p{i}.{key}"] = np.asarray(value)

    def fill(into: Path) -> None:
        write_file(into / STATE_FILE, lambda fh: np.savez(fh, **arrays))
        write_file(into / PROGRESS_FILE, lambda fh: fh.write(text.encode("utf-8")))

    stage = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if target.is_dir():
            fill(target)  # file by file: each rename leaves the previous file or the new one
            fsync_dir(target)
        else:  # the first one: a whole folder or nothing
            stage = make_dir(folder / staging_name(target))
            fill(stage)
            fsync_dir(stage)
            os.rename(stage, target)
            stage = None
            fsync_dir(folder)
    except OSError as exc:
        space = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        kept = "; the last checkpoint is kept" if (target / STATE_FILE).is_file() else ""
        fix = "free space and run again with --resume" if space else "fix that and run again with --resume"
        raise OutputError(f"{os_error_text(exc, f'writing the checkpoint into {folder}')}{kept}; {fix}") from None
    finally:
        if stage is not None and stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return target


def read(folder: Path) -> Checkpoint | None:
    """The checkpoint in ``folder``, None when there is none; OutputError when it is damaged."""
    target = Path(folder) / CHECKPOINT_DIR
    if not target.exists():
        return None
    path = target / STATE_FILE
    fix = "add --overwrite to discard it and start over"
    if not path.is_file():
        warnings.warn(
            f"ignoring {target}: it holds no {STATE_FILE} (a checkpoint that was never completely written)",
            stacklevel=3,
        )
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        progress = json.loads(str(arrays.pop("progress")))
        if progress.get("format") != FORMAT:
            raise ValueError(f"format {progress.get('format')!r}, expected {FORMAT}")
        states: list[dict[str, np.ndarray]] = [{} for _ in range(int(progress["probes"]))]
        for key, value in arrays.items():
            index, _, name = key.partition(".")
            states[int(index.removeprefix("p"))][name] = value
        done, total = int(progress.pop("inputs_done")), int(progress.pop("inputs_total"))
        fp = progress.pop("fingerprint")
    except (OSError, ValueError, KeyError, TypeError, IndexError, zipfile.BadZipFile) as exc:
        raise OutputError(f"the checkpoint {path} is damaged ({exc}); {fix}") from exc
    return Checkpoint(done, total, fp, states, progress)


def _ours(name: str) -> bool:
    return name in (STATE_FILE, PROGRESS_FILE) or name.startswith((f".{STATE_FILE}.", f".{PROGRESS_FILE}."))


def remove(folder: Path) -> None:
    """Delete the files headmap wrote into the checkpoint folder, then the folder if nothing else is in it.

    Staging folders of a first checkpoint that a kill left behind go the same way.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    stages = [p for p in folder.iterdir() if p.name.startswith(f".{CHECKPOINT_DIR.lstrip('.')}{STAGE_MARK}")]
    for target in [folder / CHECKPOINT_DIR, *stages]:
        if not target.is_dir() or target.is_symlink():
            continue
        for path in target.iterdir():
            if _ours(path.name) and path.is_file() and not path.is_symlink():
                path.unlink()
        try:
            target.rmdir()
        except OSError:
            pass  # it holds files headmap did not write: leave them
