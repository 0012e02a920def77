"""``headmap compress --resume`` and ``--shard`` (issue 13 point 2, issue 11's long study): a stopped run
continues in the same --out and ends with the files of an uninterrupted run; what decides the rows is
fingerprinted in compress-fingerprint.json, and a command that differs is one line naming the field.

Rows are compared exactly except the columns that measure time and memory (TIME_COLUMNS): every item's
rows come from the same forward passes on the same inputs in both runs, resumed or not.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pandas as pd
import pytest
from cli_runner import assert_one_line_error, run

from headmap.cli import compress as cc

BENCH = Path(__file__).resolve().parents[1] / "bench" / "compress_fingerprint.py"
ITEMS = 5


def write_task(path: Path) -> Path:
    """A --task file of ITEMS items of growing length, each with its own code to read back."""
    lines = []
    for k in range(ITEMS):
        context = " ".join(["the cat sat on the mat and the dog sat on the log"] * (3 + k)) + f" the code is {k}7{k}."
        lines.append(json.dumps({"context": context, "question": "what is the code?", "answer": f"{k}7{k}"}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    return write_task(tmp_path_factory.mktemp("cr") / "task.jsonl")


def argv(model: Path, task: Path, out: Path, *extra: str, ratio: str = "0.25,0.5") -> list[str]:
    return ["compress", str(model), "--press", "knorm", "--press", "snapkv:window=8", "--ratio", ratio,
            "--task", str(task), "--max-new-tokens", "3", "--no-progress", "--out", str(out), *extra]  # fmt: skip


def table(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "compress.parquet").drop(columns=list(cc.TIME_COLUMNS))


def summary(out: Path) -> dict:
    data = json.loads((out / "compress.json").read_text())
    for s in data["summary"]:
        del s["prefill_s"], s["decode_s_per_token"]  # means of time columns
    return data


def assert_same_run(a: Path, b: Path) -> None:
    pd.testing.assert_frame_equal(table(a), table(b), check_exact=True)
    assert summary(a) == summary(b)
    # the plot reads accuracy, its interval and cache bytes only: the same picture, byte for byte
    assert (a / "compress.png").read_bytes() == (b / "compress.png").read_bytes()
    assert (b / "report.html").is_file()


def stop_after(monkeypatch, k: int) -> list[int]:
    """Make the k+1-th item stop the run (Ctrl-C) before it starts; counts the items computed."""
    calls = [0]
    real = cc.item_rows

    def hook(*args, **kwargs):
        if calls[0] == k:
            raise KeyboardInterrupt
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(cc, "item_rows", hook)
    return calls


@pytest.fixture(scope="module")
def whole(tiny_llama_dir, task_file, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("whole") / "run"
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(sys, "argv", ["headmap", *argv(tiny_llama_dir, task_file, out)])
        with pytest.raises(SystemExit) as stop:
            from headmap import cli

            cli.main()
            raise SystemExit(0)
        assert stop.value.code in (0, None)
    finally:
        mp.undo()
    return out


def stopped(monkeypatch, capsys, model: Path, task: Path, out: Path, k: int) -> None:
    calls = stop_after(monkeypatch, k)
    code, _, err = run(monkeypatch, capsys, *argv(model, task, out))
    monkeypatch.undo()
    assert code == 130, err
    assert f"stopped after {k} of {ITEMS} items" in err and "--resume" in err
    assert calls[0] == k
    assert len(pd.read_parquet(out / "compress.parquet")) == k * (1 + 2 * 2)  # k items x (full + 2 presses x 2)
    assert (out / cc.FINGERPRINT_FILE).is_file()


def test_a_stopped_run_resumes_to_the_files_of_an_uninterrupted_one(
    monkeypatch, capsys, tiny_llama_dir, task_file, tmp_path, whole
):
    out = tmp_path / "run"
    stopped(monkeypatch, capsys, tiny_llama_dir, task_file, out, 2)
    calls = stop_after(monkeypatch, ITEMS)  # counts only
    code, stdout, err = run(monkeypatch, capsys, *argv(tiny_llama_dir, task_file, out, "--resume"))
    assert code == 0, err
    assert calls[0] == ITEMS - 2  # the finished items are kept, not computed again
    assert f"2 of {ITEMS} items done, {ITEMS - 2} to go" in stdout
    assert_same_run(whole, out)
    fp = json.loads((out / cc.FINGERPRINT_FILE).read_text())
    assert fp["ratios"] == [0.25, 0.5] and fp["presses"][2][0] == "snapkv:window=8" and fp["max_new_tokens"] == 3
    assert fp["tasks"][0]["sha256"] and fp["limit"] == 20 and fp["prefill"] == "shared" and fp["atlas"] is None


def test_an_item_with_rows_missing_is_computed_again(monkeypatch, capsys, tiny_llama_dir, task_file, tmp_path, whole):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("compress.parquet", cc.FINGERPRINT_FILE):
        (out / name).write_bytes((whole / name).read_bytes())
    rows = pd.read_parquet(out / "compress.parquet")
    third = rows["item"].unique()[2]
    rows.drop(index=rows.index[(rows["item"] == third) & (rows.press == "knorm")][:1]).to_parquet(
        out / "compress.parquet", index=False
    )
    calls = stop_after(monkeypatch, ITEMS)
    code, _, err = run(monkeypatch, capsys, *argv(tiny_llama_dir, task_file, out, "--resume"))
    assert code == 0, err
    assert calls[0] == 1
    assert_same_run(whole, out)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"ratio": "0.25,0.75"}, "ratios differs"),
        ({"extra": ["--max-new-tokens", "4"]}, "--max-new-tokens differs"),
        ({"extra": ["--limit", "3"]}, "--limit differs"),
        ({"extra": ["--prefill", "each"]}, "--prefill differs"),
        ({"extra": ["--dtype", "bfloat16"]}, "dtype differs"),
    ],
)
def test_resume_with_another_command_is_one_line_and_loses_nothing(
    monkeypatch, capsys, tiny_llama_dir, task_file, tmp_path, change, needle
):
    out = tmp_path / "run"
    stopped(monkeypatch, capsys, tiny_llama_dir, task_file, out, 1)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    args = argv(
        tiny_llama_dir, task_file, out, "--resume", *change.get("extra", []), ratio=change.get("ratio", "0.25,0.5")
    )
    code, _, err = run(monkeypatch, capsys, *args)
    assert_one_line_error(code, err, needle, "--resume", "choose another --out")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_another_task_file_content_is_refused(monkeypatch, capsys, tiny_llama_dir, task_file, tmp_path):
    out = tmp_path / "run"
    task = tmp_path / "task.jsonl"
    task.write_text(task_file.read_text())
    stopped(monkeypatch, capsys, tiny_llama_dir, task, out, 1)
    task.write_text(task_file.read_text().replace("cat", "cow", 1))
    code, _, err = run(monkeypatch, capsys, *argv(tiny_llama_dir, task, out, "--resume"))
    assert_one_line_error(code, err, "tasks differs")


def test_without_resume_an_earlier_run_is_refused(monkeypatch, capsys, tiny_llama_dir, task_file, tmp_path):
    out = tmp_path / "run"
    stopped(monkeypatch, capsys, tiny_llama_dir, task_file, out, 1)
    before = (out / "compress.parquet").read_bytes()
    code, _, err = run(monkeypatch, capsys, *argv(tiny_llama_dir, task_file, out))
    assert_one_line_error(code, err, "already holds compress results", "--resume", "--overwrite", "another --out")
    assert (out / "compress.parquet").read_bytes() == before
    code, _, err = run(monkeypatch, capsys, *argv(tiny_llama_dir, task_file, out, "--resume", "--overwrite"))
    assert_one_line_error(code, err, "pass one of them")
    assert (out / "compress.parquet").read_bytes() == before


def test_overwrite_starts_over(monkeypatch, capsys, tiny_llama_dir, task_file, tmp_path, whole):
    out = tmp_path / "run"
    stopped(monkeypatch, capsys, tiny_llama_dir, task_file, out, 1)
    # another command replaces the run; stopped before its first item, the old rows are gone with it
    stop_after(monkeypatch, 0)
    code, _, err = run(monkeypatch, capsys, *argv(tiny_llama_dir, task_file, out, "--overwrite", ratio="0.75"))
    assert code == 130, err
    monkeypatch.undo()
    assert not (out / "compress.parquet").exists()
    assert json.loads((out / cc.FINGERPRINT_FILE).read_text())["ratios"] == [0.75]
    code, _, err = run(monkeypatch, capsys, *argv(tiny_llama_dir, task_file, out, "--overwrite"))
    assert code == 0, err
    assert_same_run(whole, out)


def test_resume_of_an_empty_folder_is_a_fresh_run(monkeypatch, capsys, tiny_llama_dir, task_file, tmp_path, whole):
    out = tmp_path / "run"
    code, _, err = run(monkeypatch, capsys, *argv(tiny_llama_dir, task_file, out, "--resume"))
    assert code == 0, err
    assert_same_run(whole, out)


# -- a folder of an older headmap: adopted by bench/compress_fingerprint.py, never by --resume itself ----------


def adopt(monkeypatch, capsys, run_dir: Path, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", [str(BENCH), str(run_dir), "--", *args])
    code = 0
    try:
        runpy.run_path(str(BENCH), run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_an_old_folder_is_adopted_by_the_script_then_resumed(
    monkeypatch, capsys, tiny_llama_dir, task_file, tmp_path, whole
):
    out = tmp_path / "run"
    stopped(monkeypatch, capsys, tiny_llama_dir, task_file, out, 2)
    (out / cc.FINGERPRINT_FILE).unlink()  # as an older headmap left it
    code, _, err = run(monkeypatch, capsys, *argv(tiny_llama_dir, task_file, out, "--resume"))
    assert_one_line_error(code, err, "no compress-fingerprint.json", "bench/compress_fingerprint.py")
    # the script checks the table's presses and ratios against the arguments
    code, _, err = adopt(monkeypatch, capsys, out, *argv(tiny_llama_dir, task_file, out, ratio="0.25,0.75"))
    assert code == 2 and "only in the table [('knorm', 0.5), ('snapkv:window=8', 0.5)]" in err, err
    assert not (out / cc.FINGERPRINT_FILE).exists()
    code, stdout, err = adopt(monkeypatch, capsys, out, *argv(tiny_llama_dir, task_file, out)[:-2])  # no --out
    assert code == 0, err
    assert "--resume" in stdout
    code, _, err = adopt(monkeypatch, capsys, out, *argv(tiny_llama_dir, task_file, out))
    assert code == 2 and "already has compress-fingerprint.json" in err
    code, _, err = run(monkeypatch, capsys, *argv(tiny_llama_dir, task_file, out, "--resume"))
    assert code == 0, err
    assert_same_run(whole, out)


# -- --shard i/n ----------------------------------------------------------------------------------------------


def test_shards_cover_the_items_once(monkeypatch, capsys, tiny_llama_dir, task_file, tmp_path, whole):
    parts = []
    for i in range(2):
        out = tmp_path / f"shard{i}"
        code, _, err = run(monkeypatch, capsys, *argv(tiny_llama_dir, task_file, out, "--shard", f"{i}/2"))
        assert code == 0, err
        assert json.loads((out / "compress.json").read_text())["shard"] == f"{i}/2"
        assert json.loads((out / cc.FINGERPRINT_FILE).read_text())["shard"] == f"{i}/2"
        parts.append(table(out))
    assert parts[0]["item"].nunique() == 2 and parts[1]["item"].nunique() == 3  # contiguous: 5 * i // 2
    pd.testing.assert_frame_equal(pd.concat(parts, ignore_index=True), table(whole), check_exact=True)


@pytest.mark.parametrize(
    "shard, needle",
    [("2/2", "out of range"), ("-1/2", "out of range"), ("1", "must be I/N"), ("0/6", "holds no item")],
)
def test_bad_shard(monkeypatch, capsys, tiny_llama_dir, task_file, tmp_path, shard, needle):
    out = tmp_path / "o"
    code, _, err = run(monkeypatch, capsys, *argv(tiny_llama_dir, task_file, out, "--shard", shard))
    assert_one_line_error(code, err, needle)
    assert not (out / "compress.parquet").exists() and not (out / cc.FINGERPRINT_FILE).exists()
