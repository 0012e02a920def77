"""Run folders: what headmap may write into an output folder, the checks made before any work,
the lock that keeps a second writer out, and writes that are never seen half done.

Every command that writes (scan, eval, tune, report) checks its output place here before it loads
a model. Files are created with mode ``0666 & ~umask`` (folders ``0777 & ~umask``), like any other
program's, so that a teammate can read a run.

- :func:`write_text` writes one file through a temporary file renamed into place.
- :func:`replacing` replaces a whole folder all or nothing: the new content is written into a
  staging folder beside it (``.<name>.headmap-stage-XXXX`` in the parent), then the two are swapped
  (``renameat2(RENAME_EXCHANGE)`` on Linux, ``renamex_np(RENAME_SWAP)`` on macOS, else two renames
  with recovery). Entries of the old folder that the caller does not own are carried over (files as
  hard links before the swap, folders moved after it); they are never deleted. When the folder
  cannot be swapped (a mount point, or a parent that cannot be written) the staging folder is made
  inside it and its files are renamed into place, ``meta.json``-like marker last.
- :func:`lock` takes an exclusive ``flock`` on ``<folder>/.headmap-lock`` (the folder is created
  when missing, and removed again on release if it is still empty). The lock file lives *inside*
  the run folder and is hard-linked into the staging folder before a swap, so the same lock file
  stays in place for the holder's whole run; it holds the holder (pid, host, start, command) and is
  removed on release. A second writer is refused with one line naming the holder.

A kill at the wrong moment can leave a staging folder beside the run folder: before the swap it
holds only the new run (and hard links), after it the old run and any foreign folder not yet moved
back. headmap never deletes such a folder itself; with the two-rename fallback a kill between the
renames leaves the old run under the staging name and no run folder.

Nothing here knows what the files hold.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shlex
import shutil
import socket
import stat
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from .errors import OutputError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

#: Folder of an interrupted scan's checkpoint inside a run folder.
CHECKPOINT_DIR = ".headmap-checkpoint"
#: The checkpoint's state file; a checkpoint folder without it is incomplete and ignored.
CHECKPOINT_FILE = "checkpoint.npz"
#: The checkpoint's progress file (JSON), readable without numpy.
PROGRESS_FILE = "progress.json"
#: The files of a finished run.
RUN_TABLES = ("heads.parquet", "tokens.parquet", "maps.parquet", "images.parquet")
#: Every file (or folder) of a run headmap may write into a run folder; nothing else is ever removed.
RUN_FILES = (*RUN_TABLES, "meta.json", "report.html", CHECKPOINT_DIR)
#: The lock file of a run folder (see :func:`lock`); not part of a run.
LOCK_FILE = ".headmap-lock"
#: Marks a staging folder (``.<name>.headmap-stage-XXXX``); not part of a run.
STAGE_MARK = ".headmap-stage-"
#: Every name headmap may create in a run folder, besides temporary files named ``.<name>.XXXX``.
HEADMAP_NAMES = (*RUN_FILES, LOCK_FILE)


def is_temporary(name: str, of: tuple[str, ...] | list[str]) -> bool:
    """Whether ``name`` is a temporary file of one of ``of`` (``.<name>.XXXX``) or a staging folder."""
    return STAGE_MARK in name or any(name.startswith(f".{base}.") for base in of)


def staging_name(target: Path) -> str:
    return f".{target.name.lstrip('.')}{STAGE_MARK}{secrets.token_hex(4)}"


def progress_summary(folder: Path) -> str | None:
    """'12 of 40 inputs' from a checkpoint's progress.json, or None when it cannot be read."""
    try:
        progress = json.loads((Path(folder) / CHECKPOINT_DIR / PROGRESS_FILE).read_text(encoding="utf-8"))
        return f"{int(progress['inputs_done'])} of {int(progress['inputs_total'])} inputs done"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def has_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds an interrupted scan's checkpoint (its state file, not just the folder)."""
    return (Path(folder) / CHECKPOINT_DIR / CHECKPOINT_FILE).is_file()


def check_output_folder(folder: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse a folder that holds another run (unless ``overwrite``), that is not a folder, or that cannot be written.

    An interrupted scan (a ``.headmap-checkpoint`` folder with its state file) counts as a run; a
    checkpoint folder without one (a write that failed) is ignored with a warning. With ``resume``
    the run in the folder is not refused here: the scan compares it with itself before it starts.
    """
    folder = Path(folder)
    if _exists(folder) and not folder.is_dir():
        raise OutputError(f"--out {folder} is a file, not a folder; choose a folder path")
    check_writable(folder)
    if not folder.exists():
        return
    check_unlocked(folder)
    if overwrite or resume:
        return
    if has_checkpoint(folder):
        done = progress_summary(folder)
        raise OutputError(
            f"--out {folder} holds an interrupted scan ({CHECKPOINT_DIR}{', ' + done if done else ''}); "
            "pass --resume to continue it, --overwrite to start over, or choose another folder"
        )
    if (folder / CHECKPOINT_DIR).is_dir():
        warnings.warn(  # attributed here, so that the check made again under the lock does not repeat it
            f"ignoring {folder / CHECKPOINT_DIR}: it holds no {CHECKPOINT_FILE} (a checkpoint that was never "
            "completely written)",
            stacklevel=1,
        )
    ours = [name for name in RUN_FILES if name != CHECKPOINT_DIR and (folder / name).exists()]
    if ours:
        raise OutputError(
            f"--out {folder} already holds a headmap run ({', '.join(ours)}); pass --overwrite to replace "
            "it or choose another folder"
        )


def _exists(path: Path) -> bool:
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG):
            return False
        raise OutputError(f"cannot look at {path} ({exc.strerror}); choose another path") from None
    return True


# -- files and folders created with the umask ----------------------------------------------------------


def temp_file(folder: Path, prefix: str) -> tuple[int, Path]:
    """Create a new empty file ``folder/<prefix>XXXX`` with mode ``0666 & ~umask``; returns (fd, path).

    ``tempfile.mkstemp`` would make it 0600, and the file keeps that mode when it is renamed into place.
    """
    for _ in range(100):
        path = Path(folder) / f"{prefix}{secrets.token_hex(4)}"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(folder))


def make_dir(path: Path) -> Path:
    """Create the folder ``path`` (not its parents) with mode ``0777 & ~umask``; FileExistsError if it exists."""
    os.mkdir(path, 0o777)
    return Path(path)


def write_file(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` atomically: ``write(fh)`` fills a temporary file beside it (mode ``0666 & ~umask``),
    which is flushed to disk and renamed into place; on any error the old file stays and no temporary
    is left. Every file headmap writes goes through here."""
    path = Path(path)
    fd, tmp = temp_file(path.parent, f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return path


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`write_file`)."""
    return write_file(path, lambda fh: fh.write(text.encode("utf-8")))


def fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (where the OS allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def os_error_text(exc: OSError, doing: str) -> str:
    """One phrase for an OSError: 'no space left on device while <doing>' (what the user can act on)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
        return f"{what} while {doing}"
    reason = exc.strerror or str(exc)
    return f"could not finish {doing} ({reason})"


def check_writable(path: Path, option: str = "--out") -> None:
    """Refuse an output place that cannot be written, before any work (one line: what and why).

    ``path`` is a folder or a file that will be created or replaced. The nearest existing folder is
    tried with a real temporary file, since permission bits alone do not tell (``/proc``, a read-only
    mount, a dangling link, a link loop). Nothing is left behind.
    """
    path = Path(path)
    if os.path.islink(path) and not _exists(path):
        raise OutputError(
            f"{option} {path} is a link to {os.readlink(path)}, which does not exist; choose another path"
        )
    probe_dir = path if path.is_dir() else path.parent
    while not _exists(probe_dir):
        if os.path.islink(probe_dir):
            raise OutputError(f"{option} {path}: {probe_dir} is a dangling link; choose another path")
        if probe_dir == probe_dir.parent:
            raise OutputError(f"{option} {path}: no folder of it exists; choose another path")
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise OutputError(f"{option} {path}: {probe_dir} is a file, not a folder; choose another path")
    try:
        fd, tmp = temp_file(probe_dir, ".headmap-write-test.")
    except OSError as exc:
        raise OutputError(
            f"cannot write {option} {path}: {probe_dir} is not writable ({exc.strerror or exc}); choose another path"
        ) from None
    os.close(fd)
    os.unlink(tmp)


# -- one writer at a time --------------------------------------------------------------------------------

_held: dict[str, list] = {}  # realpath of a locked folder -> [thread id, depth]
_held_guard = threading.Lock()


def command_line() -> str:
    """This process's command line, for the lock's holder record."""
    argv = list(sys.argv) or ["python"]
    argv[0] = Path(argv[0]).name or argv[0]
    return shlex.join(argv)


def lock_holder(folder: Path) -> str:
    """Who holds the lock of ``folder``, in words, from its lock file ('another process' when unreadable)."""
    try:
        info = json.loads((Path(folder) / LOCK_FILE).read_text(encoding="utf-8"))
        return f"pid {int(info['pid'])} on {info['host']} since {info['started']}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def lock(folder: Path, command: str | None = None) -> Iterator[Path]:
    """Hold the exclusive lock of the run folder ``folder`` (created when missing) while the body runs.

    The lock is ``flock`` on ``<folder>/.headmap-lock`` (non-blocking): a second writer, another
    process or another thread, gets an OutputError naming the holder (pid, host, start time and
    ``command``, default this process's command line). The same thread may take it again (nested
    calls, e.g. :meth:`Atlas.save` inside a scan). On release the lock file is removed, and the
    folder too if this call created it and it is empty.
    """
    folder = Path(folder)
    key = os.path.realpath(folder)
    me = threading.get_ident()
    with _held_guard:
        mine = _held.get(key)
        if mine is not None and mine[0] == me:
            mine[1] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield folder
        finally:
            with _held_guard:
                _held[key][1] -= 1
        return
    created = not _exists(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create --out {folder} ({exc.strerror or exc}); choose another folder") from None
    path = folder / LOCK_FILE
    fd = _acquire(folder, path)
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command if command is not None else command_line(),
    }
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
    except OSError:
        pass  # the lock holds without its record; a refused writer then reads 'another process'
    with _held_guard:
        _held[key] = [me, 1]
    try:
        yield folder
    finally:
        with _held_guard:
            _held.pop(key, None)
        try:
            if _same_file(path, fd):
                os.unlink(path)
        finally:
            os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: the scan failed before it wrote anything


def check_unlocked(folder: Path) -> None:
    """OutputError naming the holder when another writer (process or thread) holds the lock of ``folder``.

    Only looks: the lock file is neither created nor changed. The calling thread's own lock is no obstacle.
    """
    folder = Path(folder)
    with _held_guard:
        mine = _held.get(os.path.realpath(folder))
    if fcntl is None or (mine is not None and mine[0] == threading.get_ident()):
        return
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return  # no lock file: nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputError(_in_use(folder)) from None
    except OSError:
        pass
    finally:
        os.close(fd)


def _in_use(folder: Path) -> str:
    return (
        f"--out {folder} is in use by another headmap writer ({lock_holder(folder)}); wait until it ends or "
        "choose another folder"
    )


def _same_file(path: Path, fd: int) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _acquire(folder: Path, path: Path) -> int:
    if fcntl is None:  # pragma: no cover
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    for _ in range(50):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            raise OutputError(f"cannot lock --out {folder} ({exc.strerror or exc}); choose another folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(_in_use(folder)) from None
        except OSError as exc:  # a file system without flock: go on unlocked rather than refuse to work
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                return fd
            os.close(fd)
            raise OutputError(f"cannot lock --out {folder} ({exc.strerror or exc}); choose another folder") from None
        if _same_file(path, fd):
            return fd
        os.close(fd)  # the holder removed the file between our open and our lock: take the new one
    raise OutputError(f"cannot lock --out {folder}: its lock file keeps changing; try again")


# -- a finished run that appears while a scan runs -------------------------------------------------------------


def run_stamp(folder: Path) -> tuple[int, int, int, int] | None:
    """What identifies the finished run in ``folder`` (its meta.json's device, inode, size, mtime), or None."""
    try:
        st = os.stat(Path(folder) / "meta.json")
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def check_unchanged(folder: Path, stamp: tuple[int, int, int, int] | None, overwrite: bool) -> None:
    """Refuse to save over a finished run that appeared in ``folder`` after ``stamp`` was taken.

    (Unless ``overwrite``.) The lock keeps headmap writers out; this catches any other writer.
    """
    now = run_stamp(folder)
    if overwrite or now is None or now == stamp:
        return
    raise OutputError(
        f"--out {folder} now holds a finished run that another writer saved while this scan ran; it is left as "
        "it is and this scan's tables were not written: run again with another --out, or with --overwrite to "
        "replace that run"
    )


# -- replacing a folder all or nothing --------------------------------------------------------------------------


@contextlib.contextmanager
def replacing(target: Path, ours: Callable[[str], bool], last: str | None = None) -> Iterator[Path]:
    """Yield an empty staging folder; when the body returns, it becomes ``target`` all at once.

    ``ours(name)``: whether an entry of the old ``target`` belongs to what is being replaced (it is
    dropped); every other entry is carried into the new folder. If the body or the swap fails, the
    staging folder is removed and ``target`` is as it was. ``last``: the file that marks a complete
    folder, moved last when the folder must be replaced in place (a mount point, a parent that cannot
    be written). See the module docstring.
    """
    target = Path(os.path.abspath(target))  # '.' has no name to stage beside
    if target.is_symlink():
        target = target.resolve()  # replace the folder the link points to, not the link
    inside = _exists(target) and (
        os.path.ismount(target)
        or not os.access(target.parent, os.W_OK)
        or Path.cwd().resolve().is_relative_to(target.resolve())  # this process works inside it: keep it in place
    )
    where = target if inside else target.parent
    where.mkdir(parents=True, exist_ok=True)
    while True:
        stage = where / staging_name(target)
        try:
            make_dir(stage)
            break
        except FileExistsError:
            continue
    swapped: list[bool] = []
    try:
        yield stage
        fsync_dir(stage)
        if inside:
            _commit_in_place(stage, target, ours, last)
        else:
            _swap(stage, target, ours, swapped)
    except BaseException:
        if not swapped and _exists(stage):
            shutil.rmtree(stage, ignore_errors=True)  # new files and hard links only: the originals stay
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` atomically; False when this OS or file system cannot."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        call = libc.renameat2
        call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        rc = call(-100, os.fsencode(a), -100, os.fsencode(b), 2)  # AT_FDCWD, RENAME_EXCHANGE
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        call = libc.renamex_np
        call.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        rc = call(os.fsencode(a), os.fsencode(b), 2)  # RENAME_SWAP
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap(stage: Path, target: Path, ours: Callable[[str], bool], swapped: list[bool]) -> None:
    """Swap ``stage`` and ``target``, carry the foreign entries, clear the old folder; ``swapped`` marks the swap."""
    if not _exists(target):
        os.rename(stage, target)
        swapped.append(True)
        fsync_dir(target.parent)
        return
    with contextlib.suppress(OSError):
        os.chmod(stage, stat.S_IMODE(os.stat(target).st_mode))  # the folder keeps its permissions
    linked, moved = [], []
    for entry in os.scandir(target):
        if ours(entry.name) or entry.name == stage.name:
            continue
        if entry.is_file(follow_symlinks=False):
            try:
                os.link(entry.path, stage / entry.name, follow_symlinks=False)
                linked.append(entry.name)
                continue
            except OSError:
                pass
        moved.append(entry.name)
    if not _exchange(stage, target):
        old = target.parent / staging_name(target)
        os.rename(target, old)
        try:
            os.rename(stage, target)
        except BaseException:
            os.rename(old, target)  # recovery: the old folder goes back
            raise
        swapped.append(True)
        os.rename(old, stage)  # the old folder now sits where the stage was, as after an exchange
    else:
        swapped.append(True)
    fsync_dir(target.parent)
    old = stage  # holds the old folder from here on
    left = []
    for name in moved:
        try:
            os.rename(old / name, target / name)
        except OSError:
            left.append(name)
    for entry in list(os.scandir(old)):
        try:
            if entry.name in linked:
                if _same_inode(Path(entry.path), target / entry.name):
                    os.unlink(entry.path)
            elif ours(entry.name):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
        except OSError:
            pass
    try:
        old.rmdir()
    except OSError:
        warnings.warn(
            f"{target} was replaced, but some of its old entries could not be moved or removed; they are in {old}",
            stacklevel=4,
        )


def _same_inode(a: Path, b: Path) -> bool:
    try:
        sa, sb = os.stat(a, follow_symlinks=False), os.stat(b, follow_symlinks=False)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _commit_in_place(stage: Path, target: Path, ours: Callable[[str], bool], last: str | None) -> None:
    """Replace ``target``'s own entries by the staged ones, renaming ``last`` in last (a rename needs no space)."""
    if last is not None and (target / last).is_file():
        os.unlink(target / last)  # from here the folder is no complete run until the new marker is in
    new = sorted(os.listdir(stage), key=lambda n: n == last)
    for entry in os.scandir(target):
        if entry.name != stage.name and ours(entry.name) and entry.name not in new:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
    for name in new:
        os.replace(stage / name, target / name)
    stage.rmdir()
    fsync_dir(target)
