"""``headmap eval --resume`` (issue 13): every finished condition (the unedited predictions, the edited run,
each random-head control) is kept in ``<out>/.headmap-eval/`` as it is done; a stopped eval, one process or
a data-parallel one with a rank killed, goes on from there. Each condition is read back exactly as it was
computed (floats through JSON's repr and Parquet, both exact), and the conditions not yet done are scored
as an uninterrupted run scores them, so items.parquet and summary.json are compared for equality.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from cli_runner import assert_one_line_error, run
from test_distributed_eval import EDIT, assert_same_eval, eval_args, one_process, task_file  # noqa: F401
from test_distributed_scan import TIMEOUT_S, finish, torchrun

from headmap.evaluation import run_eval
from headmap.evaluation.runs import CHECKPOINT, FINGERPRINT


class Stop(KeyboardInterrupt):
    """Ctrl-C once a condition is done (raised from the progress callback, after its checkpoint)."""


def stop_at(prefix: str):
    def progress(line: str) -> None:
        if line.startswith(prefix):
            raise Stop

    return progress


def evaluate_into(model, task, out, **kw):
    options = {"edits": [EDIT], "random_heads": 3, "bootstrap": 200, "batch_size": 3, "out": out, **kw}
    done = run_eval(str(model), str(task), **options)
    done.write(out)
    return done


@pytest.mark.parametrize("stop", ["base:", "condition 1/", "condition 3/"])
def test_stopped_and_resumed_equals_uninterrupted(tiny_llama_dir, task_file, tmp_path, stop):  # noqa: F811
    evaluate_into(tiny_llama_dir, task_file, tmp_path / "one")
    out = tmp_path / "two"
    with pytest.raises(Stop):
        evaluate_into(tiny_llama_dir, task_file, out, progress=stop_at(stop))
    folder = out / CHECKPOINT
    assert (folder / FINGERPRINT).is_file() and (folder / "base.json").is_file()
    assert not (out / "items.parquet").exists()
    lines: list[str] = []
    evaluate_into(tiny_llama_dir, task_file, out, resume=True, progress=lines.append)
    assert "from the checkpoint" in lines[0]  # the base was read back
    assert_same_eval(tmp_path / "one", out)
    assert not folder.exists()  # removed once the results are written


def test_needle_eval_resumes(tiny_llama_dir, tmp_path):
    needle = "needle:lengths=64:depths=0,0.5,1"
    kw = {"limit": 4, "max_length": 64, "random_heads": 2}
    evaluate_into(tiny_llama_dir, needle, tmp_path / "one", **kw)
    with pytest.raises(Stop):
        evaluate_into(tiny_llama_dir, needle, tmp_path / "two", progress=stop_at("condition 2/"), **kw)
    evaluate_into(tiny_llama_dir, needle, tmp_path / "two", resume=True, **kw)
    assert_same_eval(tmp_path / "one", tmp_path / "two")


def _cli(model: Path, task: Path, out: Path, *extra: str) -> list[str]:
    return eval_args(model, str(task), out, *extra)[2:]


def test_a_stopped_eval_is_refused_without_resume_and_a_different_one_with_it(
    monkeypatch,
    capsys,
    tiny_llama_dir,
    task_file,  # noqa: F811
    tmp_path,
):
    out = tmp_path / "ex"
    with pytest.raises(Stop):
        evaluate_into(tiny_llama_dir, task_file, out, progress=stop_at("condition 1/"), random_heads=2)
    kept = {p.name: p.read_bytes() for p in (out / CHECKPOINT).iterdir()}
    code, _, err = run(monkeypatch, capsys, *_cli(tiny_llama_dir, task_file, out))
    assert_one_line_error(code, err, "stopped evaluation", "--resume", "another folder")
    code, _, err = run(monkeypatch, capsys, *_cli(tiny_llama_dir, task_file, out, "--resume", "--seed", "7"))
    assert_one_line_error(code, err, "cannot resume", "--seed differs")
    other = tmp_path / "other.jsonl"
    other.write_text(task_file.read_text().replace("Snow", "Rain", 1))
    code, _, err = run(monkeypatch, capsys, *_cli(tiny_llama_dir, other, out, "--resume"))
    assert_one_line_error(code, err, "cannot resume", "inputs differs", "--task differs")
    assert {p.name: p.read_bytes() for p in (out / CHECKPOINT).iterdir()} == kept
    assert not (out / "items.parquet").exists()
    code, _, err = run(monkeypatch, capsys, "eval", str(tiny_llama_dir), "--task", str(task_file), "--resume")
    assert_one_line_error(code, err, "--resume needs --out")
    code, stdout, err = run(monkeypatch, capsys, *_cli(tiny_llama_dir, task_file, out, "--resume"))
    assert code == 0, err
    assert "from the checkpoint" in err and "wrote " in stdout
    assert not (out / CHECKPOINT).exists()


def test_a_killed_rank_resumes(tiny_llama_dir, task_file, tmp_path):  # noqa: F811
    controls = ["--random-heads", "8"]
    one_process(eval_args(tiny_llama_dir, str(task_file), tmp_path / "one", *controls))
    out = tmp_path / "two"
    argv = eval_args(tiny_llama_dir, str(task_file), out, *controls)
    proc = torchrun(2, argv, start_new_session=True)
    edited = out / CHECKPOINT / "condition-0000.json"  # the edited run is done, the controls are not
    deadline = time.monotonic() + TIMEOUT_S
    while not edited.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert edited.exists(), "the edited condition was never kept"
    rank1 = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.environ().get("RANK") == "1"]
    assert len(rank1) == 1
    os.kill(rank1[0].pid, signal.SIGKILL)  # rank 1 dies mid-run
    code, _, err = finish(proc)
    assert code != 0
    assert not (out / "items.parquet").exists()
    kept = sorted(p.name for p in (out / CHECKPOINT).glob("condition-*.json"))
    assert "condition-0000.json" in kept and len(kept) < 9  # the edited run kept, the run not done
    code, _, err = finish(torchrun(2, [*argv, "--resume"]))
    assert code == 0, err[-3000:]
    assert err.count("from the checkpoint") == 1 + len(kept)  # the base and every kept condition, said once
    assert_same_eval(tmp_path / "one", out)
    assert len(json.loads((out / "summary.json").read_text())["random_controls"]) == 8
