"""``headmap compress --merge DIR ... --out DIR`` (issue 11): the folders of separate ``--shard I/N`` runs
become one run folder equal to what one process running the same command without --shard writes.

Rows are compared exactly except the columns that measure time and memory (TIME_COLUMNS): each item's rows
come from the same forward passes on the same inputs in the shard runs and in the single-process run. The
merged rows are the shards' rows themselves, so there the time columns are compared too.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
from cli_runner import assert_only_error_line, run
from test_compress_resume import ITEMS, argv, assert_same_run, stop_after, write_task

from headmap import cli
from headmap.cli import compress as cc


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    """The task of test_compress_resume: 5 items, so shard 0/2 holds 2 items and shard 1/2 holds 3."""
    return write_task(tmp_path_factory.mktemp("cm") / "task.jsonl")


def headmap(*args: str) -> int:
    """``headmap ARGS...`` in this process, for module fixtures (capsys is per test): the exit code."""
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(sys, "argv", ["headmap", *args])
        try:
            cli.main()
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
        return 0
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def whole(tiny_llama_dir, task_file, tmp_path_factory) -> Path:
    """The run of one process."""
    out = tmp_path_factory.mktemp("whole") / "run"
    assert headmap(*argv(tiny_llama_dir, task_file, out)) == 0
    return out


@pytest.fixture(scope="module")
def shards(tiny_llama_dir, task_file, tmp_path_factory) -> list[Path]:
    """The same command as --shard 0/2 and --shard 1/2, each in its own folder."""
    base = tmp_path_factory.mktemp("shards")
    folders = []
    for i in range(2):
        out = base / f"shard{i}"
        assert headmap(*argv(tiny_llama_dir, task_file, out, "--shard", f"{i}/2")) == 0
        assert json.loads((out / "compress.json").read_text())["shard"] == f"{i}/2"
        folders.append(out)
    return folders


def merge(monkeypatch, capsys, out: Path, *folders: Path, extra: tuple[str, ...] = ()) -> tuple[int, str, str]:
    return run(monkeypatch, capsys, "compress", *(a for f in folders for a in ("--merge", str(f))), "--out", str(out),
               *extra)  # fmt: skip


def files(*folders: Path) -> dict[str, bytes]:
    """Every file under the folders, by path: what a refusal must leave as it was."""
    return {str(p): p.read_bytes() for f in folders if f.exists() for p in sorted(f.rglob("*")) if p.is_file()}


def copy(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


def edit_json(path: Path, **change) -> None:
    data = json.loads(path.read_text())
    data.update(change)
    path.write_text(json.dumps(data, indent=2))


def test_merged_shards_equal_one_process(monkeypatch, capsys, tiny_llama_dir, task_file, whole, shards, tmp_path):
    out = tmp_path / "merged"
    before = files(*shards)
    code, stdout, err = merge(monkeypatch, capsys, out, shards[1], shards[0])  # any order: merged in shard order
    assert code == 0, err
    assert f"merged 2 shards ({ITEMS} items) into {out}" in stdout
    assert files(*shards) == before  # the shards are read, never changed
    # rows (order included), compress.json (time means aside), the plot byte for byte, and the report
    assert_same_run(whole, out)
    parts = [pd.read_parquet(f / "compress.parquet") for f in shards]
    merged = pd.read_parquet(out / "compress.parquet")
    pd.testing.assert_frame_equal(merged, pd.concat(parts, ignore_index=True), check_exact=True)  # times too
    assert len(merged) == ITEMS * (1 + 2 * 2)  # 5 items x (full + 2 presses x 2 ratios)
    assert list(merged.columns) == list(pd.read_parquet(whole / "compress.parquet").columns)
    data = json.loads((out / "compress.json").read_text())
    assert "shard" not in data and data["items"] == ITEMS
    assert list(data) == list(json.loads((whole / "compress.json").read_text()))  # same keys, same order
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in page and "snapkv:window=8" in page and "knorm" in page
    # the fingerprint of the command without --shard: that command with --resume finds every item done
    assert json.loads((out / cc.FINGERPRINT_FILE).read_text()) == json.loads((whole / cc.FINGERPRINT_FILE).read_text())
    calls = stop_after(monkeypatch, ITEMS)  # counts the items computed
    code, stdout, err = run(monkeypatch, capsys, *argv(tiny_llama_dir, task_file, out, "--resume"))
    assert code == 0, err
    assert calls[0] == 0 and f"{ITEMS} of {ITEMS} items done, 0 to go" in stdout
    assert_same_run(whole, out)


def test_overwrite_replaces_an_earlier_run_and_nothing_else_does(monkeypatch, capsys, whole, shards, tmp_path):
    out = copy(whole, tmp_path / "earlier")
    edit_json(out / "compress.json", model="an earlier run")
    before = files(out)
    code, _, err = merge(monkeypatch, capsys, out, *shards)
    assert_only_error_line(code, err, f"--out {out} already holds compress results", "--overwrite")
    assert files(out) == before
    code, _, err = merge(monkeypatch, capsys, out, *shards, extra=("--overwrite",))
    assert code == 0, err
    assert_same_run(whole, out)


def test_out_may_not_be_a_shard_folder(monkeypatch, capsys, shards):
    before = files(*shards)
    code, _, err = merge(monkeypatch, capsys, shards[0], *shards, extra=("--overwrite",))
    assert_only_error_line(code, err, f"--out {shards[0]} is one of the shard folders")
    assert files(*shards) == before


def _missing(shards, tmp_path):
    return [shards[0]]


def _twice(shards, tmp_path):
    return [shards[0], copy(shards[0], tmp_path / "again"), shards[1]]


def _counts(shards, tmp_path):
    other = copy(shards[1], tmp_path / "of3")
    edit_json(other / cc.FINGERPRINT_FILE, shard="1/3")
    return [shards[0], other]


def _whole(shards, tmp_path):
    whole = copy(shards[1], tmp_path / "whole")
    edit_json(whole / cc.FINGERPRINT_FILE, shard=None)
    return [shards[0], whole]


def _not_a_run(shards, tmp_path):
    (tmp_path / "empty").mkdir()
    return [shards[0], tmp_path / "empty"]


def _absent(shards, tmp_path):
    return [shards[0], tmp_path / "absent"]


def _other_limit(shards, tmp_path):
    other = copy(shards[1], tmp_path / "limit")
    edit_json(other / cc.FINGERPRINT_FILE, limit=3)
    return [shards[0], other]


def _no_summary(shards, tmp_path):
    stopped = copy(shards[1], tmp_path / "stopped")
    (stopped / "compress.json").unlink()
    return [shards[0], stopped]


def _rows_missing(shards, tmp_path):
    stopped = copy(shards[1], tmp_path / "stopped")
    rows = pd.read_parquet(stopped / "compress.parquet")
    last = rows["item"].iloc[-1]
    rows[rows["item"] != last].to_parquet(stopped / "compress.parquet", index=False)
    return [shards[0], stopped]


def _stale_summary(shards, tmp_path):
    stale = copy(shards[1], tmp_path / "stale")
    data = json.loads((stale / "compress.json").read_text())
    data["summary"][1]["accuracy"] = 1.0 - data["summary"][1]["accuracy"]
    (stale / "compress.json").write_text(json.dumps(data))
    return [shards[0], stale]


def _relabel(source: Path, to: Path, shard: str) -> Path:
    """A copy of a shard's folder that says it is ``shard``: its rows and compress.json, another label."""
    folder = copy(source, to)
    edit_json(folder / cc.FINGERPRINT_FILE, shard=shard)
    edit_json(folder / "compress.json", shard=shard)
    return folder


def _same_items(shards, tmp_path):
    return [shards[0], _relabel(shards[0], tmp_path / "odd", "1/2")]


def _swapped(shards, tmp_path):
    return [_relabel(shards[1], tmp_path / "first", "0/2"), _relabel(shards[0], tmp_path / "second", "1/2")]


@pytest.mark.parametrize(
    "make, needles",
    [
        (_missing, ["shard 1/2 is missing", "given: 0/2", "--shard 1/2"]),
        (_twice, ["shard 0/2 is given twice", "again"]),
        (_counts, ["shards of different counts", "of3 is 1/3"]),
        (_whole, ["is not a --shard run", "whole"]),
        (_not_a_run, ["empty is not a compress run folder", cc.FINGERPRINT_FILE]),
        (_absent, ["absent: no such folder"]),
        (_other_limit, ["is a shard of another compress run", "limit differs", "has 20", "limit 3"]),
        (_no_summary, ["stopped (shard 1/2) is not finished: it has no compress.json", "--resume"]),
        (_rows_missing, ["stopped (shard 1/2) is not finished", "holds 2 of its 3 items complete", "--resume"]),
        (_stale_summary, ["stale/compress.json does not summarize"]),
        (_same_items, ["is in", "shard0 and in", "odd; pass the shards of one run"]),
        (_swapped, ["first (shard 0/2) holds 3 items, but shard 0 of 2 of a run of 5 items holds 2"]),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_shards_that_do_not_make_one_run_are_refused(monkeypatch, capsys, shards, tmp_path, make, needles):
    folders = make(shards, tmp_path)
    out = tmp_path / "merged"
    before = files(*folders)
    code, _, err = merge(monkeypatch, capsys, out, *folders)
    assert_only_error_line(code, err, "--merge", *needles)
    assert not out.exists()  # nothing written
    assert files(*folders) == before  # nothing changed


def test_a_shard_being_written_is_refused(monkeypatch, capsys, shards, tmp_path):
    """Another writer (here a thread: the lock is per thread too) holds shard 1's folder."""
    from headmap.rundir import lock

    held, release = threading.Event(), threading.Event()

    def writer() -> None:
        with lock(shards[1], command="headmap compress ... --shard 1/2"):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        assert held.wait(30)
        out = tmp_path / "merged"
        code, _, err = merge(monkeypatch, capsys, out, *shards)
        assert_only_error_line(code, err, f"--merge: {shards[1]} is being written", "--shard 1/2", "wait until")
        assert not out.exists()
    finally:
        release.set()
        thread.join(30)


def test_a_shard_of_another_command_is_refused(monkeypatch, capsys, tiny_llama_dir, task_file, shards, tmp_path):
    """A real shard 1/2 of another --ratio: the fields that differ, named in one line."""
    other = tmp_path / "other"
    code, _, err = run(monkeypatch, capsys, *argv(tiny_llama_dir, task_file, other, "--shard", "1/2", ratio="0.25"))
    assert code == 0, err
    out = tmp_path / "merged"
    code, _, err = merge(monkeypatch, capsys, out, shards[0], other)
    assert_only_error_line(
        code, err, f"{other} is a shard of another compress run", "presses differs", "ratios differs"
    )
    assert "[0.25, 0.5]" in err and "[0.25]" in err
    assert not out.exists()


def test_merge_takes_no_run_options_and_needs_out(monkeypatch, capsys, shards, tmp_path):
    out = tmp_path / "merged"
    code, _, err = merge(monkeypatch, capsys, out, *shards, extra=("--press", "knorm", "--ratio", "0.5"))
    assert_only_error_line(code, err, "--merge takes the shard folders, --out and --overwrite only", "--press, --ratio")
    code, _, err = run(monkeypatch, capsys, "compress", "tiny", "--merge", str(shards[0]), "--out", str(out))
    assert_only_error_line(code, err, "drop MODEL")
    assert not out.exists()
    code, _, err = run(monkeypatch, capsys, "compress", "--merge", str(shards[0]), "--merge", str(shards[1]))
    assert code == 2 and err.startswith("Usage: headmap compress ") and "Missing option '--out'" in err, err


@pytest.mark.parametrize(
    "args, needle",
    [
        ([], "Missing argument 'model'"),
        (["--out", "x"], "Missing argument 'model'"),
        (["tiny"], "Missing option '--press'"),
        (["tiny", "--out", "x"], "Missing option '--press'"),
        (["tiny", "--press", "knorm"], "Missing option '--out'"),
    ],
)
def test_without_merge_model_press_and_out_are_still_required(monkeypatch, capsys, tmp_path, args, needle):
    """The usage messages of click when MODEL, --press and --out were required parameters."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run(monkeypatch, capsys, "compress", *args)
    assert code == 2 and err.startswith("Usage: headmap compress ") and needle in err, err
    assert "Try 'headmap compress --help' for help." in err
    assert not (tmp_path / "x").exists()
