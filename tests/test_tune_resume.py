"""``headmap tune``: progress and ``--resume``. Every finished dev trial (the factors of every group -> dev
accuracy and mean p(answer)) is kept in ``<out>/.headmap-tune/`` as it is done, after a fingerprint of the
run; a stopped tune goes on from there. A trial is read back exactly as it was computed (two Python floats
through JSON's repr, which round-trips every float), the choice depends only on those numbers, and the test
split is scored as an uninterrupted run scores it, so dev.csv, items.csv and summary.json are compared byte
for byte.

The run here: two head groups and the grid 0, 0.5, 2 with neutral 1, so 4 values per group. Group 0 scores
(1, 1) (its neutral setting) and (0, 1), (0.5, 1), (2, 1); group 1 finds its neutral setting (c, 1) among
those and scores (c, 0), (c, 0.5), (c, 2): 7 distinct dev trials, 8 rows of dev.csv.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_runner import assert_one_line_error, run
from test_distributed_scan import finish, torchrun
from test_evaluate import ITEMS, write_task

import headmap.evaluation.tuning as tuning
from headmap.evaluation import run_tune
from headmap.evaluation.runs import FINGERPRINT, TUNE_CHECKPOINT

TEMPLATES = ["scale_first_token:heads=[[0,0],[1,1]]:factor={f}", "scale_first_token:heads=[[0,2]]:factor={f}"]
GRID = "0,0.5,2"
TRIALS = 7  # distinct dev trials of the run above (module docstring)
ROWS = 8  # rows of dev.csv: 4 values x 2 groups
RESULTS = ("dev.csv", "items.csv", "summary.json")


class Stop(KeyboardInterrupt):
    """Ctrl-C (raised from the progress callback, after the trial's checkpoint; or from the scoring)."""


@pytest.fixture
def splits(tmp_path) -> tuple[Path, Path]:
    return write_task(tmp_path, ITEMS[:3], "dev.jsonl"), write_task(tmp_path, ITEMS[3:], "test.jsonl")


@pytest.fixture
def predicts(monkeypatch) -> list[int]:
    """Count the dev trials scored (tune's predict; the test split is scored by evaluate, not counted)."""
    calls = [0]
    real = tuning.predict

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(tuning, "predict", counted)
    return calls


def tune_into(model: Path, splits: tuple[Path, Path], out: Path, **kw):
    options = {"grid": GRID, "bootstrap": 200, "batch_size": 2, "out": out, **kw}
    done = run_tune(str(model), str(splits[0]), str(splits[1]), TEMPLATES, **options)
    done.write(out)
    return done


def stop_at(prefix: str):
    def progress(line: str) -> None:
        if line.startswith(prefix):
            raise Stop

    return progress


def kept(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (out / TUNE_CHECKPOINT).iterdir()}


def assert_same_results(a: Path, b: Path) -> None:
    for name in RESULTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert len(json.loads((a / "summary.json").read_text())["dev"]) == ROWS


def cli_args(model: Path, splits: tuple[Path, Path], out: Path | None, *extra: str) -> list[str]:
    args = ["tune", str(model), "--task-dev", str(splits[0]), "--task-test", str(splits[1]), "--grid", GRID,
            "--bootstrap", "200", "--batch-size", "2"]  # fmt: skip
    for t in TEMPLATES:
        args += ["--edit-template", t]
    return [*args, *(["--out", str(out)] if out is not None else []), *extra]


@pytest.mark.parametrize(("stop", "done"), [("group 0 factor 0:", 2), ("group 1 factor 0:", 5), ("test:", TRIALS)])
def test_stopped_and_resumed_equals_uninterrupted(tiny_llama_dir, splits, tmp_path, predicts, stop, done):
    lines: list[str] = []
    tune_into(tiny_llama_dir, splits, tmp_path / "one", progress=lines.append)
    assert predicts[0] == TRIALS
    assert not (tmp_path / "one" / TUNE_CHECKPOINT).exists()  # removed once the results are written
    out = tmp_path / "two"
    predicts[0] = 0
    with pytest.raises(Stop):
        tune_into(tiny_llama_dir, splits, out, progress=stop_at(stop))
    trials = sorted(p.name for p in (out / TUNE_CHECKPOINT).glob("trial-*.json"))
    assert trials == [f"trial-{k:04d}.json" for k in range(done)]  # each kept as soon as it was done
    assert (out / TUNE_CHECKPOINT / FINGERPRINT).is_file()
    assert not any((out / name).exists() for name in RESULTS)
    stored = {tuple(json.loads(p.read_text())["factors"]) for p in (out / TUNE_CHECKPOINT).glob("trial-*.json")}
    predicts[0] = 0
    again: list[str] = []
    tune_into(tiny_llama_dir, splits, out, resume=True, progress=again.append)
    assert predicts[0] == TRIALS - done  # only the missing trials were scored
    assert_same_results(tmp_path / "one", out)
    assert not (out / TUNE_CHECKPOINT).exists()
    rows = [line for line in again if line.startswith("group ")]
    assert len(rows) == ROWS
    summary = json.loads((out / "summary.json").read_text())
    chosen = summary["chosen"]
    for line, row in zip(rows, summary["dev"], strict=True):  # the rows whose trial was kept, and only those
        g = row["group"]
        key = (*chosen[:g], row["factor"], *[1.0] * (len(TEMPLATES) - g - 1))
        assert line.endswith("from the checkpoint") == (key in stored), (line, key, stored)
        assert line.endswith("from the checkpoint") or line.endswith(" s"), line  # else: its time
    assert sum(line.endswith("from the checkpoint") for line in rows) >= done
    assert [line.split(", ")[:2] for line in rows] == [line.split(", ")[:2] for line in lines if line[:6] == "group "]


def test_a_crash_inside_the_scoring_keeps_the_trials_before_it(tiny_llama_dir, splits, tmp_path, monkeypatch):
    tune_into(tiny_llama_dir, splits, tmp_path / "one")
    real = tuning.predict
    calls = [0]

    def crashing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:
            raise Stop  # the fourth trial never finishes
        return real(*args, **kwargs)

    monkeypatch.setattr(tuning, "predict", crashing)
    out = tmp_path / "two"
    with pytest.raises(Stop):
        tune_into(tiny_llama_dir, splits, out)
    assert len(list((out / TUNE_CHECKPOINT).glob("trial-*.json"))) == 3
    calls[0] = -100  # no more crashes
    tune_into(tiny_llama_dir, splits, out, resume=True)
    assert calls[0] == -100 + TRIALS - 3
    assert_same_results(tmp_path / "one", out)


def test_progress_lines_on_the_console(monkeypatch, capsys, tiny_llama_dir, splits, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run(monkeypatch, capsys, *cli_args(tiny_llama_dir, splits, out))
    assert code == 0, err
    rows = [line for line in err.splitlines() if line.startswith("group ")]
    assert len(rows) == ROWS
    assert rows[0].startswith("group 0 factor 0: dev accuracy ") and ", p(answer) 0." in rows[0]
    assert rows[-1].startswith("group 1 factor 2: dev accuracy ")
    test_lines = [line for line in err.splitlines() if line.startswith("test: 2 items, accuracy ")]
    assert len(test_lines) == 1 and "with the chosen edits" in test_lines[0]
    assert "wrote " in stdout and not (out / TUNE_CHECKPOINT).exists()


def no_model_load(monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad option was refused")

    monkeypatch.setattr("headmap.evaluation.runs.load_model", boom)


def test_refusals(monkeypatch, capsys, tiny_llama_dir, splits, tmp_path):
    """A stopped tune without --resume, --resume without --out, and a different run with --resume: one line,
    exit 2, the checkpoint kept byte for byte; then the right --resume finishes it."""
    out = tmp_path / "ex"
    with pytest.raises(Stop):
        tune_into(tiny_llama_dir, splits, out, progress=stop_at("group 1 factor 0:"))
    before = kept(out)
    assert len([n for n in before if n.startswith("trial-")]) == 5
    with monkeypatch.context() as m:
        no_model_load(m)  # these two come before the model loads
        code, _, err = run(monkeypatch, capsys, *cli_args(tiny_llama_dir, splits, out))
        assert_one_line_error(code, err, "stopped tune", "5 dev trial(s) done", "pass --resume", TUNE_CHECKPOINT)
        code, _, err = run(monkeypatch, capsys, *cli_args(tiny_llama_dir, splits, None, "--resume"))
        assert_one_line_error(code, err, "--resume needs --out")
    code, _, err = run(monkeypatch, capsys, *cli_args(tiny_llama_dir, splits, out, "--resume", "--seed", "7"))
    assert_one_line_error(code, err, "cannot resume the tune", "--seed differs", "finished dev trials are kept")
    other = cli_args(tiny_llama_dir, splits, out, "--resume")
    other[other.index(GRID)] = "0,0.5,3"
    code, _, err = run(monkeypatch, capsys, *other)
    assert_one_line_error(code, err, "cannot resume the tune", "--grid differs", "resolved edits differs")
    changed = splits[1].parent / "test2.jsonl"
    changed.write_text(splits[1].read_text().replace("fire", "ice"))
    code, _, err = run(monkeypatch, capsys, *cli_args(tiny_llama_dir, (splits[0], changed), out, "--resume"))
    assert_one_line_error(code, err, "cannot resume the tune", "inputs differs")
    assert kept(out) == before
    assert not any((out / name).exists() for name in RESULTS)
    code, stdout, err = run(monkeypatch, capsys, *cli_args(tiny_llama_dir, splits, out, "--resume"))
    assert code == 0, err
    assert "from the checkpoint" in err and "wrote " in stdout
    assert not (out / TUNE_CHECKPOINT).exists()


KILL_RANK_1 = """import os, signal, sys, runpy
if os.environ["RANK"] == "1":
    import headmap.evaluation.tuning as tuning
    real, calls = tuning.predict, [0]
    def predict(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:
            os.kill(os.getpid(), signal.SIGKILL)  # rank 1 dies in its fourth dev trial
        return real(*args, **kwargs)
    tuning.predict = predict
sys.argv = ["headmap", *sys.argv[1:]]
runpy.run_module("headmap", run_name="__main__")
"""


def test_a_killed_rank_resumes(tiny_llama_dir, splits, tmp_path):
    """Two ranks, rank 1 killed (SIGKILL) in the fourth dev trial: rank 0 kept the three finished ones. Then
    --resume on two ranks: rank 0 reads them and hands them to rank 1, both skip the same trials (a rank that
    scored a trial the other skips would wait at the gather forever), and the results equal one process's."""
    tune_into(tiny_llama_dir, splits, tmp_path / "one")
    out = tmp_path / "two"
    script = tmp_path / "kill.py"
    script.write_text(KILL_RANK_1)
    code, _, err = finish(torchrun(2, [str(script), *cli_args(tiny_llama_dir, splits, out)]))
    assert code != 0
    assert sorted(p.name for p in (out / TUNE_CHECKPOINT).glob("trial-*.json")) == [
        f"trial-{k:04d}.json" for k in range(3)
    ], err[-3000:]
    assert not any((out / name).exists() for name in RESULTS)
    code, stdout, err = finish(torchrun(2, ["-m", "headmap", *cli_args(tiny_llama_dir, splits, out, "--resume")]))
    assert code == 0, err[-3000:]
    rows = [line for line in err.splitlines() if line.startswith("group ")]
    assert len(rows) == ROWS  # rank 0 alone prints progress
    assert sum(line.endswith("from the checkpoint") for line in rows) >= 3
    assert stdout.count("wrote ") == 1
    assert_same_results(tmp_path / "one", out)
    assert not (out / TUNE_CHECKPOINT).exists()
