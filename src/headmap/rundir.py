"""Run folders: what headmap may write into an output folder, the checks made before any work,
and atomic writes.

Every command that writes (scan, eval, tune, report) checks its output place here before it loads
a model, and writes each file through a temporary file renamed into place. Nothing here knows
what the files hold.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import OutputError

#: Folder of an interrupted scan's checkpoint inside a run folder.
CHECKPOINT_DIR = ".headmap-checkpoint"
#: The checkpoint's progress file (JSON), readable without numpy.
PROGRESS_FILE = "progress.json"
#: Every file (or folder) headmap may write into a run folder; nothing else is ever removed.
RUN_FILES = ("heads.parquet", "tokens.parquet", "maps.parquet", "meta.json", "report.html", CHECKPOINT_DIR)


def progress_summary(folder: Path) -> str | None:
    """'12 of 40 inputs' from a checkpoint's progress.json, or None when it cannot be read."""
    try:
        progress = json.loads((Path(folder) / CHECKPOINT_DIR / PROGRESS_FILE).read_text(encoding="utf-8"))
        return f"{int(progress['inputs_done'])} of {int(progress['inputs_total'])} inputs done"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_output_folder(folder: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse a folder that holds another run (unless ``overwrite``) or that is not a folder.

    An interrupted scan (a ``.headmap-checkpoint`` folder) counts as a run. With ``resume`` the
    run in the folder is not refused here: the scan compares it with itself before it starts.
    """
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--out {folder} is a file, not a folder; choose a folder path")
    if not folder.exists():
        parent = folder.resolve().parent
        while not parent.exists():
            parent = parent.parent
        if not os.access(parent, os.W_OK):
            raise OutputError(f"cannot create --out {folder}: {parent} is not writable")
        return
    if not os.access(folder, os.W_OK):
        raise OutputError(f"--out {folder} is not writable; choose another folder")
    if overwrite or resume:
        return
    if (folder / CHECKPOINT_DIR).exists():
        done = progress_summary(folder)
        raise OutputError(
            f"--out {folder} holds an interrupted scan ({CHECKPOINT_DIR}{', ' + done if done else ''}); "
            "pass --resume to continue it, --overwrite to start over, or choose another folder"
        )
    ours = [name for name in RUN_FILES if (folder / name).exists()]
    if ours:
        raise OutputError(
            f"--out {folder} already holds a headmap run ({', '.join(ours)}); pass --overwrite to replace "
            "it or choose another folder"
        )


def write_text(path: Path, text: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def check_writable(path: Path, option: str = "--out") -> None:
    """Refuse an output place that cannot be written, before any work (one line: what and why).

    ``path`` is a folder or a file that will be created or replaced. The nearest existing folder is
    tried with a real temporary file, since permission bits alone do not tell (``/proc``, a read-only
    mount, a dangling link). Nothing is left behind.
    """
    path = Path(path)
    if os.path.islink(path) and not path.exists():
        raise OutputError(
            f"{option} {path} is a link to {os.readlink(path)}, which does not exist; choose another path"
        )
    probe_dir = path if path.is_dir() else path.parent
    while not probe_dir.exists():
        if os.path.islink(probe_dir):
            raise OutputError(f"{option} {path}: {probe_dir} is a dangling link; choose another path")
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise OutputError(f"{option} {path}: {probe_dir} is a file, not a folder; choose another path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".headmap-write-test.", dir=probe_dir)
    except OSError as exc:
        raise OutputError(f"cannot write {option} {path}: {probe_dir} is not writable ({exc.strerror})") from None
    os.close(fd)
    os.unlink(tmp)
