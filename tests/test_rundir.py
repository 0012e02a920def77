"""Run folders: created with the umask, replaced all or nothing, locked against a second writer.

Faults of issue 9: files made 0600; an ``--overwrite`` that fails while saving (disk full) leaving a
mixed folder that ``Atlas.load`` accepted; a full disk during a scan leaving an empty checkpoint
folder that blocked every rerun; ``--out /proc/...`` or a dangling link passing the start-up checks;
two scans into one ``--out`` at once. A full disk is simulated by making the writer raise
``OSError(ENOSPC)`` mid-save. Every wait on another process or thread is bounded.
"""

from __future__ import annotations

import errno
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from synthetic_atlas import make_atlas
from test_cli import assert_one_line_error, run
from test_resume import CKPT, Interrupt, assert_same_tables, snapshot
from transformers import LlamaForCausalLM

import headmap
from headmap import atlas as atlas_module
from headmap import rundir
from headmap.atlas import Atlas
from headmap.errors import OutputError, ScanInterrupted
from headmap.scan import checkpoint

WAIT_S = 60  # the bound on every wait for another process or thread


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("the cat sat on the mat\nand the dog sat on the log\nbirds fly south in winter\nrain again\n")
    return path


def scan(model_dir: Path, corpus: Path, out: Path, **kwargs):
    kwargs = {"probes": "sink", "batch_size": 2, "progress": False, **kwargs}
    return headmap.scan(str(model_dir), corpus=corpus, out=out, **kwargs)


class ENOSPC:
    """Replace ``owner.name`` by a function that raises OSError(ENOSPC) on its ``at``-th call."""

    def __init__(self, monkeypatch, owner, name: str, at: int = 1):
        self.calls = 0
        original = getattr(owner, name)

        def patched(*args, **kwargs):
            self.calls += 1
            if self.calls == at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, patched)


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*")]}


def umask(mask: int):
    class Umask:
        def __enter__(self):
            self.old = os.umask(mask)

        def __exit__(self, *exc):
            os.umask(self.old)

    return Umask()


# -- 1. modes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_run_and_checkpoint_files_honour_the_umask(
    tiny_llama_dir, corpus, tmp_path, monkeypatch, mask, file_mode, dir_mode
):
    run_dir, stopped = tmp_path / "run", tmp_path / "stopped"
    with umask(mask):
        scan(tiny_llama_dir, corpus, run_dir, probes="sink,attention_maps")
        scan(tiny_llama_dir, corpus, run_dir, overwrite=True)  # a replaced folder too
        with monkeypatch.context() as m, pytest.raises(ScanInterrupted):
            Interrupt(m, LlamaForCausalLM, "forward", at=3)  # the first checkpoint staged, the second file by file
            scan(tiny_llama_dir, corpus, stopped, checkpoint_every_s=0, batch_size=1)
    assert checkpoint.read(stopped).done == 2
    for folder in (run_dir, stopped):
        found = modes(folder)
        assert found == {k: dir_mode if (folder / k).is_dir() else file_mode for k in found}, found


def test_write_text_honours_the_umask(tmp_path):
    with umask(0o022):
        path = rundir.write_text(tmp_path / "a.txt", "x")
    assert path.stat().st_mode & 0o777 == 0o644


# -- 2. a run folder is replaced all or nothing -----------------------------------------------------------


@pytest.mark.parametrize("where", ["second table", "meta.json"])
def test_failed_overwrite_leaves_the_old_run_whole(tiny_llama_dir, corpus, tmp_path, monkeypatch, where):
    out = tmp_path / "run"
    scan(tiny_llama_dir, corpus, out)
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before, parent = snapshot(out), sorted(os.listdir(tmp_path))
    with monkeypatch.context() as m:
        if where == "meta.json":
            ENOSPC(m, atlas_module, "write_text")
        else:
            ENOSPC(m, pq, "write_table", at=2)  # heads.parquet written, maps.parquet not
        with pytest.raises(OutputError, match="no space left on device while saving the run into") as info:
            scan(tiny_llama_dir, corpus, out, probes="sink,attention_maps", overwrite=True, checkpoint_every_s=0)
    assert "is as it was" in str(info.value) and "free space" in str(info.value)
    assert snapshot(out) == before  # the old run whole, foreign files untouched, no stale checkpoint
    assert sorted(os.listdir(tmp_path)) == parent  # no staging debris
    assert sorted(os.listdir(out)) == ["heads.parquet", "meta.json", "notes.txt", "sub"]
    assert sorted(Atlas.load(out).heads.probe.unique()) == ["sink"]


def test_failed_overwrite_on_the_command_line(monkeypatch, capsys, tiny_llama_dir, corpus, tmp_path):
    out = tmp_path / "run"
    args = ["scan", str(tiny_llama_dir), "--corpus", str(corpus), "--probes", "sink", "--out", str(out)]
    assert run(monkeypatch, capsys, *args, "--no-progress")[0] == 0
    before = snapshot(out)
    with monkeypatch.context() as m:
        ENOSPC(m, pq, "write_table")
        code, _, err = run(monkeypatch, capsys, *args, "--overwrite", "--no-progress")
    assert_one_line_error(code, err, "no space left on device while saving the run into", str(out), "as it was")
    assert snapshot(out) == before
    code, _, err = run(monkeypatch, capsys, "report", str(out))
    assert code == 0, err


def test_overwrite_carries_foreign_files_and_the_folder_mode(tmp_path):
    out = tmp_path / "run"
    make_atlas(seed=0).save(out)
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\x00")
    (out / CKPT).mkdir()
    (out / CKPT / "README").write_text("not headmap's")
    (out / "report.html").write_text("old report")
    out.chmod(0o750)
    inode = (out / "notes.txt").stat().st_ino
    make_atlas(seed=1, tokens=False, map_samples=0).save(out, overwrite=True)
    assert sorted(os.listdir(out)) == [CKPT, "heads.parquet", "meta.json", "notes.txt", "sub"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "notes.txt").stat().st_ino == inode
    assert (out / "sub" / "data.bin").read_bytes() == b"\x00"
    assert (out / CKPT / "README").read_text() == "not headmap's"
    assert out.stat().st_mode & 0o777 == 0o750
    assert sorted(os.listdir(tmp_path)) == ["run"]
    pd.testing.assert_frame_equal(Atlas.load(out).heads, make_atlas(seed=1).heads)


@pytest.mark.parametrize("how", ["two renames", "in place"])
def test_replacing_without_an_atomic_exchange(tmp_path, monkeypatch, how):
    """Where the OS cannot swap two folders, or the folder cannot be swapped (a mount point)."""
    out = tmp_path / "run"
    make_atlas(seed=0).save(out)
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    if how == "two renames":
        monkeypatch.setattr(rundir, "_exchange", lambda a, b: False)
    else:
        monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == out)
    make_atlas(seed=1, tokens=False).save(out, overwrite=True)
    assert sorted(os.listdir(out)) == ["heads.parquet", "maps.parquet", "meta.json", "notes.txt", "sub"]
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["run"]
    pd.testing.assert_frame_equal(Atlas.load(out).heads, make_atlas(seed=1).heads)


def test_second_rename_failing_puts_the_old_folder_back(tmp_path, monkeypatch):
    out = tmp_path / "run"
    make_atlas(seed=0).save(out)
    before = snapshot(out)
    monkeypatch.setattr(rundir, "_exchange", lambda a, b: False)
    rename, calls = os.rename, []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the staged folder into place
            raise OSError(errno.EIO, "simulated")
        return rename(src, dst)

    monkeypatch.setattr(os, "rename", flaky)
    with pytest.raises(OutputError, match="simulated"):
        make_atlas(seed=1).save(out, overwrite=True)
    monkeypatch.setattr(os, "rename", rename)
    assert snapshot(out) == before and sorted(os.listdir(tmp_path)) == ["run"]


def test_load_refuses_a_mixed_folder(monkeypatch, capsys, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_atlas(seed=0).save(a)
    make_atlas(seed=1, tokens=False).save(b)
    assert json.loads((a / "meta.json").read_text())["tables"]["heads.parquet"]["bytes"] > 0
    mixed = tmp_path / "mixed"
    shutil.copytree(a, mixed)
    shutil.copy(b / "heads.parquet", mixed / "heads.parquet")  # new heads beside the old meta.json
    with pytest.raises(OutputError, match="heads.parquet is not the table its meta.json lists"):
        Atlas.load(mixed)
    code, _, err = run(monkeypatch, capsys, "report", str(mixed))
    assert_one_line_error(code, err, "is not the table its meta.json lists", "mixes the files of two runs")
    extra = tmp_path / "extra"
    shutil.copytree(b, extra)
    shutil.copy(a / "tokens.parquet", extra / "tokens.parquet")  # a table the run does not have
    with pytest.raises(OutputError, match="tokens.parquet is not part of the run"):
        Atlas.load(extra)
    gone = tmp_path / "gone"
    shutil.copytree(a, gone)
    (gone / "maps.parquet").unlink()
    with pytest.raises(OutputError, match="maps.parquet is missing"):
        Atlas.load(gone)


# -- 3. a full disk during a scan ---------------------------------------------------------------------------


def test_disk_full_while_checkpointing_keeps_the_last_good_one(monkeypatch, capsys, tiny_llama_dir, corpus, tmp_path):
    out = tmp_path / "run"
    args = ["scan", str(tiny_llama_dir), "--corpus", str(corpus), "--probes", "sink,entropy", "--batch-size", "1"]
    args += ["--out", str(out), "--no-progress"]
    with monkeypatch.context() as m:
        ENOSPC(m, checkpoint.np, "savez", at=2)  # the first checkpoint (1 input) is written, the second is not
        code, _, err = run(monkeypatch, capsys, *args, "--checkpoint-every", "0")
    assert_one_line_error(
        code,
        err,
        f"no space left on device while writing the checkpoint into {out}",
        "the last checkpoint is kept",
        "free space and run again with --resume",
    )
    assert checkpoint.read(out).done == 1
    assert sorted(os.listdir(out)) == [CKPT] and sorted(os.listdir(out / CKPT)) == ["checkpoint.npz", "progress.json"]
    code, _, err = run(monkeypatch, capsys, *args, "--resume")
    assert code == 0, err
    full = tmp_path / "full"
    code, _, err = run(monkeypatch, capsys, *args[:-3], "--out", str(full), "--no-progress")
    assert code == 0, err
    assert_same_tables(full, out)


def test_disk_full_at_the_first_checkpoint_leaves_no_folder(monkeypatch, capsys, tiny_llama_dir, corpus, tmp_path):
    out = tmp_path / "run"
    args = ["scan", str(tiny_llama_dir), "--corpus", str(corpus), "--probes", "sink", "--batch-size", "1"]
    args += ["--out", str(out), "--no-progress"]
    with monkeypatch.context() as m:
        ENOSPC(m, checkpoint.np, "savez", at=1)
        code, _, err = run(monkeypatch, capsys, *args, "--checkpoint-every", "0")
    assert_one_line_error(code, err, "no space left on device while writing the checkpoint", "--resume")
    assert not out.exists() or os.listdir(out) == []  # no empty checkpoint folder, no staging debris
    assert sorted(os.listdir(tmp_path)) in (["corpus.txt"], ["corpus.txt", "run"])
    code, _, err = run(monkeypatch, capsys, *args)  # a plain rerun is not blocked
    assert code == 0, err


def test_an_empty_checkpoint_folder_is_no_checkpoint(tiny_llama_dir, corpus, tmp_path):
    """What a full disk left behind before: it blocked both a plain rerun and --resume."""
    out = tmp_path / "run"
    (out / CKPT).mkdir(parents=True)
    with pytest.warns(UserWarning, match="ignoring .*holds no checkpoint.npz"):
        scan(tiny_llama_dir, corpus, out)
    assert sorted(os.listdir(out)) == ["heads.parquet", "meta.json"]
    other = tmp_path / "other"
    (other / CKPT).mkdir(parents=True)
    (other / CKPT / "progress.json").write_text("{}")
    with pytest.warns(UserWarning, match="ignoring"):
        scan(tiny_llama_dir, corpus, other, resume=True)
    assert sorted(os.listdir(other)) == ["heads.parquet", "meta.json"]


# -- 4. an output place that cannot be written ----------------------------------------------------------------


def unwritable_places(tmp_path: Path) -> dict[str, Path]:
    places = {}
    if Path("/proc").is_dir():
        places["proc"] = Path("/proc/headmap_run")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere" / "deeper")
    places["dangling link"] = dangling
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    places["link loop"] = loop
    afile = tmp_path / "afile"
    afile.write_text("x")
    places["under a file"] = afile / "run"
    return places


@pytest.mark.parametrize("case", ["proc", "dangling link", "link loop", "under a file"])
def test_unwritable_out_is_refused_before_the_model_loads(tiny_llama_dir, corpus, tmp_path, monkeypatch, case):
    place = unwritable_places(tmp_path).get(case)
    if place is None:
        pytest.skip("no /proc here")
    with pytest.raises(OutputError):
        rundir.check_output_folder(place, overwrite=False)

    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sys.modules["headmap.scan"], "load_model", boom, raising=False)
    monkeypatch.setattr(LlamaForCausalLM, "forward", boom)
    with pytest.raises(OutputError, match="--out"):
        scan(tiny_llama_dir, corpus, place)


def test_unwritable_out_on_the_command_line(monkeypatch, capsys, tiny_llama_dir, corpus, tmp_path):
    if not Path("/proc").is_dir():
        pytest.skip("no /proc here")
    code, _, err = run(monkeypatch, capsys, "scan", str(tiny_llama_dir), "--corpus", str(corpus), "--out", "/proc/x")
    assert_one_line_error(code, err, "/proc", "not writable")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    code, _, err = run(
        monkeypatch, capsys, "scan", str(tiny_llama_dir), "--corpus", str(corpus), "--out", str(dangling)
    )
    assert_one_line_error(code, err, str(dangling), "does not exist")


# -- 5. one writer at a time ------------------------------------------------------------------------------------

HOLDER = """
import sys
from pathlib import Path
from headmap import rundir
with rundir.lock(Path(sys.argv[1]), command="headmap scan --out elsewhere"):
    print("held", flush=True)
    sys.stdin.readline()
"""


class Holder:
    """Another process holding the lock of ``folder`` until it is closed."""

    def __init__(self, folder: Path):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(headmap.__file__).parents[1]), *sys.path]))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(folder)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        ready, _, _ = select.select([self.proc.stdout], [], [], WAIT_S)
        line = self.proc.stdout.readline() if ready else ""
        if line.strip() != "held":
            self.close()
            raise AssertionError(f"the holder did not take the lock: {self.proc.stderr.read()}")

    def close(self) -> None:
        try:
            self.proc.communicate(input="\n", timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate(timeout=WAIT_S)


def test_a_second_process_is_refused_naming_the_holder(monkeypatch, capsys, tiny_llama_dir, corpus, tmp_path):
    out = tmp_path / "run"
    holder = Holder(out)
    try:
        with pytest.raises(OutputError, match=f"in use by another headmap writer \\(pid {holder.proc.pid} on "):
            scan(tiny_llama_dir, corpus, out)
        args = ["scan", str(tiny_llama_dir), "--corpus", str(corpus), "--out", str(out), "--no-progress"]
        code, _, err = run(monkeypatch, capsys, *args)
        assert_one_line_error(code, err, f"--out {out} is in use", f"pid {holder.proc.pid}", "--out elsewhere")
        assert os.listdir(out) == [rundir.LOCK_FILE]  # nothing written
        with pytest.raises(OutputError, match="in use"):
            make_atlas().save(out)
    finally:
        holder.close()
    assert holder.proc.returncode == 0
    assert not out.exists()  # the holder created it and left it empty: gone with the lock
    scan(tiny_llama_dir, corpus, out)  # free again
    assert sorted(os.listdir(out)) == ["heads.parquet", "meta.json"]


def test_two_threads_one_lock(tmp_path):
    out = tmp_path / "run"
    taken, release, errors = threading.Event(), threading.Event(), []

    def hold():
        try:
            with rundir.lock(out, command="thread one"):
                with rundir.lock(out):  # the same thread again: nested, not refused
                    taken.set()
                    release.wait(WAIT_S)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
            taken.set()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert taken.wait(WAIT_S) and not errors
        assert json.loads((out / rundir.LOCK_FILE).read_text())["command"] == "thread one"
        with pytest.raises(OutputError, match=f"pid {os.getpid()} .*thread one"), rundir.lock(out):
            pass
    finally:
        release.set()
        thread.join(WAIT_S)
    assert not thread.is_alive() and not errors
    assert not out.exists()
    with rundir.lock(out):
        assert os.listdir(out) == [rundir.LOCK_FILE]


def test_a_run_saved_meanwhile_is_not_replaced(tiny_llama_dir, corpus, tmp_path, monkeypatch):
    """A writer that takes no lock (an older headmap, a copy) finishes a run in --out while this scan runs."""
    other = tmp_path / "other"
    scan(tiny_llama_dir, corpus, other, probes="entropy")
    out = tmp_path / "run"
    forward = LlamaForCausalLM.forward

    def meanwhile(self, *args, **kwargs):
        if not (out / "meta.json").exists():
            for name in ("heads.parquet", "meta.json"):
                shutil.copy(other / name, out / name)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", meanwhile)
    with pytest.raises(OutputError, match="now holds a finished run that another writer saved"):
        scan(tiny_llama_dir, corpus, out, checkpoint_every_s=0)
    assert sorted(os.listdir(out)) == ["heads.parquet", "meta.json"]  # theirs, and no checkpoint of ours
    assert sorted(Atlas.load(out).heads.probe.unique()) == ["entropy"]
    scan(tiny_llama_dir, corpus, out, overwrite=True)  # with --overwrite: replaced
    assert sorted(Atlas.load(out).heads.probe.unique()) == ["sink"]


# -- 6. the names headmap writes ---------------------------------------------------------------------------------


def test_lock_and_staging_names_are_no_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / rundir.LOCK_FILE).write_text("")
    (out / f".headmap-checkpoint{rundir.STAGE_MARK}ab12").mkdir()
    rundir.check_output_folder(out, overwrite=False)  # nothing of a run here
    make_atlas().save(out)  # the staging debris goes with the run it replaces; the stale lock file on release
    assert sorted(os.listdir(out)) == ["heads.parquet", "maps.parquet", "meta.json", "tokens.parquet"]
    debris = out / f".headmap-checkpoint{rundir.STAGE_MARK}cd34"
    debris.mkdir()
    (debris / checkpoint.STATE_FILE).write_bytes(b"")
    checkpoint.remove(out)  # a first checkpoint's staging folder that a kill left: removed
    assert not debris.exists()
    assert all(name in rundir.HEADMAP_NAMES for name in os.listdir(out))


def test_replacing_through_a_link_and_from_inside(tmp_path, monkeypatch):
    """--out a link to a folder replaces that folder (the link stays); --out . is replaced in place."""
    real, link = tmp_path / "real", tmp_path / "link"
    make_atlas(seed=0).save(real)
    link.symlink_to(real)
    make_atlas(seed=1, tokens=False).save(link, overwrite=True)
    assert link.is_symlink() and sorted(os.listdir(link)) == ["heads.parquet", "maps.parquet", "meta.json"]
    pd.testing.assert_frame_equal(Atlas.load(real).heads, make_atlas(seed=1).heads)
    monkeypatch.chdir(real)
    make_atlas(seed=2).save(".", overwrite=True)
    assert Path.cwd() == real.resolve() and (real / "tokens.parquet").is_file()
    pd.testing.assert_frame_equal(Atlas.load(real).heads, make_atlas(seed=2).heads)
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]


SLOW_SCAN = """
import sys, time
from transformers import LlamaForCausalLM
from headmap import cli
forward = LlamaForCausalLM.forward
def slow(self, *args, **kwargs):
    time.sleep(0.5)  # long enough for the other writer to arrive while this scan runs
    return forward(self, *args, **kwargs)
LlamaForCausalLM.forward = slow
sys.argv = ["headmap", *sys.argv[1:]]
cli.main()
"""


def test_two_scans_into_one_folder_at_once(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    """A real `headmap scan` runs in another process; a second scan into its --out is refused and changes nothing."""
    corpus = tmp_path / "long.txt"
    corpus.write_text("\n".join(f"line {i} of a corpus that takes a while" for i in range(20)) + "\n")
    out = tmp_path / "run"
    args = ["scan", str(tiny_llama_dir), "--corpus", str(corpus), "--probes", "sink", "--batch-size", "1"]
    args += ["--out", str(out), "--no-progress"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(headmap.__file__).parents[1]), *sys.path]))
    first = subprocess.Popen(
        [sys.executable, "-c", SLOW_SCAN, *args, "--checkpoint-every", "0"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + WAIT_S
        while not (out / CKPT / checkpoint.STATE_FILE).exists() and first.poll() is None:
            assert time.monotonic() < deadline, "the first scan wrote no checkpoint in time"
            time.sleep(0.01)
        assert first.poll() is None, first.communicate(timeout=WAIT_S)[1].decode()
        code, _, err = run(monkeypatch, capsys, *args, "--probes", "entropy")  # a different scan
        assert_one_line_error(code, err, f"--out {out} is in use", f"pid {first.pid}", "headmap scan")
        code, _, err = run(monkeypatch, capsys, *args, "--probes", "entropy", "--overwrite")
        assert_one_line_error(code, err, "is in use")
    finally:
        first.send_signal(signal.SIGTERM)  # it checkpoints and stops
        _, stderr = first.communicate(timeout=WAIT_S)
    assert first.returncode in (0, 128 + signal.SIGTERM), stderr.decode()
    code, _, err = run(monkeypatch, capsys, *args, "--resume")  # the first scan's work is whole
    assert code == 0, err
    assert sorted(Atlas.load(out).heads.probe.unique()) == ["sink"]
